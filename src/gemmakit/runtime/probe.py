"""What this machine can really run, asked of the libraries at run time rather than read off CPU flags.

Why probe. CPU flags say what the silicon has, not what a given torch / oneDNN build will use: oneDNN can be
held below the hardware (`ONEDNN_MAX_CPU_ISA`), ATen's kernels likewise (`ATEN_CPU_CAPABILITY`), and some
kernels refuse a dtype on a CPU class they were not written for (oneDNN's bf16 weight reorder needs
AVX-512 or AVX-NE-CONVERT and raises elsewhere). So each fast path is tried once, on a tiny input, inside a
`try`; a path that fails is recorded as missing and the caller takes its fallback. A missing feature costs
speed, never correctness: nothing here raises.

Results are cached per process (the answer cannot change while it runs) and can be listed with `report()`,
which `gemmakit bench` and `gemmakit chat --verbose` print in the runtime plan's line.
"""

from __future__ import annotations

import functools

import torch

# Row count oneDNN chooses a packed layout for: the same one packing.py uses, so the probe runs the same path.
_LAYOUT_ROWS = 8


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can reorder a linear weight of `dtype` into its blocked layout and multiply by it here."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(16, 32, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _LAYOUT_ROWS)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 32, dtype=dtype), packed, None, "none", [], "")
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return y.shape == (2, 16) and bool((y.float() == 32).all())


def cpu_capability() -> str:
    """ATen's CPU kernel level in use (e.g. "AVX512", "AVX2", "DEFAULT"; ARM: "DEFAULT" or "SVE256")."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


def report() -> dict[str, object]:
    """Every probe's answer, for the one-line description of a runtime plan."""
    return {"aten": cpu_capability(), "onednn_fp32_pack": onednn_packs(torch.float32),
            "onednn_bf16_pack": onednn_packs(torch.bfloat16)}
