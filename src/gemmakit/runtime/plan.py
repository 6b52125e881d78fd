"""The runtime plan: every machine-specific choice for one engine, made once, with the reason for each.

An engine runs the same model on very different machines: a GPU, an AVX-512 server whose oneDNN packs bf16,
an AVX2 laptop whose oneDNN does not, an ARM board without oneDNN's x86 kernels, a machine with no C++
compiler for torch.compile. What is fastest, or possible at all, differs; the tokens must not. So the choices
live here, not spread over the model's modules:

| choice              | options                                  | decided by                                    |
|---------------------|------------------------------------------|-----------------------------------------------|
| weight layout       | oneDNN-packed / plain                    | `prepare_weights`, at load: CPU float models   |
|                     |                                          | whose dtype oneDNN really packs (probe.py)     |
|                     | plain fp32, decode rows on gemmakit's    | fp32 CPU models where gemmakit's AVX2 kernels  |
|                     | AVX2 kernel (GemvLinear)                 | are the decode products' choice (below)        |
|                     | fbgemm fp16 (HalfLinear); else plain,    | bf16 CPU models where oneDNN packs no bf16     |
|                     | bf16 prompts in fp32 (UpcastLinear)      | (fbgemm: x86 builds of torch)                  |
| compiled steps      | one-row + full-batch decode / eager      | asked for, and a compiler present (compiled.py)|
| head screen         | bf16 copy (plain / packed) / fbgemm fp16 | head dtype, soft-cap, packing, compile, and    |
|                     | copy / int8 (inductor, or gemmakit's     | whether bf16 products are fast here            |
|                     | AVX2 kernel; an int8 head's own codes;   | (screen.py); a quantized head on gemmakit's    |
|                     | an int4 head's copy; one-row steps: a    | AVX2 kernels, or a float head's int4 copy:     |
|                     | float head's int4 copy) / off            | both passes timed at start-up                  |
| int4 prompt unpack  | compiled bf16 unpack / int4 kernel       | compiled CPU engines with int4 linears        |
| decode products     | gemmakit's AVX2 kernels (several rows:   | whether ours build and agree here (x86 CPUs;  |
| (int4, int8, float) | AVX-512 / AMX builds where the CPU has   | int4 in torch's AVX2 packing only: gemv.py)   |
|                     | them; a packed bf16 model's 2-8 rows on  | AVX512_BF16 in the CPU, ATen at AVX-512, and  |
|                     | bf16 pairs) / torch's, oneDNN's, fbgemm's| the plain bf16 weights kept (compiled steps)  |
|                     | compiled one-row int8: inductor's fused  | with AVX-512 inductor code, both timed in a   |
|                     | reductions / gemmakit's kernel           | compiled graph at start-up (once a process)   |
| decode attention    | gemmakit's kernel, else SDPA (half       | the activation dtype, and per step the rows x |
|                     | precision; fp32 steps with as many row x | KV heads against the threads (model.attend); |
|                     | KV-head pairs as threads) / plain ops    | whether gemmakit's kernels build and agree    |
|                     | (narrower fp32 steps)                    |                                               |
| memory forecast     | what all of the above will hold          | cache.estimate_bytes                          |

`Plan.describe()` is the one line `gemmakit bench` and `gemmakit chat --verbose` print, with why each choice
fell as it did. docs/architecture.md explains the kernels behind each option.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gemmakit.cache import estimate_bytes
from gemmakit.media.towers import towers, workspace_bytes
from gemmakit.runtime import gemv
from gemmakit.runtime.compiled import compile_static, compile_supported, decomposes_head
from gemmakit.runtime.gemv import gemv_linears
from gemmakit.runtime.packing import (
    UPCAST_ROWS,
    HalfLinear,
    PackedLinear,
    UpcastLinear,
    bf16_pairs_take,
    half_linears,
    half_supported,
    pack_linears,
    packed_bytes,
    packing_supported,
    upcast_linears,
)
from gemmakit.runtime.probe import cpu_capability, inductor_isa, onednn_packs, wide_vectors
from gemmakit.runtime.screen import (
    QUARTER_GROUP,
    Int4Head,
    Int8Head,
    head_codes,
    head_weight,
    int4_head,
    interleaved_medians,
    quarter_timings,
    screen_bytes,
)

# A timed screen must beat the head by this factor: a tie is within the timing's noise (on CPU C held to AVX2 the
# int8 head's pass and kernel came out either way, run to run), and then the plan keeps the head.
_TIMED_MARGIN = 0.95
# gemmakit's int8 kernel must beat inductor's reductions by this factor in a compiled one-row step's products
# (`_int8_choice`): the reductions also fuse the ops around them there.
_KERNEL_MARGIN = 0.9
# Float linears whose decode rows gemmakit's AVX2 kernels can take, besides quantized ones (gemv.py; fp32
# ones are built taking them).
_GEMV_TAKES = (gemv.GemvLinear, HalfLinear)


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The activation dtype and device: those of the first floating-point parameter or buffer."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    raise ValueError("the model has no floating-point weights")


def model_bytes(model: nn.Module) -> int:
    """Memory the weights hold: parameters, buffers and packed copies (which are neither)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) + packed_bytes(model)


