"""What the processors and tower configs of every family share: reading an HF sub-config into a dataclass,
turning any PIL image into the RGB array transformers' processors start from, and the processors' prompt
expansion (each placeholder replaced by its item's text, in order)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
from PIL import Image


def hf_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of an HF config dict that dataclass `cls` has fields for (others, like `model_type`, ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def to_rgb(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8. Transparent pixels are composited onto white, as transformers' `convert_to_rgb` does
    (PIL's own convert would make them black)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def expand_placeholders(text: str, marker: str, replacements: Sequence[str], noun: str,
                        error: type[ValueError] = ValueError) -> str:
    """`text` with its i-th `marker` replaced by `replacements[i]`; a count that differs is an `error`."""
    pieces = text.split(marker)
    if len(pieces) - 1 != len(replacements):
        raise error(f"the prompt has {len(pieces) - 1} {marker} placeholders but {len(replacements)} {noun} were "
                    f"given; put one {marker} where each goes, in order")
    return pieces[0] + "".join(r + p for r, p in zip(replacements, pieces[1:], strict=True))
