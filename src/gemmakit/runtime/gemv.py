"""Decode-step products with int4 / int8 weights on AVX2 CPUs: gemmakit's own kernels (`gemv_avx2.cpp`).

Why our own. A quantized one-row decode step is nearly all weight reading, so its kernels should run at the
memory's speed. torch's CPU int4 and int8 kernels do on AVX-512, but their AVX2 builds are bound by arithmetic
instead: on such CPUs they took most of an int4 step (docs/performance.md, "A real AVX2 CPU"). The kernels
here do the same sums with the work arranged for 256-bit vectors: the int4 one reads torch's own packing
(blocks of 32 rows, [K, 16] bytes each), so one 16-byte load is one input for 32 outputs and the kernel
vectorises over rows (several rows of x widen each code once); the int8 one runs along K, eight weight rows
sharing each load of x and eight streams of codes in flight. Activations stay fp32 (torch's kernels round
them to bf16), so the result is the dequantized product in another summation order: the same maths, rounded
less.

Only a decode step's few rows come here (up to `INT4_ROWS` / `INT8_ROWS`, a batch-8 step): for several rows
of x each code is widened once and serves them all, which beats torch's kernels there too on cold weights
(benchmarks/cpu_products.py); prompts keep the plan's GEMM paths.

The C++ is built at run time with torch's extension builder, once per machine, torch version and kernel
source (kept in `~/.cache/gemmakit/kernels`), and only on x86 CPUs where ATen runs AVX2 or wider. Anything
that stops it (no compiler, a failed build, a result that disagrees with the reference on a probe) leaves
torch's kernels in place and says why (`unavailable()`); it never raises. `GEMMAKIT_GEMV=off` turns the
kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

from gemmakit.quantize_codes import (
    cpu_int4_block_rows,
    dequantize_int4,
    quantize_int4,
    quantize_int4_packed,
    quantize_int8,
)
from gemmakit.runtime.probe import cpu_capability

_SOURCE = Path(__file__).with_name("gemv_avx2.cpp")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for in the kernels splits rows by it
_NAME = "gemmakit_gemv_avx2"
BLOCK_ROWS = 32  # rows per block of torch's AVX2 int4 packing, the only layout the int4 kernel reads
INT4_ROWS = INT8_ROWS = 8  # products of up to this many rows go to the kernels (a batch-8 decode step)
_registered = False  # whether the ops' shape functions (for torch.compile) are registered


@functools.cache
def unavailable() -> str | None:
    """None where the kernels are built and checked here, else why not (for the plan's one line)."""
    if os.environ.get("GEMMAKIT_GEMV", "").lower() in ("0", "off", "false", "no"):
        return "GEMMAKIT_GEMV=off"
    if platform.machine().lower() not in ("x86_64", "amd64") or cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs an x86 CPU where ATen runs AVX2 (here: {platform.machine()}, {cpu_capability()})"
    try:
        _build()
    except Exception as e:  # no compiler, headers or ninja: torch's kernels remain, so say why and go on
        return f"could not build gemmakit's AVX2 kernels ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None if _agrees() else "gemmakit's AVX2 kernels disagree with the reference here"


def _build() -> None:
    from torch.utils.cpp_extension import load

    ninja = _ninja_dir()
    path = os.environ.get("PATH", "")
    if ninja and ninja not in path.split(os.pathsep):
        os.environ["PATH"] = ninja + os.pathsep + path  # the pip `ninja` package puts its binary here
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemmakit" / "kernels"
    # Keyed by what goes into the build, so a changed kernel or torch builds afresh (and says so).
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:12]
    where = cache / f"torch-{torch.__version__}-{key}"
    where.mkdir(parents=True, exist_ok=True)
    if not (where / f"{_NAME}.so").exists():
        print("gemmakit: building its AVX2 int4/int8 kernels (once per machine and torch version)...",
              file=sys.stderr, flush=True)
    load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
         build_directory=str(where), is_python_module=False, verbose=False)
    global _registered
    if not _registered:  # once per process, however often the probe is asked again
        for op in ("int4_gemv", "int8_gemv"):
            torch.library.register_fake(f"gemmakit_avx2::{op}")(_fake)
        _registered = True


def _ninja_dir() -> str | None:
    try:
        import ninja

        return ninja.BIN_DIR
    except (ImportError, AttributeError):
        return None


def _fake(x: Tensor, weight: Tensor, *rest: object) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _agrees() -> bool:
    """Both kernels against the dequantized fp32 product, one row and three (their two paths), on shapes with
    every tail the kernels handle."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 96, generator=g), torch.randn(3, 96, generator=g)
    q, s = quantize_int8(w[:61, :93], torch.float32)  # 61 rows, 93 inputs: the row and K tails
    products = [(int8, (q, s), q.float() * s[:, None], 93)]
    if cpu_int4_block_rows(96) == BLOCK_ROWS:
        packed, sz, _ = quantize_int4_packed(w, 32)
        products.append((functools.partial(int4, group=32), (packed, sz), dequantize_int4(*quantize_int4(w, 32)), 96))
    return all(torch.allclose(kernel(rows[:, :k], *operands), rows[:, :k] @ weight.T, rtol=1e-4, atol=1e-4)
               for kernel, operands, weight, k in products for rows in (x[:1], x))


def int4(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group: int) -> Tensor:
    """x [M, K] @ W^T for W in torch's AVX2 int4 packing (`packed` [N, K/2], N a multiple of 32), fp32 out."""
    return torch.ops.gemmakit_avx2.int4_gemv(x.float().contiguous(), packed, scales_and_zeros, group)


def int8(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ (q [N, K] * scales[:, None])^T, fp32 out."""
    return torch.ops.gemmakit_avx2.int8_gemv(x.float().contiguous(), q, scales)


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether an int4 weight of this shape is packed in the layout the int4 kernel reads."""
    return out_features % BLOCK_ROWS == 0 and group % 8 == 0 and cpu_int4_block_rows(in_features) == BLOCK_ROWS