def quantization(model: nn.Module) -> str:
    """"int4", "int8" or "none", from the kinds of linear the model holds (int4 models keep some int8)."""
    kinds = {type(m).__name__ for m in model.modules()}
    return "int4" if "Int4Linear" in kinds else "int8" if "Int8Linear" in kinds else "none"


def prepare_weights(model: nn.Module, pack: bool | None, compile: bool) -> str:
    """Put `model`'s weights in the layout this machine runs fastest, at load time, and say what was done.
    `pack` None: pack CPU float models whose dtype oneDNN packs here, except fp32 ones where gemmakit's AVX2
    kernels are the decode products' choice (they keep the plain weights, gemv.py). `compile`: keep the plain layout too
    where compiled one-row steps stream it faster than oneDNN, which is where inductor turns one-row products
    into its own reductions (AVX-512 code: runtime/packing.py); elsewhere they would go to MKL's GEMV, slower
    than oneDNN's packed product, so the packed layout alone serves every step (and the plain copy's memory is
    saved)."""
    dtype, device = model_dtype_device(model)
    if pack is None:
        pack = device.type == "cpu" and quantization(model) == "none"
    if device.type == "cpu" and dtype == torch.bfloat16 and not onednn_packs(dtype):
        # No fast bf16 GEMM here (what oneDNN's failed bf16 reorder also tells): fbgemm's fp16 product where
        # torch has it (x86), and many-row products in fp32 for whatever it does not take.
        half = half_linears(model) if pack else 0
        upcast = upcast_linears(model)
        said = [f"{half} bf16 linears multiplied through fbgemm fp16" * bool(half),
                f"{upcast} bf16 linears multiply prompts in fp32" * bool(upcast)]
        return ", ".join(["plain layout", *filter(None, said)])
    if not pack:
        return "plain layout"
    if device.type == "cpu" and dtype == torch.float32 and _gemv_choice()[0]:
        # gemmakit's AVX2 kernel streams the plain fp32 weights faster at decode's few rows than oneDNN's
        # packed product (runtime/gemv.py); prompts keep torch's product on the same weights, no second copy.
        count = gemv_linears(model)
        return f"plain layout, decode rows of {count} fp32 linears on gemmakit's AVX2 kernel"
    if not packing_supported(torch.empty(0, dtype=dtype, device=device)):
        return f"plain layout (oneDNN cannot pack {_name(dtype)} on this {device.type})"
    keep_plain = compile and decomposes_head()
    pack_linears(model, keep_plain=keep_plain)
    return "oneDNN-packed" + (" + plain" if keep_plain else "")


