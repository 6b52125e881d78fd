"""What this machine can really run, asked of the libraries at run time rather than read off CPU flags.

Why probe. CPU flags say what the silicon has, not what a given torch / oneDNN build will use: oneDNN can be
held below the hardware (`ONEDNN_MAX_CPU_ISA`), ATen's kernels likewise (`ATEN_CPU_CAPABILITY`), and some
kernels refuse a dtype on a CPU class they were not written for (oneDNN's bf16 weight reorder needs
AVX-512 or AVX-NE-CONVERT and raises elsewhere). So each fast path is tried once, on a tiny input, inside a
`try`; a path that fails is recorded as missing and the caller takes its fallback. A missing feature costs
speed, never correctness: nothing here raises.

Results are cached per process (the answer cannot change while it runs) and listed by `report()`; the
runtime plan's one line (`gemmakit bench`, `gemmakit chat --verbose`) names ATen's level and every probe that
changed one of its choices.
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


@functools.cache
def fbgemm_fp16() -> bool:
    """Whether fbgemm (x86 builds of torch) can pack fp16 linear weights and multiply fp32 rows by them here,
    rounding weights to fp16 exactly as torch does (halfway cases, subnormals): the head screen's bound is
    computed from torch's rounding of the weight."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    w = torch.ones(16, 32)
    w[0] = torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-20, 3e-8, 2.0**-25, -1e-7, 0.1, -0.3] * 4)
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        y = torch.ops.quantized.linear_dynamic_fp16(torch.ones(2, 32), packed)
        held = torch.ops.quantized.linear_unpack_fp16(packed)[0]
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return y.shape == (2, 16) and bool((y[:, 1:] == 32).all()) and torch.equal(held, w.half().float())


def cpu_capability() -> str:
    """ATen's CPU kernel level in use (e.g. "AVX512", "AVX2", "DEFAULT"; ARM: "DEFAULT" or "SVE256")."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


@functools.cache
def inductor_isa() -> str:
    """The vector instruction set inductor generates CPU code for here ("avx512", "avx2", "asimd", ...; "" if
    none). It follows ATEN_CPU_CAPABILITY, so a run held to AVX2 compiles AVX2 code as an AVX2 CPU would."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()).split()[0] if pick_vec_isa() else ""
    except Exception:  # a private module: any failure means "unknown", never a crash
        return ""


def wide_vectors() -> bool:
    """Whether inductor's CPU code runs on 512-bit vectors (AVX-512). On narrower ISAs its code for int8
    dequantize-and-reduce loops is slower than torch's int8 kernel (benchmarks/profile_decode.py shows it),
    so the plan keeps the kernel there."""
    return inductor_isa().startswith("avx512")


def report() -> dict[str, object]:
    """Every probe's answer, for the one-line description of a runtime plan."""
    return {"aten": cpu_capability(), "inductor": inductor_isa(), "onednn_fp32_pack": onednn_packs(torch.float32),
            "onednn_bf16_pack": onednn_packs(torch.bfloat16), "fbgemm_fp16": fbgemm_fp16()}
