"""Weight-only int8 / int4 quantization of a loaded Gemma, on PyTorch's packed CPU and CUDA kernels.

`quantize_model(model, "int8" | "int4", group_size=32)` works in place:
- every `nn.Linear` under `model.model` (attention, MLP, PLE projections) becomes an `Int8Linear` or `Int4Linear`
  under the same name, so `model.layers.3.self_attn.q_proj` still reads the same. The MoE router stays in full
  precision: it is 0.1% of an MoE layer, and a flipped top-k choice costs more than that saves; under int4,
  attention's `v_proj` stays int8 (`INT8_UNDER_INT4`: the most sensitive kind, and a small one);
- MoE `Experts` become `QuantizedExperts` (int8 per output channel, in both modes);
- the tied head becomes `model.lm_head`, and the embedding table a `QuantizedEmbedding` built from the *same*
  quantized tensors (int8: shared storage; int4 on CPU: the head's packed codes, read in place through the
  layout `cpu_int4_layout` finds; elsewhere a nibble copy of the codes with shared scales and zeros), so the tie
  survives and the vocabulary (~60% of the 270M model) is stored once. The E-series PLE table becomes int8 rows.

Formats. All quantized tensors are buffers, so `.to()`, `state_dict()` and the remaining fp parameters behave.
- int8: symmetric per output channel, w ~ q * s with q in [-127, 127]; `torch._weight_int8pack_mm(x, q, s)`
  with x and s of one dtype (fp32, fp16 or bf16).
- int4: asymmetric per group of `group_size` inputs, the gpt-fast / torchao "tinygemm" convention: q in 0..15,
  w ~ (q - 8) * scale + zero, `scales_and_zeros` [K/G, N, 2]. CPU packs an int32 [N, K] matrix of codes
  (`_convert_weight_to_int4pack_for_cpu(q, 1)`, the tile argument is ignored); CUDA packs uint8 [N, K/2], even
  column in the high nibble, into its tensor-core tile layout (`_convert_weight_to_int4pack(q, inner_k_tiles)`).
  The two layouts differ, so an `Int4Linear` is packed for one device type: quantize after moving the model.
- Limits found on torch 2.13: int4 needs G in {32, 64, 128, 256}, K % G == 0 and N % 16 == 0 on CPU (N % 8 on
  CUDA) — layers that fail these fall back to int8. The bf16 CPU int8 kernel returns garbage, or crashes, unless
  K % 16 == 0, so such layers run that kernel in fp32.

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
GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes both int4 kernels accept
COMPUTE_DTYPE = torch.bfloat16
_ROWS = 2048  # rows quantized at once: bounds the fp32 temporaries of a 262k-row vocabulary (a multiple of 64)


def _by_rows(fn: Callable[[Tensor], tuple[Tensor, ...]], w: Tensor) -> tuple[Tensor, ...]:
    """Apply a row-wise quantizer to `w` in chunks of rows and concatenate each of its outputs."""
    outs = [fn(chunk) for chunk in w.split(_ROWS)]
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def _int8_dtype(in_features: int) -> torch.dtype:
    # The bf16 int8 kernel on CPU reads past a K tail that is not a multiple of 16 (torch 2.13): use fp32 there.
    return COMPUTE_DTYPE if in_features % 16 == 0 else torch.float32


def quantize_int8(w: Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 of w [N, K]: (q int8 [N, K], scales [N] in `dtype`), w ~ q * scales[:, None]."""

    def rows(c: Tensor) -> tuple[Tensor, Tensor]:
        c = c.float()
        s = (c.abs().amax(-1) / 127).clamp(min=1e-8).to(dtype)  # floor: an all-zero row would divide by 0
        return (c / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8), s

    return _by_rows(rows, w)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric group-wise int4 of w [N, K]: (q uint8 [N, K] in 0..15, scales_and_zeros bf16 [K/G, N, 2]),
    w ~ (q - 8) * scale + zero over each group of `group_size` consecutive inputs."""

    def rows(c: Tensor) -> tuple[Tensor, Tensor]:
        q, scale, zero = _fit_int4_groups(c.float().reshape(c.shape[0], -1, group_size))
        return q.to(torch.uint8).reshape(c.shape), torch.cat([scale, zero], dim=-1).to(COMPUTE_DTYPE)

    q, sz = _by_rows(rows, w)
    return q, sz.transpose(0, 1).contiguous()


def _fit_int4_groups(g: Tensor, shrinks: tuple[float, ...] = (1.0, 0.9, 0.8),
                     refits: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scales and zeros for groups g [..., G] that (nearly) minimise the squared error.

    Plain min/max rounding spends levels on outliers and ignores where the mass is. From a min/max grid,
    clipped by each `shrinks` factor, alternate rounding with a least-squares refit of scale and zero (up to
    bf16 rounding neither step can raise the error) and keep each group's best candidate. On Gemma 3 270M this
    lowers both the weights' relative error and the int4 perplexity of benchmarks/quant_quality.py against
    min/max rounding (docs/performance.md, "Quantization").
    """
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best = None
    for shrink in shrinks:
        scale = _bf16((hi - lo) * shrink / 15).clamp(min=1e-6)
        zero = _bf16((lo + hi) / 2 + 0.5 * scale)  # code 8 decodes to `zero`: the grid centred on the range
        for _ in range(refits):
            scale, zero = _refit(g, _codes(g, scale, zero) - 8, scale)
        q = _codes(g, scale, zero)
        err = ((q - 8) * scale + zero - g).square().sum(-1, keepdim=True)
        if best is None:
            best = (err, q, scale, zero)
        else:
            better = err < best[0]
            best = tuple(torch.where(better, new, old) for new, old in zip((err, q, scale, zero), best, strict=True))
    return best[1:]


