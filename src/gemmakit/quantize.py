"""Weight-only int8 / int4 quantization of a loaded Gemma, on PyTorch's packed CPU and CUDA kernels.

`quantize_model(model, "int8" | "int4", group_size=32)` works in place:
- every `nn.Linear` under `model.model` (attention, MLP, PLE projections) becomes an `Int8Linear` or `Int4Linear`
  under the same name, so `model.layers.3.self_attn.q_proj` still reads the same. The MoE router stays in full
  precision: it is 0.1% of an MoE layer, and a flipped top-k choice costs more than that saves; under int4,
  attention's `v_proj` stays int8 (`INT8_UNDER_INT4`: the most sensitive kind, and a small one);
- MoE `Experts` become `QuantizedExperts`: int8 per output channel, or under int4 each expert's matrix in
  int4 groups where the kernel takes its shape (the experts are nearly all of a 26B-A4B's bytes, so int4 is
  what lets it fit in the memory of the machines people run it on);
- the tied head becomes `model.lm_head`, and the embedding table a `QuantizedEmbedding` built from the *same*
  quantized tensors (int8: shared storage; int4 on CPU: the head's packed codes, read in place through the
  layout `cpu_int4_layout` finds; elsewhere a nibble copy of the codes with shared scales and zeros), so the tie
  survives and the vocabulary (~60% of the 270M model) is stored once. The E-series PLE table becomes int8 rows.

Formats (`quantize_codes.py` fits and packs the codes). All quantized tensors are buffers, so `.to()`,
`state_dict()` and the remaining fp parameters behave. int8 runs `torch._weight_int8pack_mm(x, q, s)` with x
and s of one dtype; int4 runs the tinygemm kernels, whose packing belongs to one device type: quantize after
moving the model. Weights int4 cannot take (`int4_problem`) fall back to int8.

Activations go through the kernels in bf16, cast in and out: on CPU the kernels' fp32 paths are several times
slower and CUDA's int4 kernel takes bf16 only, and bf16 rounding (~0.3%) is small next to the weight
quantization error. Scales are rounded to bf16 *before* the codes are chosen, so the codes fit the scale the
kernel actually uses.
Exceptions, both int8: a compiled one-row step (and on CPU one of up to `REDUCE_ROWS` rows) skips the kernel
for fp32 reductions, and on CPU a product of `UNPACK_ROWS` rows or more (a prompt) casts the weight to bf16
for oneDNN's GEMM, which is faster than the kernel there (`int8_matmul`). int4 prompts do the same in compiled
engines only (`compile_prompt_unpack`): the unpack pays only as one compiled loop, and eager engines should
not load the compiler, and hold its resident memory, for it; unpacked with eager ops, the codes cost more than
the GEMM saves at all but the largest prompt chunks.

Hooks in model.py: `Gemma.forward` calls `self.lm_head(x)` when it is set, and `scaled_embedding` takes a
`QuantizedEmbedding`'s dtype from `table.dtype` (it has no `.weight`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.model import Experts, Gemma, Router
from gemmakit.quantize_codes import (
    COMPUTE_DTYPE,
    GROUP_SIZES,
    _block_rows,
    _int8_dtype,
    cpu_int4_block_rows,
    cpu_int4_layout,
    int4_kernel_operands,
    int4_problem,
    quantize_int4_packed,
    quantize_int8,
    unpack_int4_transposed,
)
from gemmakit.runtime import gemv
from gemmakit.runtime.packing import HalfLinear, PackedLinear, bf16_pairs_take
from gemmakit.runtime.probe import onednn_packs

MODES = ("int8", "int4")
# Linears that stay int8 when the model is quantized to int4. Attention's value projection is the most
# sensitive kind per byte on Gemma 3 270M (rounded alone to int4 it raises the perplexity of
# benchmarks/quant_quality.py more than any other kind) and 3% of the layers' weights, so int8 there adds
# little to the bytes a decode step reads and lowers `--quantize int4` perplexity (docs/performance.md,
# "Quantization"). llama.cpp's Q4_K_M mix makes the same call for half of its attn_v matrices.
INT8_UNDER_INT4 = frozenset({"v_proj"})
# Rows from which casting an int8 weight to bf16 for oneDNN's GEMM beats the CPU int8 kernel, which redoes the
# dequantization in fp32 for every few rows (docs/performance.md, "Quantization", has the timings), and the
# largest weight (elements) cast that way.
UNPACK_ROWS = 64
# Rows up to which a compiled CPU int8 product is one fused reduction per row (`_reduce_rows`): every decode
# step of an engine of up to 8 rows. Each row is an accumulator in the generated loop, so far more rows would
# spill registers; at 16 rows the reduction still beats the kernel on the 262k head, but by less.
REDUCE_ROWS = 8
_UNPACK_MAX = 1 << 24



@functools.cache
def _unpacker(out_features: int, in_features: int, group_size: int) -> Callable:
    from gemmakit.runtime.compiled import compile_static

    return compile_static(unpack_int4_transposed)  # a graph of its own per weight shape


def compile_prompt_unpack(model: nn.Module) -> int:
    """Give `model`'s CPU `Int4Linear`s a compiled unpack for prompts; return how many kernels that makes
    (one per weight shape: each keeps compiled state resident, which the forecast counts as
    `cache.UNPACK_KERNEL_BYTES`).

    The CPU int4 kernel multiplies at the fp32 FMA rate whatever the rows, while oneDNN's bf16 GEMM speeds up
    with them and is well ahead by prefill's row counts. So from `UNPACK_ROWS` rows a linear unpacks its codes
    to a bf16 W^T (`unpack_int4_transposed`, compiled) and takes the GEMM, which beats the kernel from there on
    every weight shape of the 270M except k_proj, 256 wide, which loses a little just above `UNPACK_ROWS`
    (benchmarks/int4_prompt.py measures each shape at several row counts). Compiled engines call this; eager
    ones do not, because the compiler's resident state (`cache.COMPILED_BYTES`) is only paid for where it
    already is.
    """
    for m, rows in _unpackable(model):
        m.unpack_rows = rows
        m.unpack = _unpacker(m.out_features, m.in_features, m.group_size)
    return len(prompt_unpack_shapes(model))


def use_gemv_kernels(model: nn.Module) -> int:
    """Send `model`'s few-row CPU int4 / int8 / fbgemm-fp16 products (decode steps) to gemmakit's AVX2 kernels
    (runtime/gemv.py; the caller checks they are available), up to `gemv.INT4_ROWS` / `INT8_ROWS` /
    `FLOAT_ROWS` rows. int4 weights go there only where they are packed in the layout the kernel reads; an
    fbgemm linear only over a bf16 weight (the kernel reads it in place); a oneDNN-packed bf16 linear's batch
    rows where the kernels' AVX512_BF16 tiles run and it keeps its plain weight; int8 layers up to
    `gemv.GRID_FULL_K` inputs with x on the screen's integer grid (`gemv.int8_grid`), an int8 head and wider
    layers with fp32 x. Returns how many linears that covers
    (`gemv.GemvLinear`s are built taking them)."""
    chosen = 0
    for m in model.modules():
        if (isinstance(m, HalfLinear) and m.weight.dtype == torch.bfloat16) or (
                isinstance(m, PackedLinear) and bf16_pairs_take(m)):
            m.gemv_rows = gemv.FLOAT_ROWS
        elif isinstance(m, Int8Linear) and m.weight.device.type == "cpu":
            m.gemv_rows = gemv.INT8_ROWS
            # Layers take x on the screen's integer grid (gemv.int8_grid) where it keeps its 14 bits; an int8
            # head keeps fp32 x, the product whose argmax the head screen certifies its picks against (screen.py).
            m.x_grid = m is not getattr(model, "lm_head", None) and m.in_features <= gemv.GRID_FULL_K
        elif isinstance(m, Int4Linear) and m.device_type == "cpu" and gemv.int4_fits(
                m.out_features, m.in_features, m.group_size):
            m.gemv_rows = gemv.INT4_ROWS
        else:
            continue
        chosen += 1
    return chosen


def prompt_unpack_shapes(model: nn.Module) -> set[tuple[int, int, int]]:
    """The weight shapes `compile_prompt_unpack` would build a kernel for (each costs resident memory)."""
    return {(m.out_features, m.in_features, m.group_size) for m, _ in _unpackable(model)}


def _unpackable(model: nn.Module) -> Iterator[tuple[Int4Linear, int]]:
    """(CPU Int4Linear, its packing's row period) for every linear a compiled prompt unpack can serve."""
    for m in model.modules():
        if not isinstance(m, Int4Linear) or m.device_type != "cpu" or m.out_features * m.in_features > _UNPACK_MAX:
            continue
        rows = cpu_int4_block_rows(m.in_features)
        if rows is not None and m.out_features % rows == 0:
            yield m, rows




# Rows up to which int8 products are fp32 row reductions (`_reduce_rows`) rather than the int8 kernel. Zero
# except inside `small_row_reductions`, which the runtime wraps around its compiled decode steps
# (runtime/steps.py): there inductor fuses the reductions into one pass over the codes; eager, they would
# first make a float copy of the weight.
_reduce_up_to = 0


@contextlib.contextmanager
def small_row_reductions(rows: int) -> Iterator[None]:
    """Within the block, int8 products of up to `rows` rows run as fused fp32 reductions (compiled steps)."""
    global _reduce_up_to
    before, _reduce_up_to = _reduce_up_to, rows
    try:
        yield
    finally:
        _reduce_up_to = before


def int8_matmul(x: Tensor, q: Tensor, scales: Tensor, gemv_rows: int = 0, grid: bool = False) -> Tensor:
    """x [..., K] @ (q [N, K] * scales[:, None]).T on the packed kernel, run in the scales' dtype; inside
    `small_row_reductions` (compiled decode steps), a step's few rows as fp32 dequantize-multiply-reduces that
    inductor fuses and vectorises (`_reduce_rows`). From `UNPACK_ROWS` rows (a prompt) the weight is cast to
    bf16 for oneDNN's GEMM, faster than the kernel there. Up to `gemv_rows` rows go to gemmakit's AVX2 kernel
    (runtime/gemv.py), for CPUs where torch's kernel is bound by arithmetic: with `grid`, x rounded onto the
    screen's integer grid and summed exactly (gemv.int8_grid), else in fp32."""
    rows = x.shape[:-1].numel()
    if rows <= _reduce_up_to:
        return _reduce_rows(x, q, scales)
    if rows <= gemv_rows:
        y = (gemv.int8_grid if grid else gemv.int8)(x.reshape(rows, -1), q, scales)
        return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(scales.dtype).contiguous()
    if _unpack_pays(x2, q.shape[0]) and scales.dtype == COMPUTE_DTYPE:  # a prompt: exact int8 -> bf16, oneDNN's GEMM
        # Where oneDNN has no fast bf16 path (AVX2 CPUs: probe.py), the same exact weights in fp32 GEMM instead.
        dtype = COMPUTE_DTYPE if onednn_packs(COMPUTE_DTYPE) else torch.float32
        y = F.linear(x2.to(dtype), q.to(dtype) * scales[:, None].to(dtype)).to(scales.dtype)
    else:
        y = torch._weight_int8pack_mm(x2, q, scales)
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


@torch.library.custom_op("gemmakit::materialize", mutates_args=())
def _materialize(x: Tensor) -> Tensor:
    """A copy inductor cannot see into, so it stores x once. Otherwise it inlines a cheap producer of x (a
    norm; an int4 table's gathered codes) into each row's reduction, recomputed for every weight row, which made
    an int8 8-row step several times slower."""
    return x.clone()


@_materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _reduce_rows(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """`int8_matmul` as one fp32 row reduction per row of x over the same codes. Inductor fuses the
    reductions into one pass over q with an accumulator per row, so the codes are read once and at close to
    the memory bandwidth. The packed kernel reads them poorly from memory: its one-row path streams at a
    fraction of the bandwidth (on an H200 too, where it made int8 decoding slower than bf16's), and at 8 rows
    it is slower than this reduction on the layers' matrices and the head alike (docs/performance.md,
    "Quantization"). A broadcast [rows, N, K] product instead re-reads q per row, and bf16 activations would
    be converted again for every weight row, so x goes to fp32 once."""
    x2, w = x.reshape(-1, x.shape[-1]).float(), q.float()
    if x2.shape[0] > 1:
        x2 = _materialize(x2)
    y = torch.stack([(row * w).sum(-1) for row in x2.unbind(0)]) * scales.float()
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


def _unpack_pays(x2: Tensor, out_features: int) -> bool:
    """Whether a product is many-row enough for cast + bf16 GEMM to beat the CPU int8 kernel, and its weight
    small enough that a bf16 copy is a passing temporary (not a 262k-row head's 335 MB)."""
    return x2.device.type == "cpu" and x2.shape[0] >= UNPACK_ROWS and out_features * x2.shape[1] <= _UNPACK_MAX


class Int8Linear(nn.Module):
    """A bias-free linear with int8 weights [N, K] (buffer `weight`) and one scale per output channel."""

    def __init__(self, weight: Tensor, scales: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.gemv_rows = 0  # set by `use_gemv_kernels`, with x_grid
        self.x_grid = False
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_weight(cls, w: Tensor) -> Int8Linear:
        return cls(*quantize_int8(w.detach(), _int8_dtype(w.shape[1])))

    def forward(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.weight, self.scales, self.gemv_rows, self.x_grid)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.scales.dtype}"


class Int4Linear(nn.Module):
    """A bias-free linear with group-wise int4 weights packed for one device type's kernel."""

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, group_size: int, out_features: int,
                 in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.group_size, self.device_type = group_size, packed.device.type
        # Set by `compile_prompt_unpack`: prompts then unpack to bf16 for a GEMM instead of the kernel.
        self.unpack: Callable | None = None
        self.unpack_rows = 0
        self.gemv_rows = 0  # set by `use_gemv_kernels`: products of up to this many rows on gemmakit's kernel
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_weight(cls, w: Tensor, group_size: int = 32) -> Int4Linear:
        _check_int4(*w.shape, group_size, w.device)
        packed, sz, _ = quantize_int4_packed(w.detach(), group_size)
        return cls(packed, sz, group_size, *w.shape)

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, zero: Tensor) -> Int4Linear:
        """Codes chosen elsewhere, e.g. a GGUF's Q4 blocks (see `int4_kernel_operands`): kept as they are."""
        packed, sz, group_size = int4_kernel_operands(q, scale, zero)
        return cls(packed, sz, group_size, *q.shape)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != self.device_type:
            raise RuntimeError(f"this Int4Linear is packed for {self.device_type}, not {x.device.type}: "
                               "move the fp model first, then quantize")
        if x.shape[:-1].numel() <= self.gemv_rows:
            y = gemv.int4(x.reshape(-1, self.in_features), self.weight, self.scales_and_zeros, self.group_size)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        if self.unpack is not None and _unpack_pays(x2, self.out_features):
            scales, zeros = self.scales_and_zeros.permute(2, 0, 1).contiguous()
            y = x2 @ self.unpack(self.weight, scales, zeros, self.unpack_rows)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        mm = torch._weight_int4pack_mm_for_cpu if self.device_type == "cpu" else torch._weight_int4pack_mm
        y = mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _check_int4(out_features: int, in_features: int, group_size: int, device: torch.device) -> None:
    problem = int4_problem(out_features, in_features, group_size, device)
    if problem:
        raise ValueError(f"cannot pack this weight as int4: {problem} (use Int8Linear for it)")


class QuantizedEmbedding(nn.Module):
    """An `nn.Embedding` stand-in over quantized rows: `table(ids)` dequantizes only the rows looked up.

    There is no `.weight`: `dtype` is the dtype rows come back in (the original table's), `device` where the
    codes live. Rows are int8 with one scale each (`group_size` None), or int4 codes with the tinygemm
    `scales_and_zeros` [D/G, V, 2] shared with an int4 head. int4 codes are either two to a byte (even column
    high), or, with `layout` from `cpu_int4_layout`, the int4 head's own CPU-packed matrix, read in place.
    """

    def __init__(self, qweight: Tensor, scales: Tensor, dtype: torch.dtype, padding_idx: int | None = None,
                 group_size: int | None = None, layout: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        self.num_embeddings = qweight.shape[0]
        self.embedding_dim = qweight.shape[1] * (1 if group_size is None else 2)
        self.dtype, self.padding_idx, self.group_size = dtype, padding_idx, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.packed = layout is not None
        if layout is not None:  # derived from the kernel, not state: kept out of state_dict
            self.register_buffer("code_offsets", layout[0], persistent=False)
            self.register_buffer("code_shifts", layout[1], persistent=False)
        # Where torch's packing stores blocks of R rows as [D, R/2] bytes (row i < R/2 low, R/2 + i high: both
        # vector widths of torch 2.13), lookups index the blocks directly, which reads a batch step's candidate
        # rows faster than gathering each code's byte through the map.
        rows = cpu_int4_block_rows(self.embedding_dim) if layout is not None else None
        self.halves = rows // 2 if rows else None

    @classmethod
    def from_embedding(cls, table: nn.Embedding) -> QuantizedEmbedding:
        """int8 rows with fp32 scales: a table that is only looked up never meets a kernel's dtype rule."""
        w = table.weight.detach()
        return cls(*quantize_int8(w, torch.float32), w.dtype, table.padding_idx)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows(ids, self.dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows `ids` dequantized in `dtype` (fp32: the values an int4 head's kernel multiplies by, which
        a bf16 model's lookups round)."""
        if self.group_size is None:
            return self.qweight[ids].to(dtype) * self.scales[ids].to(dtype)[..., None]
        # Stored before the products: compiled, inductor fused the gather into a screen's candidate products
        # and redid the block arithmetic for every code, which took longer than the rest of an 8-row pick.
        q = _materialize(self._codes(ids)).view(*ids.shape, -1, self.group_size)
        sz = self.scales[:, ids].movedim(0, -2).to(dtype)  # [..., D/G, 2]
        return ((q.to(dtype) - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)

    def _codes(self, ids: Tensor) -> Tensor:
        """int4 codes [..., D] of rows `ids`, from nibble pairs or from the packed head's blocks."""
        if not self.packed:
            b = self.qweight[ids]
            return torch.stack([b >> 4, b & 15], dim=-1).flatten(-2)
        if self.halves:  # blocks [D, R/2] bytes, row i < R/2 of a block low, R/2 + i high: strided reads
            r = ids % (2 * self.halves)
            blocks = self.qweight.view(-1, self.embedding_dim, self.halves)
            shift = (4 * (r // self.halves)).to(torch.uint8)[..., None]
            return (blocks[ids // (2 * self.halves), :, r % self.halves] >> shift) & 15
        rows, width = self.code_offsets.shape[0], self.qweight.shape[1]  # width: bytes per row
        within = ids % rows
        at = (ids - within)[..., None] * width + self.code_offsets[within]  # [..., D] byte positions
        return (self.qweight.view(-1)[at] >> self.code_shifts[within]) & 15

    def dequantize(self) -> Tensor:
        """The whole table [V, D] in `dtype` (for export or inspection; this is the memory it saves)."""
        ids = torch.arange(self.num_embeddings, device=self.device)
        rows = _block_rows(self.embedding_dim)
        return torch.cat([self(chunk) for chunk in ids.split(rows)])  # bounds the index temporaries

    def extra_repr(self) -> str:
        bits = "int8" if self.group_size is None else f"int4 g{self.group_size}" + (" (in the head)" * self.packed)
        return f"{self.num_embeddings}, {self.embedding_dim}, {bits}, dtype={self.dtype}"


class QuantizedExperts(Experts):
    """`Experts` with quantized weights under the checkpoint's names gate_up_proj and down_proj ([E, ...] stacks,
    one kernel operand per expert) and `<name>_scales`: per matrix, int4 groups when asked and the int4 kernel
    takes its shape, else int8 per output channel. The routing loop is Experts.forward's; only the per-expert
    matmuls change."""

    def __init__(self, parts: dict[str, tuple[Tensor, Tensor, int]]):
        """`parts`: name -> (stacked weights, stacked scales, group size; 0 for int8 per output channel)."""
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate full-precision parameters
        self.group_sizes = {}
        for name, (w, scales, group_size) in parts.items():
            self.register_buffer(name, w)
            self.register_buffer(f"{name}_scales", scales)
            self.group_sizes[name] = group_size

    @classmethod
    def from_experts(cls, experts: Experts, mode: str = "int8", group_size: int = 32) -> QuantizedExperts:
        return cls({name: _quantize_stack(getattr(experts, name).detach(), mode, group_size)
                    for name in EXPERT_MATRICES})

    @classmethod
    def from_int4_codes(cls, codes: dict[str, tuple[Tensor, Tensor, Tensor]], experts: int) -> QuantizedExperts:
        """Codes chosen elsewhere (a GGUF's 4-bit blocks) for both matrices, as `Int4Linear.from_codes` takes
        them but over the experts' stacked rows: q [E * N, K]. The caller checks `int4_problem` first."""
        parts = {}
        for name, (q, scale, zero) in codes.items():
            per_expert = [int4_kernel_operands(*(t.view(experts, -1, t.shape[-1])[e] for t in (q, scale, zero)))
                          for e in range(experts)]
            packed, sz, group_size = zip(*per_expert, strict=True)
            parts[name] = (torch.stack(packed), torch.stack(sz), group_size[0])
        return cls(parts)

    def _product(self, name: str, e: int, x: Tensor) -> Tensor:
        w, scales, group_size = getattr(self, name)[e], getattr(self, f"{name}_scales")[e], self.group_sizes[name]
        if not group_size:
            return int8_matmul(x, w, scales)
        mm = torch._weight_int4pack_mm_for_cpu if w.device.type == "cpu" else torch._weight_int4pack_mm
        return mm(x.to(COMPUTE_DTYPE).contiguous(), w, group_size, scales).to(x.dtype)

    def expert(self, e: int, x: Tensor) -> Tensor:
        gate, up = self._product("gate_up_proj", e, x).chunk(2, dim=-1)
        return self._product("down_proj", e, F.gelu(gate, approximate="tanh") * up)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {f'int4 g{g}' if g else 'int8'}" for n, g in self.group_sizes.items())


EXPERT_MATRICES = ("gate_up_proj", "down_proj")


def _quantize_stack(w: Tensor, mode: str, group_size: int) -> tuple[Tensor, Tensor, int]:
    """One experts matrix [E, N, K] as (stacked weights, stacked scales, group size or 0 for int8)."""
    E, N, K = w.shape
    if mode == "int4" and int4_problem(N, K, group_size, w.device) is None:
        packed, sz = zip(*(quantize_int4_packed(w[e], group_size)[:2] for e in range(E)), strict=True)
        return torch.stack(packed), torch.stack(sz), group_size
    q, s = quantize_int8(w.reshape(E * N, K), _int8_dtype(K))
    return q.view(E, N, K), s.view(E, N), 0


def quantize_model(model: Gemma, mode: str, group_size: int = 32) -> Gemma:
    """Quantize `model`'s weights in place ("int8" or "int4" with `group_size` inputs per scale) and return it.

    Move and cast the model first, then quantize: int4 packing is device-specific, and a later `.to()` would
    copy the int8 table that the head and the embedding share into two. Linears that int4 cannot pack fall
    back to int8; a model with biased linears is refused (Gemma has none). To never hold the whole model in
    full precision, pass `quantize=` to `load_model` instead: it quantizes each module as it is loaded.
    """
    _check_args(model, mode, group_size)
    for parent in model.decoder_modules():  # image / audio towers stay in float
        for name in list(dict(parent.named_children())):
            quantize_child(model, parent, name, mode, group_size)
    return model


def quantize_child(model: Gemma, parent: nn.Module, name: str, mode: str, group_size: int = 32) -> None:
    """Replace `parent.name` by its quantized form if it is a kind that gets quantized, else leave it.
    The MoE router's projection stays in full precision (see the module docstring)."""
    child = getattr(parent, name)
    if isinstance(child, nn.Linear) and not isinstance(parent, Router):
        setattr(parent, name, _quantized_linear(child, linear_mode(name, mode), group_size))
    elif isinstance(child, Experts) and not isinstance(child, QuantizedExperts):
        setattr(parent, name, QuantizedExperts.from_experts(child, mode, group_size))
    elif isinstance(child, nn.Embedding) and child is model.model.embed_tokens:
        quantize_tied_head(model, mode, group_size)
    elif isinstance(child, nn.Embedding):
        setattr(parent, name, QuantizedEmbedding.from_embedding(child))  # the PLE table


def _check_args(model: Gemma, mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: choose one of {MODES}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    if getattr(model, "lm_head", None) is not None or isinstance(model.model.embed_tokens, QuantizedEmbedding):
        raise ValueError("this model is already quantized; load a fresh one to quantize differently")
    if any(isinstance(m, nn.Linear) and m.bias is not None for m in model.decoder_modules()):  # towers stay float
        raise ValueError("weight-only quantization here covers bias-free linears only (Gemma has no biases)")


def linear_mode(name: str, mode: str) -> str:
    """The mode a linear called `name` (q_proj, v_proj, ...) is quantized in when the model is in `mode`."""
    return "int8" if mode == "int4" and name in INT8_UNDER_INT4 else mode


def _quantized_linear(linear: nn.Linear, mode: str, group_size: int) -> nn.Module:
    w = linear.weight.detach()
    if mode == "int4" and int4_problem(*w.shape, group_size, w.device) is None:
        return Int4Linear.from_weight(w, group_size)
    return Int8Linear.from_weight(w)


def quantize_tied_head(model: Gemma, mode: str, group_size: int = 32, weight: Any = None) -> None:
    """One quantization of the tied table serves both the output projection and the token lookup.
    `weight` replaces the table's own: anything with `shape`, `dtype`, `device` and `split(rows)`, such as a
    loader's `RowSource` that reads the checkpoint a block of rows at a time."""
    table = model.model.embed_tokens
    w, pad = (table.weight.detach() if weight is None else weight), table.padding_idx
    if mode == "int4" and int4_problem(*w.shape, group_size, w.device) is None:
        layout = cpu_int4_layout(w.shape[1]) if w.device.type == "cpu" else None
        if layout is not None and w.shape[0] % layout[0].shape[0]:
            layout = None  # a vocabulary that is not whole blocks of the packing's row period
        packed, sz, nibbles = quantize_int4_packed(w, group_size, nibbles=layout is None)
        model.lm_head = Int4Linear(packed, sz, group_size, *w.shape)
        table = packed if layout is not None else nibbles  # lookups read the head's own codes where they can
        model.model.embed_tokens = QuantizedEmbedding(table, sz, w.dtype, pad, group_size, layout)
    else:
        q, s = quantize_int8(w, _int8_dtype(w.shape[1]))
        model.lm_head = Int8Linear(q, s)
        model.model.embed_tokens = QuantizedEmbedding(q, s, w.dtype, pad)


def quantized_bytes(model: nn.Module) -> int:
    """Resident bytes of parameters and buffers (a KV cache included, if set up); shared storage counts once."""
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        s = t.untyped_storage()
        storages[(t.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())
