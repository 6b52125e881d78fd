"""How weights become int8 / int4 codes and how the kernels want those codes laid out: the numbers behind
`quantize.py`'s modules, with no modules of their own (so the int8/int4 linears, the tied head and table, and the
MoE experts all share one fitting and one packing).

- int8: symmetric per output channel, w ~ q * s with q in [-127, 127], scales in the compute dtype.
- int4: asymmetric per group of `group_size` inputs, the gpt-fast / torchao "tinygemm" convention: q in 0..15,
  w ~ (q - 8) * scale + zero, `scales_and_zeros` [K/G, N, 2]. CPU packs an int32 [N, K] matrix of codes
  (`_convert_weight_to_int4pack_for_cpu(q, 1)`, the tile argument is ignored); CUDA packs uint8 [N, K/2], even
  column in the high nibble, into its tensor-core tile layout (`_convert_weight_to_int4pack(q, inner_k_tiles)`).
  The two layouts differ, so packed codes belong to one device type.
- Limits found on torch 2.13: int4 needs G in {32, 64, 128, 256}, K % G == 0 and N % 16 == 0 on CPU (N % 8 on
  CUDA) (`int4_problem`). The bf16 CPU int8 kernel returns garbage, or crashes, unless K % 16 == 0, so such
  weights keep fp32 scales (`_int8_dtype`).
- torch does not document the CPU int4 packing and it depends on the vector width, so where code reads the
  packed bytes directly (the tied table, the prompt unpack) the layout is read off this machine's kernel
  (`cpu_int4_layout`, `cpu_int4_block_rows`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes both int4 kernels accept
COMPUTE_DTYPE = torch.bfloat16
# Elements quantized at once. Small enough that each fp32 temporary stays under a megabyte: glibc maps larger
# blocks afresh and trims freed ones back, so with big blocks the int4 fit of a 262k-row vocabulary spent most
# of a model load faulting in new pages (`benchmarks/load_time.py --quantize int4`).
_BLOCK = 256 * 640


def _block_rows(in_features: int) -> int:
    """Rows quantized at once for rows of `in_features`: about `_BLOCK` elements, a multiple of 64."""
    return max(64, _BLOCK // max(in_features, 1) // 64 * 64)


def _by_rows(fn: Callable[[Tensor], tuple[Tensor, ...]], w: Tensor) -> tuple[Tensor, ...]:
    """Apply a row-wise quantizer to `w` in chunks of rows and concatenate each of its outputs."""
    outs = [fn(chunk) for chunk in w.split(_block_rows(w.shape[-1]))]
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


def quantize_int4(w: Tensor, group_size: int, shrinks: tuple[float, ...] = (1.0, 0.9, 0.8),
                  refits: int = 2) -> tuple[Tensor, Tensor]:
    """Asymmetric group-wise int4 of w [N, K]: (q uint8 [N, K] in 0..15, scales_and_zeros bf16 [K/G, N, 2]),
    w ~ (q - 8) * scale + zero over each group of `group_size` consecutive inputs. `shrinks`, `refits`: the
    fit's search (`_fit_int4_groups`); a copy built at every start-up takes a shorter one."""

    def rows(c: Tensor) -> tuple[Tensor, Tensor]:
        q, scale, zero = _fit_int4_groups(c.float().reshape(c.shape[0], -1, group_size), shrinks, refits)
        return q.to(torch.uint8).reshape(c.shape), torch.cat([scale, zero], dim=-1).to(COMPUTE_DTYPE)

    q, sz = _by_rows(rows, w)
    return q, sz.transpose(0, 1).contiguous()


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor) -> Tensor:
    """The fp32 weight [N, K] that `quantize_int4`'s codes q [N, K] and scales_and_zeros [K/G, N, 2] stand for:
    (q - 8) * scale + zero over each group (the reference the kernels' products are checked against)."""
    scale, zero = scales_and_zeros.float().permute(2, 1, 0)[..., None]  # [N, K/G, 1] each
    return ((q.float().view(q.shape[0], scale.shape[1], -1) - 8) * scale + zero).view(q.shape)


