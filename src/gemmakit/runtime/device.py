"""Which device and dtype a model runs in: `--device auto` and the dtypes Gemma can use on each device.

- "auto" is the first CUDA device when torch sees one, else the CPU.
- float16 is refused: Gemma's residual stream and its embedding scale (sqrt(hidden) times the table) reach
  magnitudes past float16's 65504 in real checkpoints, which turns into inf and then NaN logits; bfloat16 has
  float32's range at the same size.
- bfloat16 on a GPU that has no bf16 arithmetic (before NVIDIA's Ampere) is refused too, and "auto" picks
  float32 there; on CPU bfloat16 always works (oneDNN's fast bf16 paths are probed separately, probe.py).
"""

from __future__ import annotations

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str | torch.device | None) -> str:
    """"auto" (or None): "cuda" where a CUDA device is usable, else "cpu"; any other name as torch reads it."""
    if name is None or str(name) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asks for CUDA, but torch sees no CUDA device here: use --device cpu "
                         "(or auto)")
    return str(device)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The weights' dtype for `name` on `device`: "auto" is bfloat16 on a GPU with bf16 arithmetic, else float32
    (on CPU float32 is the fastest dense path); see the module docstring for what is refused and why."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    cuda = torch.device(device).type == "cuda"
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if cuda and bf16_ok else torch.float32
    if name == "float16":
        raise ValueError("float16 is not supported: Gemma's activations overflow its range (inf, then NaN "
                         "logits); use bfloat16 (same size, float32's range) or float32")
    if name == "bfloat16" and not bf16_ok:
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 arithmetic; use "
                         "--dtype float32")
    return getattr(torch, name)
