"""torch.compile for the decode step: when it is used, and the one inductor setting that makes it pay on CPU.

Why compile at all. A single-sequence decode step is ~130 small kernels whose launch overhead is larger than
their work, plus matrix-vector products. On CPU the second part dominates: MKL's GEMV for [1, H] x [N, H]^T
streams weights at a fraction of the machine's memory bandwidth. Inductor can instead lower a one-row matmul
to a fused multiply + row reduction that it vectorises itself, which reaches the bandwidth roofline
(docs/performance.md, "Compiled decode steps", has both rates on the tied 262k x 640 output head). Its
`decompose_mm_pass` does exactly that, but by default only for matrices up to 2048 wide, which excludes the
vocabulary head that is half of the weights; `configure_inductor` lifts that bound where inductor's vectors
are 512 bits wide (`decomposes_head`). On AVX2 its reduction over the head is slower than torch's GEMV, in
fp32 and bf16 alike (docs/performance.md, "AVX2-only CPUs"), so the bound stays.

What is compiled. Decode steps of one row (the latency case) and of every row of the engine at once (the
throughput case), with static shapes. Not prefill: prompt lengths vary, and each would be a new graph. The
batch sizes in between would be a graph each; the engine runs them through the full-batch graph instead,
with throw-away rows (`Runtime._padded`, steps.py). On CUDA the same steps are compiled with inductor's CUDA
graphs (what `mode="reduce-overhead"` turns on), i.e. replayed as one graph launch each; the cache tensors they
write are marked static so the graphs may mutate them in place. A small model's step there is latency-bound,
so replaying it as one launch is most of the gain over eager (benchmarks/cuda_engine.py measures it;
docs/performance.md, "The engine on a GPU"). Besides the steps, `compile_static` builds one small kernel per
weight shape that compiled engines use for prompts: quantize.py's int4 unpack, a loop eager ops cannot match.

Compilation costs tens of seconds once per process and shape (inductor's on-disk cache makes later runs
faster), too long for a chat prompt that should be ready in seconds: the CLI compiles for `bench` and long
`generate` runs, not for `chat`, unless `--compile on|off` (or GEMMAKIT_COMPILE) says otherwise, and it is
skipped where it cannot work (no C++ compiler on a CPU-only machine).
"""

from __future__ import annotations

import os
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from gemmakit.files import cache_dir
from gemmakit.runtime.probe import inductor_isa, wide_vectors

# Wide enough for any vocabulary head: decompose every one-row matmul.
_MAX_DECOMPOSED_WIDTH = 1 << 22


def compile_supported(device: torch.device | str) -> bool:
    """Whether torch.compile can build kernels for `device` here (CPU: a C++ compiler; CUDA: triton)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if device.type == "cpu":
        return sys.platform.startswith("linux") and any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    return False


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels: the user's TORCHINDUCTOR_CACHE_DIR if they chose one, else
    ~/.cache/gemmakit/inductor/<vector ISA>, which survives reboots (inductor's default is under /tmp).

    One directory per instruction set because inductor's cache does not key its entries by the ISA it
    generated code for: a kernel cached by an AVX-512 run was handed to a later run held to AVX2 (a home
    directory shared by two machine classes, or CI's second pass) and computed garbage there
    (tests/test_compiled.py::test_kernels_cached_for_one_isa_are_not_reused_under_another)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = cache_dir("inductor").resolve()
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Not a choice: inductor's /tmp default (importing inductor writes it into the variable), or a directory
    # of ours that a parent process of another ISA passed on in its environment.
    if chosen and Path(chosen).resolve() != Path(default_cache_dir()).resolve() \
            and Path(chosen).resolve().parent != root:
        return chosen
    return str(root / (inductor_isa() or "generic"))


def decomposes_head() -> bool:
    """Whether compiled CPU steps take one-row matmuls of any width, the vocabulary head's included, as
    inductor's fused reductions (AVX-512 code), or leave those wider than inductor's bound to torch's GEMV."""
    return wide_vectors()


def configure_inductor() -> None:
    """Use a cache directory of this ISA, and where it pays (`decomposes_head`) let inductor turn one-row
    matmuls of any width into fused multiply-reductions (see the module docstring)."""
    import torch._inductor.config as inductor_config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
    if not decomposes_head():
        return

    options = dict(inductor_config.post_grad_fusion_options)
    options["decompose_mm_pass"] = {"cpu_max_other_dimension_decomposition": _MAX_DECOMPOSED_WIDTH}
    inductor_config.post_grad_fusion_options = options
    # The pass reads its bounds into module globals when first imported; keep them in step if it already was.
    module = sys.modules.get("torch._inductor.fx_passes.decompose_mem_bound_mm")
    if module is not None:
        module.cpu_max_other_dimension_decomposition = _MAX_DECOMPOSED_WIDTH


def compile_decode(fn: Callable, device: torch.device | str, static_tensors: list[torch.Tensor]) -> Callable:
    """`fn` compiled for static shapes; on CUDA as a CUDA graph over the (static) cache tensors it writes.

    The guards dynamo re-checks on every call for the model's modules and parameters are dropped: on CPU they
    cost a noticeable part of a small model's step (on a GPU, where a replayed step is short, a larger share),
    and an engine's model is fixed once the engine is built. Hence the rule: quantize or otherwise change the
    model before building a compiled `Engine`.
    Dynamo keeps its graphs per code object, so `fn` is compiled as a copy with a code object of its own: two
    engines of one process never try each other's graphs (whose guards would look for another model's modules).
    """
    configure_inductor()
    fn = _own_code(fn)
    options: dict = {}
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip:
        options["guard_filter_fn"] = skip
    if torch.device(device).type == "cuda":
        for t in static_tensors:
            torch._dynamo.mark_static_address(t)
        options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets (the two cannot be combined)
    return torch.compile(fn, dynamic=False, options=options or None)


def compile_static(fn: Callable) -> Callable:
    """`fn` compiled for static shapes, with a code object of its own: a kernel built per weight shape keeps
    its graph in its own cache, never counting against dynamo's recompile limit for one function."""
    configure_inductor()
    return torch.compile(_own_code(fn), dynamic=False)


def _own_code(fn: Callable) -> Callable:
    """`fn` (a function or bound method) rebuilt around a fresh copy of its code object."""
    func = getattr(fn, "__func__", fn)
    fresh = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                               func.__closure__)
    fresh.__kwdefaults__ = func.__kwdefaults__
    return types.MethodType(fresh, fn.__self__) if hasattr(fn, "__self__") else fresh