@dataclass
class Plan:
    """The choices for one engine over one model (see the module docstring); `why` says what decided each."""

    device: str
    dtype: torch.dtype
    quantization: str
    packed: bool
    compiled: bool
    screen: tuple | None  # HeadScreen's (head, packed copy, plain copy, fp16, gemv kernel[, rows])
    decode_attention: str | int | Callable  # "sdpa", "plain", SDPA from this many (row, KV head) pairs, or a kernel
    # (model.attend)
    int4_unpack: bool
    int8_reduce_rows: int  # rows up to which compiled steps take int8 products as fused reductions (0: never)
    gemv_kernels: bool  # few-row CPU int4 / int8 / bf16 products on gemmakit's AVX2 kernels (gemv.py)
    forecast: dict[str, int] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the machine, then each choice and the reason it fell that way."""
        gib = self.forecast.get("total", 0) / 2**30
        machine = self.device if self.device != "cpu" else f"cpu ({cpu_capability()})"
        parts = [f"{machine} {_name(self.dtype)}, weights {self.quantization}",
                 *(f"{k}: {v}" for k, v in self.why.items()), f"memory forecast {gib:.2f} GiB"]
        return "plan: " + "; ".join(parts)


def make_plan(model: nn.Module, max_batch: int, context: int, compile: bool, screen: bool, slack: int = 8,
              prefill_chunk: int = 512) -> Plan:
    """Decide every machine-specific choice for an engine of `max_batch` rows and `context` tokens."""
    dtype, device = model_dtype_device(model)
    why: dict[str, str] = {}
    packed = isinstance(getattr(model, "lm_head", None), PackedLinear) or any(
        isinstance(m, PackedLinear) for m in model.modules())
    why["layout"] = "oneDNN-packed" if packed else "plain"
    if any(isinstance(m, gemv.GemvLinear) for m in model.modules()):
        why["layout"] += " (fp32 decode rows on gemmakit's AVX2 kernel)"
    if any(isinstance(m, HalfLinear) for m in model.modules()):
        why["layout"] += " + fbgemm fp16 (no fast bf16 GEMM here)"
    if any(isinstance(m, UpcastLinear) for m in model.modules()):
        why["layout"] += f" (bf16 products of {UPCAST_ROWS}+ rows in fp32: no fast bf16 GEMM here)"
    # Per-request LoRA adapters regroup rows every step and a padded full-batch step has rows no request owns:
    # the compiled graphs would recompile or misapply them, so steps stay eager (adapters.py).
    per_row_lora = bool(getattr(model, "adapter_names", ()))  # set by adapters.attach_adapters
    compiled = compile and compile_supported(device) and not per_row_lora
    why["compile"] = ("on" if compiled else "off (not asked)" if not compile
                      else "off (per-request LoRA adapters are attached)" if per_row_lora
                      else f"off (torch.compile cannot build for {device.type} here)")
    if compiled and device.type == "cpu" and not decomposes_head():
        why["compile"] += f" (one-row head product on torch's GEMV: inductor's {inductor_isa()} reduction is slower)"
    # The unpack feeds a bf16 GEMM: it pays where oneDNN has a fast bf16 path (AVX-512 and up), not on AVX2.
    int4_unpack = compiled and device.type == "cpu" and quantization(model) == "int4" and onednn_packs(torch.bfloat16)
    if quantization(model) == "int4" and device.type == "cpu":
        why["int4 prompts"] = ("compiled bf16 unpack" if int4_unpack else "int4 kernel (unpack needs compile)"
                               if not compiled else "int4 kernel (no fast bf16 GEMM here)")
    gemv_here, gemv_why = _gemv_choice() if device.type == "cpu" else (False, "")
    int8_reduce_rows = 0
    if compiled and quantization(model) != "none":
        int8_reduce_rows, why["int8 decode"] = _int8_choice(device, gemv_here)
    takers = quantization(model) != "none" or any(isinstance(m, _GEMV_TAKES) or (
        isinstance(m, PackedLinear) and gemv_here and bf16_pairs_take(m)) for m in model.modules())
    gemv_kernels = gemv_here and takers
    if device.type == "cpu" and takers:
        why["decode products"] = gemv_why
        # The same test `quantize.use_gemv_kernels` applies per linear: none passes where torch packs int4 for
        # AVX-512 (blocks of 64 rows), so every int4 weight stays on torch's kernel.
        int4 = [m for m in model.modules() if type(m).__name__ == "Int4Linear"]
        if gemv_here and int4 and not any(gemv.int4_fits(m.out_features, m.in_features, m.group_size) for m in int4):
            why["decode products"] += " (int4 weights stay on torch's kernel, in its packing for this CPU)"
    plan_of_screen, why["head screen"] = _screen_choice(model, max_batch, compiled, screen, packed, gemv_here)
    half = dtype in (torch.bfloat16, torch.float16)
    # The kernel reads fp32 and bf16 caches (float16 models are refused by the CLI, not by an Engine).
    decode_attention, why["decode attention"] = _attention_choice(device, half, gemv_here and dtype != torch.float16)
    plan = Plan(device.type, dtype, quantization(model), packed, compiled, plan_of_screen, decode_attention,
                int4_unpack, int8_reduce_rows, gemv_kernels, why=why)
    plan.forecast = forecast(model, plan, max_batch, context, slack, prefill_chunk)
    return plan


def _attention_choice(device: torch.device, half: bool, kernels: bool) -> tuple[str | int | Callable, str]:
    """One-query steps' kernel (model.attend). On CPUs where gemmakit's kernels build and agree, its decode
    attention kernel, which reads each key and value row once for every query head sharing it, in the cache's
    dtype: every step in half precision (it splits a narrow step's keys over the threads), fp32 steps whose
    (row, KV head) pairs fill the threads. Else SDPA in half precision, and in fp32 on CPU SDPA for those wide
    steps, which its kernel shares out whole. Narrower fp32 steps take plain ops, fused by inductor with the
    ops around them (docs/architecture.md, "Decode attention")."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and kernels and half:
        return gemv.attention, "gemmakit's kernel"
    if device.type == "cpu" and kernels:
        return (functools.partial(gemv.attention_from, threads),
                f"gemmakit's kernel for steps of {threads}+ row x KV-head pairs (the threads), else plain ops (fp32)")
    if half:
        return "sdpa", "SDPA (half precision)"
    if device.type != "cpu":
        return "plain", "plain ops (fp32)"
    return threads, f"SDPA for steps of {threads}+ row x KV-head pairs (the threads), else plain ops (fp32)"


def _int8_choice(device: torch.device, gemv_kernels: bool) -> tuple[int, str]:
    """(rows, why) for int8 products in compiled decode steps: gemmakit's AVX2 kernel where the plan took it
    (`_gemv_choice`), except one-row steps where inductor writes AVX-512 code and its reductions were timed no
    slower here (`_int8_one_row_timings`); else fused fp32 reductions that inductor vectorises, which read the
    codes near the memory bandwidth where its vectors are 512 bits wide on some CPUs (every row of a CPU decode
    step shares one pass; on CUDA only one row beats the kernel), but fall behind torch's int8 kernel on AVX2
    and narrower."""
    from gemmakit.quantize import REDUCE_ROWS

    if device.type == "cuda":
        return 1, "fused reduction for one row, kernel for more"
    if gemv_kernels and wide_vectors():
        # Where inductor writes AVX-512 code, its reductions stream int8 codes at the memory's speed on some
        # CPUs and well below it on others: timed. A tie goes to the reductions, which in a step also fuse the
        # ops around them and save a kernel call each, which the timing does not see.
        try:
            kernel, reduced = _int8_one_row_timings()
        except Exception as e:  # noqa: BLE001 - a failed timing costs speed only: keep the kernel, which ran
            return 0, f"gemmakit's AVX2 kernel (timing against inductor's reductions failed: {type(e).__name__})"
        said = f"timed here as kernel vs reductions: {1e3 * kernel:.2f} vs {1e3 * reduced:.2f} ms"
        if kernel < _KERNEL_MARGIN * reduced:
            return 0, f"gemmakit's AVX2 kernel ({said})"
        return 1, f"inductor's fused reductions for one row, gemmakit's AVX2 kernel for more ({said})"
    if gemv_kernels:
        return 0, "gemmakit's AVX2 kernel"
    if wide_vectors():
        return REDUCE_ROWS, f"fused reductions up to {REDUCE_ROWS} rows (AVX-512 code)"
    return 0, f"int8 kernel (inductor's {inductor_isa() or 'scalar'} reductions are slower)"


@functools.cache
def _int8_one_row_timings(copies: int = 4, shape: tuple[int, int] = (16384, 640)) -> tuple[float, float]:
    """Median seconds of `copies` one-row int8 products (distinct weights of `shape`, more bytes together than a
    CPU's last-level cache, as a step's layers are), each way compiled into one graph: on gemmakit's kernel,
    and as inductor's fused reductions (quantize.int8_matmul). Once per process: the CPU does not change."""
    from gemmakit.quantize import int8_matmul, small_row_reductions

    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen), torch.rand(shape[0], generator=gen))
               for _ in range(copies)]
    x = torch.randn(1, shape[1], generator=gen)

    def products(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        # The weights come in as inputs: a graph that closed over them would keep them alive with its cache.
        return [int8_matmul(x, q, s, gemv_rows=1, grid=True) for q, s in weights]  # as the layers take them

    def run(step: Callable, reductions: int) -> Callable[[], object]:
        def call() -> object:
            with small_row_reductions(reductions):  # read when the graph is traced, and by its guards
                return step(x, weights)
        return call

    return interleaved_medians(run(compile_static(products), 0), run(compile_static(products), 1), repeats=7)


def _gemv_choice() -> tuple[bool, str]:
    """(on, why) for gemmakit's own decode-step kernels (gemv.py), wherever they build and agree with the
    reference, AVX-512 CPUs included. On an AVX2 CPU torch's int4 / int8 kernels are bound by arithmetic and
    oneDNN's / fbgemm's float products stream below the bandwidth; on an AVX-512 + AMX Xeon inductor's int8
    reductions and oneDNN's packed fp32 product ran below it too, and these streamed the same weights faster
    (docs/performance.md, "CPU C with gemmakit's kernels"). int4 weights that torch packed in its AVX-512
    layout (the kernel reads the AVX2 one) stay on torch's int4 kernel, which streams them fast there.
    `GEMMAKIT_GEMV=off` keeps torch's kernels everywhere."""
    if problem := gemv.unavailable():
        return False, f"torch's kernels ({problem})"
    wide = "; several rows in their AVX-512 build" if gemv.vector_width() == 512 else ""
    wide += " (bf16 x bf16 on AVX512_BF16)" if gemv.bf16_pairs() else ""
    return True, (f"gemmakit's AVX2 kernels (up to {gemv.INT4_ROWS} rows; int4 and int8 layers take x on a "
                  f"14-bit grid{wide})")


def _screen_choice(model: nn.Module, max_batch: int, compiled: bool, wanted: bool, packed: bool,
                   gemv_kernels: bool = False) -> tuple[tuple | None, str]:
    """(HeadScreen arguments or None, why): with gemmakit's AVX2 kernels an int8 copy of a float head, or an
    int8 head's own codes, read by them at every step of up to `gemv.INT8_ROWS` rows; else a plain copy serves
    compiled one-row steps, oneDNN's packed copy every other step, and only float32 heads of packed models get
    one (bf16 heads: no int8 kernel beats oneDNN's bf16 one on several rows, and inductor's int8 pass beats it
    on one row only with AVX-512)."""
    if not wanted:
        return None, "off (asked)"
    dtype = model_dtype_device(model)[0]
    if gemv_kernels and (weight := head_weight(model)) is not None:
        return _float_head_screen(weight, max_batch)
    if gemv_kernels and (codes := head_codes(model, dtype)) is not None:
        # An int8 head's screen is its own codes through the same pass: no copy, and where the pass has its
        # AVX-512 VNNI or AMX build, it outruns the head's fp32 multiply-adds at a batch step's several rows.
        # The AVX2 pass only tied the int8 kernel on CPU C held to AVX2 (docs/performance.md): timed here.
        if gemv.vector_width() < 512:
            return _timed_screen(codes, max_batch, "the int8 head's own codes",
                                 "an int8 head on gemmakit's AVX2 kernel", "the screen")
        return (codes, False, False, False, True), f"the int8 head's own codes ({_screen_kernel(max_batch)})"
    if gemv_kernels and (head := int4_head(model, dtype)) is not None:
        if gemv.int4_fits(head.head.out_features, head.head.in_features, head.head.group_size):
            return _timed_screen(head, max_batch, "int8 copy of the int4 head",
                                 "an int4 head on gemmakit's AVX2 kernel", "the copy")
        if gemv.screen_amx() and max_batch > 1:
            # An int8 copy of an int4 head (its bytes again, twice over): on AMX its pass at a batch step's rows
            # is bound by reading it, where torch's int4 kernel is bound by multiply-adds; one-row steps read the
            # int4 head, which that kernel streams.
            return (head, False, False, False, True), (f"int8 copy of the int4 head for steps of "
                                                       f"2-{gemv.INT8_ROWS} rows (gemmakit's AMX pass)")
        if max_batch > 1:
            # Without AMX the pass's 16-bit multiply-adds race torch's int4 kernel widening codes to floats at
            # a batch's rows, and which wins depends on the CPU's vector units: timed. One row always reads the
            # int4 head, half the copy's bytes.
            return _timed_screen(head, max_batch, "int8 copy of the int4 head", "an int4 head on torch's kernel",
                                 "the copy", one_row=False)
    if isinstance(getattr(model, "lm_head", None), HalfLinear):
        # Its int8 copy would be read by torch's int8 kernel or inductor's AVX2 code: no faster than fbgemm.
        return None, "off (the bf16 head streams through fbgemm fp16)"
    weight = head_weight(model)
    if weight is None:
        return None, "off (no tied float head it applies to)"
    if weight.dtype == torch.float32 and not onednn_packs(torch.bfloat16) and half_supported(weight):
        # No fast bf16 product here, but fbgemm's fp16 one streams the half-size copy at any row count.
        return (weight, False, False, True, False), "fp16 copy (fbgemm, every step)"
    if weight.dtype != torch.float32 and not wide_vectors():
        # A bf16 head's copy is int8, read by inductor's int8 reductions: slower than the full bf16 head
        # where vectors are narrower than AVX-512 (the int8 decode choice above, measured the same way).
        return None, f"off (int8 copy: inductor's {inductor_isa() or 'scalar'} reductions are slower)"
    packed_copy = (weight.dtype == torch.float32 and packed and (max_batch > 1 or not compiled)
                   and onednn_packs(torch.bfloat16))
    if not (packed_copy or compiled):
        reason = ("oneDNN cannot pack bf16 here" if weight.dtype == torch.float32 and packed
                  else "needs a packed fp32 model or a compiled step")
        return None, f"off ({reason})"
    copy = "bf16" if weight.dtype == torch.float32 else "int8"
    layouts = [name for name, on in (("plain", compiled), ("packed", packed_copy)) if on]
    return (weight, packed_copy, compiled, False, False), f"{copy} copy ({' + '.join(layouts)})"


def _float_head_screen(weight: torch.Tensor, max_batch: int) -> tuple[tuple, str]:
    """(HeadScreen arguments, why) for a float head on gemmakit's AVX2 kernels: an int8 copy read at every step
    of up to `gemv.INT8_ROWS` rows, except that one-row steps read an int4 copy where this CPU packs the head's
    shape for gemmakit's int4 kernel and that pass timed faster here (`quarter_timings`): it reads 5/8 of the
    bytes, and its wider bound leaves most rows to settle from a few thousand exact rows (screen.py). An
    engine of one row then keeps no int8 copy."""
    int8 = (weight, False, False, False, True), f"int8 copy ({_screen_kernel(max_batch)})"
    if not gemv.int4_fits(*weight.shape, QUARTER_GROUP):
        return int8
    int8_pass, int4_pass = quarter_timings(weight)
    said = f"one row {1e3 * int4_pass:.1f} vs {1e3 * int8_pass:.1f} ms"
    if int4_pass >= _TIMED_MARGIN * int8_pass:
        return int8[0], f"{int8[1][:-1]}; an int4 copy's pass timed no faster here, {said})"
    rows = (1, min(max_batch, gemv.INT8_ROWS))
    more = "" if rows[1] == 1 else f", int8 copy for steps of {'2' if rows[1] == 2 else f'2-{rows[1]}'} rows"
    return (weight, False, False, False, True, rows, None, True), (
        f"int4 copy for one-row steps{more} (gemmakit's AVX2 kernels; the int4 pass timed here as {said})")


def _timed_screen(head: Int4Head | Int8Head, max_batch: int, screen: str, kind: str,
                  short: str, one_row: bool = True) -> tuple[tuple | None, str]:
    """(HeadScreen arguments or None, why) for a quantized head whose screening pass wins or loses against the
    head's own kernel by how the CPU's multiply-adds compare with its bandwidth (`head.timings`). Both are timed
    here, at one row (unless `one_row` is False: then one-row steps keep the head) and at the engine's batch, and
    the screen serves the step sizes where it won by more than the timing's noise (`_TIMED_MARGIN`); a batch's
    timing stands for every step of several rows. The tokens are the same either way (the screen certifies each
    pick), so only the speed rests on the timing."""
    sizes = sorted({*([1] * one_row), min(max_batch, gemv.INT8_ROWS)})
    timed = {rows: head.timings(rows) for rows in sizes}
    said = ", ".join(f"{rows} row{'s' * (rows > 1)} {1e3 * fast:.1f} vs {1e3 * full:.1f} ms"
                     for rows, (full, fast) in timed.items())
    won = [rows for rows, (full, fast) in timed.items() if fast < _TIMED_MARGIN * full]
    if not won:
        return None, f"off ({kind}: {short}'s pass timed no faster, {said})"
    span = (1 if 1 in won else 2, gemv.INT8_ROWS if max(won) > 1 else 1)
    steps = "one-row steps" if span == (1, 1) else f"steps of {span[0]}-{span[1]} rows"
    return (head, False, False, False, True, span), (f"{screen} for {steps} (gemmakit's AVX2 kernel, timed here "
                                                     f"as {short.removeprefix('the ')} vs head: {said})")


def _screen_kernel(max_batch: int) -> str:
    grid = f"; x on 8 bits from {gemv.BYTES_FROM} rows" if gemv.screen_bits(max_batch) == 8 else ""
    return f"gemmakit's AVX2 kernel, up to {gemv.INT8_ROWS} rows{grid}"


def forecast(model: nn.Module, plan: Plan, max_batch: int, context: int, slack: int = 8,
             prefill_chunk: int = 512) -> dict[str, int]:
    """What an engine under `plan` will hold (cache.estimate_bytes), screen and compiled code included."""
    from gemmakit.quantize import prompt_unpack_shapes

    kernels = len(prompt_unpack_shapes(model)) if plan.int4_unpack else 0
    out = estimate_bytes(model.config, max_batch, context, plan.dtype, model_bytes(model), slack, prefill_chunk,
                         compiled=plan.compiled, device_type=plan.device, unpack_kernels=kernels,
                         head_screen=screen_bytes(*plan.screen) if plan.screen else 0)
    # Image / audio towers (their weights are in "weights"): one request's tower pass runs before its prefill.
    if tower_work := workspace_bytes(model) if towers(model) else 0:
        out = {**out, "towers": tower_work, "total": out["total"] + tower_work}
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
