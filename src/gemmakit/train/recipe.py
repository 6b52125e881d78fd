"""A fine-tuning run's settings: one dataclass, which a YAML recipe (`--config`) and command-line flags fill.

Precedence: the defaults here, then the recipe, then flags given on the command line. Keys in a recipe are the
field names below; an unknown key is an error that lists the known ones, so a typo never silently does
nothing. The resolved settings are saved next to the run (`out/config.yaml`) and in every checkpoint.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

METHODS = ("lora", "qlora", "full")
OBJECTIVES = ("auto", "sft", "dpo")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    data: str = ""  # JSONL (chat / completion / text / preference records) or a .txt file
    out: str = "runs/finetune"  # the run directory: checkpoints, metrics, the adapter or model
    model: str | None = None  # HF directory or .gguf; None = the embedded Gemma 3 270M
    format: str = "auto"  # record format: auto | chat | completion | text | preference
    chat_format: str = "auto"  # how chats are rendered: auto (the model's) | gemma3 | gemma4 | dialogue
    val_data: str | None = None  # held-out records; default: val_fraction of `data`
    val_fraction: float = 0.1
    max_length: int = 1024  # longer records are skipped and reported (text is cut into windows)
    max_soft_tokens: int | None = None  # Gemma 4 soft tokens per image (70/140/280/560/1120); None = 280
    method: str = "lora"  # lora | qlora (LoRA over a frozen int8/int4 base) | full
    objective: str = "auto"  # sft | dpo; auto = dpo for preference data
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    qlora_bits: int = 4
    dpo_beta: float = 0.1
    dpo_reference: str = "cache"  # cache: reference log-probs computed once up front | live: every step
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # sequences per process per micro-batch (a DPO pair counts as 2)
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 = no clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16, fp32 elsewhere) | bf16 | fp32
    activation_checkpointing: bool = False
    seed: int = 0
    save_every: int = 50  # steps between checkpoints (0 = only at the end and on Ctrl-C)
    eval_every: int = 25  # steps between validation passes (0 = only at the end)
    keep_checkpoints: int = 2
    tensorboard: bool = False
    resume: bool = False

    def check(self) -> None:
        if not self.data:
            raise ValueError("no training data: give --data FILE.jsonl (or `data:` in the --config recipe)")
        for name, value, allowed in (("method", self.method, METHODS), ("objective", self.objective, OBJECTIVES),
                                     ("precision", self.precision, PRECISIONS),
                                     ("dpo_reference", self.dpo_reference, ("cache", "live"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.qlora_bits not in (4, 8):
            raise ValueError(f"qlora_bits must be 4 or 8, not {self.qlora_bits}")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "lr": self.lr,
                    "epochs": self.epochs, "max_length": self.max_length, "lora_r": self.lora_r}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), not {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(recipe: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < recipe file < overrides (the flags given, None meaning not given)."""
    known = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if recipe is not None:
        try:
            loaded = yaml.safe_load(Path(recipe).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read recipe {recipe}: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {recipe} must be a mapping of setting: value")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"recipe {recipe}: unknown settings {unknown}; known: {', '.join(sorted(known))}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    config = TrainConfig(**values)
    config.check()
    return config


_HELP = {
    "data": "training records: JSONL (messages / prompt+completion / text / prompt+chosen+rejected) or .txt",
    "out": "run directory: checkpoints, metrics.jsonl, loss.png, the adapter or model (default runs/finetune)",
    "model": "HF directory or .gguf to fine-tune (default: the embedded Gemma 3 270M)",
    "chat_format": "how chat records are rendered: auto, template, gemma3, gemma4, dialogue",
    "method": "lora, qlora (LoRA over an int8/int4 frozen base) or full",
    "objective": "sft or dpo (auto: dpo for preference records)",
    "lora_targets": "comma-separated module names (q_proj,v_proj) or re:REGEX over full module paths",
    "dpo_reference": "cache (reference log-probs computed once) or live (adapters switched off each step)",
    "max_steps": "stop after this many optimizer steps (overrides --epochs)",
    "batch_size": "sequences per process per micro-batch (a DPO pair counts as 2)",
    "precision": "auto (bf16 autocast on CUDA), bf16 (autocast on any device) or fp32",
    "resume": "continue the run in --out from its newest checkpoint",
    "max_soft_tokens": "Gemma 4 soft tokens per image in records with images: 70, 140, 280, 560 or 1120",
}


def _targets(text: str) -> list[str] | str:
    return text[3:] if text.startswith("re:") else [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: Any) -> None:
    """One flag per TrainConfig field (--lora-r for lora_r); unset flags stay None so recipes apply."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.name == "lora_targets":
            parser.add_argument(flag, type=_targets, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if f.name in ("max_steps", "max_soft_tokens"):
                kind = int
            parser.add_argument(flag, type=kind, default=None, help=help_text)