def _fit_int4_groups(g: Tensor, shrinks: tuple[float, ...] = (1.0, 0.9, 0.8),
                     refits: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scales and zeros for groups g [..., G] that (nearly) minimise the squared error.

    Plain min/max rounding spends levels on outliers and ignores where the mass is. From a min/max grid,
    clipped by each `shrinks` factor, alternate rounding with a least-squares refit of scale and zero (up to
    bf16 rounding neither step can raise the error) and keep each group's best candidate. On Gemma 3 270M this
    lowers both the weights' relative error and the int4 perplexity of benchmarks/quant_quality.py against
    min/max rounding (docs/performance.md, "Quantization").
    """
    shape = g.shape
    # Groups run down the columns of a [G, groups] matrix: reducing over its rows is vectorised along the
    # groups, where a reduction over each group's 32 contiguous values is not (tens of times slower on CPU).
    g = g.reshape(-1, shape[-1]).T.contiguous()
    lo, hi = g.amin(0, keepdim=True), g.amax(0, keepdim=True)
    best = None
    for shrink in shrinks:
        scale = _bf16((hi - lo) * shrink / 15).clamp(min=1e-6)
        zero = _bf16((lo + hi) / 2 + 0.5 * scale)  # code 8 decodes to `zero`: the grid centred on the range
        for _ in range(refits):
            scale, zero = _refit(g, _codes(g, scale, zero).sub_(8), scale)
        q = _codes(g, scale, zero)
        if len(shrinks) == 1:  # nothing to choose between
            return q.T.reshape(shape), scale.T.reshape(*shape[:-1], 1), zero.T.reshape(*shape[:-1], 1)
        err = (q - 8).mul_(scale).add_(zero).sub_(g).square_().sum(0, keepdim=True)
        if best is None:
            best = (err, q, scale, zero)
        else:
            better = err < best[0]
            for old, new in zip(best, (err, q, scale, zero), strict=True):
                torch.where(better, new, old, out=old)
    _, q, scale, zero = best
    return q.T.reshape(shape), scale.T.reshape(*shape[:-1], 1), zero.T.reshape(*shape[:-1], 1)


def _codes(g: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (g - zero).div_(scale).round_().add_(8).clamp_(0, 15)


def _refit(g: Tensor, c: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares (scale, zero) of g ~ scale * c + zero per group (a column of g), rounded to bf16 as the
    kernel keeps them."""
    cm, gm = c.mean(0, keepdim=True), g.mean(0, keepdim=True)
    c = c.sub_(cm)  # the caller's codes are not needed after the refit: center them in place
    var = c.square().mean(0, keepdim=True)
    cov = c.mul_(g - gm).mean(0, keepdim=True)
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


def pack_nibbles(q: Tensor) -> Tensor:
    """Codes [N, K] in 0..15 -> uint8 [N, K/2], the even column in the high nibble: CUDA's packing input, the
    int4 lookup table's nibble copy and QLoRA's stored codes."""
    return (q[:, ::2] << 4) | q[:, 1::2]


def pack_int4(q: Tensor) -> Tensor:
    """The kernel layout of codes q [N, K] on their device (see the module docstring)."""
    if q.device.type == "cpu":
        # Packing is independent per block of rows (64 with AVX-512), so chunks keep the int32 copy small.
        rows = _block_rows(q.shape[-1])
        return torch.cat([torch._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1) for c in q.split(rows)])
    k = q.shape[1]
    inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    return torch._convert_weight_to_int4pack(pack_nibbles(q), inner_k_tiles)


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


def quantize_int4_packed(w: Tensor, group_size: int, nibbles: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(kernel-packed codes, scales_and_zeros, nibble-packed rows if asked) of w [N, K], `_block_rows(K)` rows
    at a time: the code matrix of a 262k-row vocabulary is never whole, which keeps quantize-while-loading's peak
    memory near the size of the quantized model."""
    outs: list[Tensor | None] = [None, None, None]
    rows = _block_rows(w.shape[-1])
    for i, chunk in enumerate(w.split(rows)):
        q, sz = quantize_int4(chunk, group_size)
        parts = (pack_int4(q), sz.transpose(0, 1), pack_nibbles(q) if nibbles else None)
        for j, part in enumerate(parts):
            if part is None:
                continue
            if outs[j] is None:  # both packed layouts grow linearly with the rows along dim 0
                outs[j] = part.new_empty((part.shape[0] * w.shape[0] // chunk.shape[0], *part.shape[1:]))
            start = i * rows * part.shape[0] // chunk.shape[0]
            outs[j][start:start + part.shape[0]] = part
    packed, sz, nib = outs
    return packed, sz.transpose(0, 1).contiguous(), nib


def int4_kernel_operands(q: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, int]:
    """(packed codes, scales_and_zeros, group size) for codes chosen elsewhere, e.g. a GGUF's Q4 blocks: q [N, K]
    in 0..15 with w = scale * q + zero per group (scale, zero [N, groups]), i.e. the kernel's
    (q - 8) * scale + (zero + 8 * scale). The codes are kept as they are; only scale and zero are rounded to
    bf16, so a file's 4-bit weights are not rounded a second time."""
    n, k = q.shape
    group_size = k // scale.shape[1]
    problem = int4_problem(n, k, group_size, q.device)
    if problem:
        raise ValueError(f"cannot pack this weight as int4: {problem} (use int8 for it)")
    sz = torch.stack([scale, zero + 8 * scale], dim=-1).to(COMPUTE_DTYPE).transpose(0, 1).contiguous()
    return pack_int4(q), sz, group_size
