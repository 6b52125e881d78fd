"""The words users type for settings, read in one place, so every flag, environment variable and API argument
that means the same thing accepts the same words and refuses the same way.

- `parse_switch`: on/off switches (`--compile`, `--pack`, GEMMAKIT_COMPILE, GEMMAKIT_SCREEN, ...).
- `normalize_quantize`: the quantization names, where "none" (or None) means full-precision weights.
- `CHAT_FORMATS`: the names `--chat-format`, `gemmakit.load(chat_format=...)` and the server accept.

This module imports nothing from gemmakit (nor torch), so any layer may use it.
"""

from __future__ import annotations

ON_WORDS = ("on", "1", "true", "yes")
OFF_WORDS = ("off", "0", "false", "no")
# What argparse offers for a three-way switch; parse_switch also takes the other ON_WORDS / OFF_WORDS.
SWITCH_CHOICES = ("auto", "on", "off")

QUANTIZATIONS = ("none", "int8", "int4")

# auto: the checkpoint's own template, else the built-in renderer for "-it" names, else a plain dialogue
# (api.pick_chat_format says how each is used).
CHAT_FORMATS = ("auto", "template", "gemma3", "gemma4", "gemma4-empty-thought", "dialogue")


def parse_switch(name: str, value: str, allow_auto: bool = False) -> bool | None:
    """True for on/1/true/yes, False for off/0/false/no (any case, surrounding spaces ignored); None for
    "auto" when `allow_auto`. Anything else raises ValueError naming `name` (the flag or variable the user
    set) and the words it takes."""
    word = str(value).strip().lower()
    if word in ON_WORDS:
        return True
    if word in OFF_WORDS:
        return False
    if allow_auto and word == "auto":
        return None
    allowed = "on, off or auto" if allow_auto else "on or off"
    raise ValueError(f"{name} must be {allowed}, not {value!r}")


def normalize_quantize(value: str | None) -> str | None:
    """The quantization to apply: None (full-precision weights) for None or "none", else "int8" or "int4".
    Anything else raises ValueError listing the names."""
    if value is None:
        return None
    word = str(value).strip().lower()
    if word not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {value!r}: use {', '.join(QUANTIZATIONS)}")
    return None if word == "none" else word


def check_chat_format(value: str) -> str:
    """`value` if it is one of CHAT_FORMATS, else ValueError listing them."""
    if value not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {value!r}; choose one of {', '.join(CHAT_FORMATS)}")
    return value