def _codes(g: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return ((g - zero) / scale).round().add(8).clamp(0, 15)


def _refit(g: Tensor, c: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares (scale, zero) of g ~ scale * c + zero per group, rounded to bf16 as the kernel keeps them."""
    cm, gm = c.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    var = (c - cm).square().mean(-1, keepdim=True)
    cov = ((c - cm) * (g - gm)).mean(-1, keepdim=True)
    new_scale = torch.where(var > 0, cov / var.clamp(min=1e-12), scale).clamp(min=1e-6)  # one code: keep scale
    return _bf16(new_scale), _bf16(gm - new_scale * cm)


def _bf16(t: Tensor) -> Tensor:
    return t.to(COMPUTE_DTYPE).float()


def int4_problem(out_features: int, in_features: int, group_size: int, device: torch.device) -> str | None:
    """Why an [out, in] weight cannot take the int4 kernel on `device`; None when it can."""
    if group_size not in GROUP_SIZES:
        return f"group_size must be one of {GROUP_SIZES}, got {group_size}"
    if in_features % group_size:
        return f"in_features={in_features} is not a multiple of group_size={group_size}"
    tile = 16 if device.type == "cpu" else 8
    if out_features % tile:
        return f"out_features={out_features} is not a multiple of {tile} (the {device.type} int4 packing tile)"
    return None


def _nibbles(q: Tensor) -> Tensor:
    """Codes [N, K] in 0..15 -> uint8 [N, K/2], the even column in the high nibble (CUDA's packing input)."""
    return (q[:, ::2] << 4) | q[:, 1::2]


def pack_int4(q: Tensor) -> Tensor:
    """The kernel layout of codes q [N, K] on their device (see the module docstring)."""
    if q.device.type == "cpu":
        # Packing is independent per block of rows (64 with AVX-512), so chunks keep the int32 copy small.
        return torch.cat([torch._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1) for c in q.split(_ROWS)])
    k = q.shape[1]
    inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    return torch._convert_weight_to_int4pack(_nibbles(q), inner_k_tiles)


_PROBE_ROWS = 256  # the longest row period looked for in the CPU packing (64 with AVX-512)


@functools.lru_cache(maxsize=8)
def cpu_int4_layout(k: int) -> tuple[Tensor, Tensor] | None:
    """Where the CPU int4 packing puts each code of a block of rows with `k` inputs: (byte offset into the
    block's flattened bytes [R, k] int32, nibble shift 0 or 4 [R, k] uint8) for the packing's row period R, or
    None when the packing is not such an arrangement of nibbles (then the table keeps its own nibble copy).

    Why: the tied int4 head's codes are also the embedding table. Reading lookups straight from the packed head
    saves a second copy of the vocabulary's codes (84 MB for the 270M). torch does not document the packing, and it
    depends on the CPU's vector width, so it is read off this machine's kernel: pack probes whose codes spell out
    each position's index four bits at a time, invert, find the shortest period of rows that repeats, and check
    random codes."""
    n = 2 * _PROBE_ROWS
    index = torch.arange(n * k).view(n, k)
    digits = (int(index.max()).bit_length() + 3) // 4
    probes = [pack_int4(((index >> 4 * j) & 15).to(torch.uint8)).flatten() for j in range(digits)]
    if probes[0].dtype != torch.uint8 or probes[0].numel() * 2 != index.numel():
        return None
    where = torch.empty(2, index.numel(), dtype=torch.long)  # (byte, shift) of each code, by its index
    for shift in (0, 4):
        spelled = sum(((p >> shift) & 15).long() << 4 * j for j, p in enumerate(probes))
        if bool((spelled >= index.numel()).any()):
            return None
        where[0, spelled], where[1, spelled] = torch.arange(len(spelled)), shift
    offset, shift = where[0].view(n, k), where[1].view(n, k)
    rows = next((r for r in (16, 32, 64, 128, _PROBE_ROWS) if torch.equal(offset[r:], offset[:-r] + r * k // 2)
                 and torch.equal(shift[r:], shift[:-r])), None)
    if rows is None:
        return None
    offset, shift = offset[:rows].to(torch.int32), shift[:rows].to(torch.uint8)
    codes = torch.randint(0, 16, (rows, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if not torch.equal((pack_int4(codes).flatten()[offset.long()] >> shift) & 15, codes):
        return None
    return offset, shift


@functools.lru_cache(maxsize=8)
def cpu_int4_block_rows(k: int) -> int | None:
    """R when this machine's CPU int4 packing of `k` inputs stores each block of R rows as [k, R/2] bytes, row
    i < R/2 of the block in the low nibble of byte i and row R/2 + i in the high nibble (torch 2.13's AVX-512
    build does, with R = 64); None otherwise. In that arrangement one strided pass unpacks a whole weight.
    Checked on random codes against each candidate R, which costs far less memory than `cpu_int4_layout`."""
    n = 256
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    if packed.dtype != torch.uint8 or packed.numel() * 2 != codes.numel():
        return None
    for r in (64, 32, 16, 128, 256):
        halves = codes.view(n // r, 2, r // 2, k)
        if torch.equal(packed.flatten(), (halves[:, 0] | halves[:, 1] << 4).transpose(1, 2).flatten()):
            return r
    return None


def unpack_int4_transposed(packed: Tensor, scales: Tensor, zeros: Tensor, rows: int) -> Tensor:
    """W^T [K, N] in bf16 of a CPU-packed int4 weight [N, K/2] whose blocks are laid out as
    `cpu_int4_block_rows` says (`rows` = R), with `scales` and `zeros` [K/G, N] contiguous (a strided read of
    the interleaved `scales_and_zeros` would keep inductor from vectorising). One broadcast expression, so
    that inductor emits a single vectorised loop, much faster than the same expression in eager ops
    (docs/performance.md, "Quantization")."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(n // rows, k, rows // 2).transpose(0, 1)  # [K, N/R, R/2]
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device).view(2, 1)
    codes = (blocks[:, :, None, :] >> shifts) & 15  # [K, N/R, 2, R/2]: rows i and R/2 + i of each block
    scale = scales.float()[:, None, :]  # [K/G, 1, N]
    zero = zeros.float()[:, None, :] - 8 * scale
    w = codes.reshape(scales.shape[0], -1, n).float() * scale + zero
    return w.to(COMPUTE_DTYPE).view(k, n)


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


def quantize_int4_packed(w: Tensor, group_size: int, nibbles: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(kernel-packed codes, scales_and_zeros, nibble-packed rows if asked) of w [N, K], `_ROWS` rows at a
    time: the code matrix of a 262k-row vocabulary is never whole, which keeps quantize-while-loading's peak
    memory near the size of the quantized model."""
    outs: list[Tensor | None] = [None, None, None]
    for i, chunk in enumerate(w.split(_ROWS)):
        q, sz = quantize_int4(chunk, group_size)
        parts = (pack_int4(q), sz.transpose(0, 1), _nibbles(q) if nibbles else None)
        for j, part in enumerate(parts):
            if part is None:
                continue
            if outs[j] is None:  # both packed layouts grow linearly with the rows along dim 0
                outs[j] = part.new_empty((part.shape[0] * w.shape[0] // chunk.shape[0], *part.shape[1:]))
            start = i * _ROWS * part.shape[0] // chunk.shape[0]
            outs[j][start:start + part.shape[0]] = part
    packed, sz, nib = outs
    return packed, sz.transpose(0, 1).contiguous(), nib


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


def int8_matmul(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """x [..., K] @ (q [N, K] * scales[:, None]).T on the packed kernel, run in the scales' dtype; inside
    `small_row_reductions` (compiled decode steps), a step's few rows as fp32 dequantize-multiply-reduces that
    inductor fuses and vectorises (`_reduce_rows`). From `UNPACK_ROWS` rows (a prompt) the weight is cast to
    bf16 for oneDNN's GEMM, faster than the kernel there."""
    rows = x.shape[:-1].numel()
    if rows <= _reduce_up_to:
        return _reduce_rows(x, q, scales)
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
    norm) into each row's reduction, recomputed for every weight row, which made an int8 8-row step several
    times slower."""
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
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_weight(cls, w: Tensor) -> Int8Linear:
        return cls(*quantize_int8(w.detach(), _int8_dtype(w.shape[1])))

    def forward(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.weight, self.scales)

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
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_weight(cls, w: Tensor, group_size: int = 32) -> Int4Linear:
        _check_int4(*w.shape, group_size, w.device)
        packed, sz, _ = quantize_int4_packed(w.detach(), group_size)
        return cls(packed, sz, group_size, *w.shape)

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, zero: Tensor) -> Int4Linear:
        """Codes chosen elsewhere, e.g. a GGUF's Q4 blocks: q [N, K] in 0..15 with w = scale * q + zero per
        group (scale, zero [N, groups]), i.e. the kernel's (q - 8) * scale + (zero + 8 * scale). The codes
        are kept as they are; only scale and zero are rounded to bf16."""
        n, k = q.shape
        group_size = k // scale.shape[1]
        _check_int4(n, k, group_size, q.device)
        sz = torch.stack([scale, zero + 8 * scale], dim=-1).to(COMPUTE_DTYPE).transpose(0, 1).contiguous()
        return cls(pack_int4(q), sz, group_size, n, k)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != self.device_type:
            raise RuntimeError(f"this Int4Linear is packed for {self.device_type}, not {x.device.type}: "
                               "move the fp model first, then quantize")
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

    @classmethod
    def from_embedding(cls, table: nn.Embedding) -> QuantizedEmbedding:
        """int8 rows with fp32 scales: a table that is only looked up never meets a kernel's dtype rule."""
        w = table.weight.detach()
        return cls(*quantize_int8(w, torch.float32), w.dtype, table.padding_idx)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def forward(self, ids: Tensor) -> Tensor:
        if self.group_size is None:
            return self.qweight[ids].to(self.dtype) * self.scales[ids].to(self.dtype)[..., None]
        q = self._codes(ids).view(*ids.shape, -1, self.group_size)
        sz = self.scales[:, ids].movedim(0, -2).to(self.dtype)  # [..., D/G, 2]
        return ((q.to(self.dtype) - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)

    def _codes(self, ids: Tensor) -> Tensor:
        """int4 codes [..., D] of rows `ids`, from nibble pairs or from the packed head's blocks."""
        if not self.packed:
            b = self.qweight[ids]
            return torch.stack([b >> 4, b & 15], dim=-1).flatten(-2)
        rows, width = self.code_offsets.shape[0], self.qweight.shape[1]  # width: bytes per row
        within = ids % rows
        at = (ids - within)[..., None] * width + self.code_offsets[within]  # [..., D] byte positions
        return (self.qweight.view(-1)[at] >> self.code_shifts[within]) & 15

    def dequantize(self) -> Tensor:
        """The whole table [V, D] in `dtype` (for export or inspection; this is the memory it saves)."""
        ids = torch.arange(self.num_embeddings, device=self.device)
        return torch.cat([self(chunk) for chunk in ids.split(_ROWS)])  # bounds the index temporaries

    def extra_repr(self) -> str:
        bits = "int8" if self.group_size is None else f"int4 g{self.group_size}" + (" (in the head)" * self.packed)
        return f"{self.num_embeddings}, {self.embedding_dim}, {bits}, dtype={self.dtype}"


class QuantizedExperts(Experts):
    """`Experts` with int8 per-output-channel weights; buffers keep the names gate_up_proj and down_proj.
    The routing loop is Experts.forward's; only the per-expert matmuls change."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate full-precision parameters
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name).detach()
            E, N, K = w.shape
            q, s = quantize_int8(w.reshape(E * N, K), _int8_dtype(K))
            self.register_buffer(name, q.view(E, N, K))
            self.register_buffer(f"{name}_scales", s.view(E, N))

    def expert(self, e: int, x: Tensor) -> Tensor:
        gate, up = int8_matmul(x, self.gate_up_proj[e], self.gate_up_proj_scales[e]).chunk(2, dim=-1)
        return int8_matmul(F.gelu(gate, approximate="tanh") * up, self.down_proj[e], self.down_proj_scales[e])


def quantize_model(model: Gemma, mode: str, group_size: int = 32) -> Gemma:
    """Quantize `model`'s weights in place ("int8" or "int4" with `group_size` inputs per scale) and return it.

    Move and cast the model first, then quantize: int4 packing is device-specific, and a later `.to()` would
    copy the int8 table that the head and the embedding share into two. Linears that int4 cannot pack fall
    back to int8; a model with biased linears is refused (Gemma has none). To never hold the whole model in
    full precision, pass `quantize=` to `load_model` instead: it quantizes each module as it is loaded.
    """
    _check_args(model, mode, group_size)
    for parent in list(model.model.modules()):
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
        setattr(parent, name, QuantizedExperts(child))
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
    if any(isinstance(m, nn.Linear) and m.bias is not None for m in model.model.modules()):
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
