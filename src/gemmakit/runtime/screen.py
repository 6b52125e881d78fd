"""Exact greedy picks that read a cheaper copy of the output head: screen, certify, rescore exactly.

Why. A one-row decode step of Gemma 3 270M in float32 streams 1.07 GB of weights, and 671 MB of that is the
tied 262k x 640 output head, read in full to take one argmax. Decoding is bound by memory bandwidth on CPU,
so the head alone is ~60% of the step. A copy of the head at half the bytes (bf16 for a float32 head, or fp16
through fbgemm where bf16 products are slow; int8 with a scale per row for a bf16 one, or for either on
gemmakit's AVX2 kernels) gives every logit to within a bound known exactly per token; only the few tokens
whose bound reaches the best one need their exact logit: 16 rows of the table (64 for the AVX2 kernels'),
not 262,144.

The bound. For vocabulary row w, its copy b and the step's final hidden state x, the screen computes
s = x~ . b in float32 (x~ = x, or x rounded to bf16 where oneDNN's bf16 kernel does the product, or to a
14-bit integer grid for gemmakit's AVX2 screening kernel) and
  |x . w - s| <= |x| |w - b| + |x - x~| |b| + g |x~| |b| (+ the rounding of s to bf16, where it is rounded)
by Cauchy-Schwarz, with g = n u / (1 - n u) the worst float32 error of an n-term dot product in any order
(u = 2^-24; a few u more for the scales and for computing |b|). |w - b| and |b| are per token and
precomputed; the norms of x are per step.

The certificate. Take the K + 1 highest upper bounds (s + bound), compute exact logits for the first K from
the table (float32 sums, rounded to the head's dtype as the model's head rounds them) and pick their best,
ties to the lowest id as argmax does. If the (K + 1)-th upper bound is below that best less its rounding
allowance (for bf16, one bf16 step: an outside token must round below the best, not tie it), no token
outside the K can beat it: the pick is the full head's argmax, except where two logits are within float32
summation error of a tie or of a bf16 rounding boundary (where two kernels of the full head may differ too).
A row whose certificate fails settles (`HeadScreen.settle`): every token whose upper bound reaches that floor
is rescored exactly, which is the same argument over all of them; only a row where more than SETTLE_MAX do (or
a NaN row) costs its step the full head (`HeadScreen.fallbacks`). Settling lets a wider bound pay per row
rather than per step: the AVX-512 VNNI pass rounds a batch's x to 8 bits (gemv.screen_bits), which halves its
multiply-adds and leaves a few percent of rows of real text to settle.

When it applies. Tied heads on CPU, float32, or bf16 without a final soft-cap (capping bf16 logits makes ties the
screen would not reproduce); the int8 heads of int8 models (the same soft-cap rule) where gemmakit's kernels
compute them and the pass has its AVX-512 build (with only its AVX2 build, at the step sizes where the plan timed
it faster than the head's kernel): the screen reads the head's own codes, so it adds no copy and its bound has no
|w - b| term, and at a batch step's several rows VNNI multiply-adds or AMX tiles outrun the head's fp32 ones; and
tied int4 heads through an int8 copy (`Int4Head`): in batch engines where the pass runs on AMX, steps of 2-8 rows
(torch's int4 kernel is bound by multiply-adds there); where the head is on gemmakit's AVX2 int4 kernel, the step
sizes at which the plan timed the copy's pass faster than the head (that kernel widens every code to fp32, so
bytes or multiply-adds bind it, by CPU). It applies to rows whose token is a plain argmax of the raw logits:
temperature 0 with no penalties, bias, loop-guard penalty, constraint or logprobs (each of those reads logits the
screen never computes). The engine decides per step (engine.py); a step with any other row uses the full head. The
copy is read by compiled one-row steps (inductor's vectorised reduction, compiled.py) and, for float32 heads on
packed models, by multi-row and eager steps through oneDNN's packed layout of the bf16 copy (bf16 heads: no int8
kernel beats oneDNN's bf16 one on several rows, so those steps take the full head). Where vectors are 256 bits
wide and gemmakit's AVX2 kernels build (gemv.py), either head's copy is int8, read by their screening pass at
every step of up to 8 rows, compiled or eager: x rounded to 14-bit integers (its rounding is one more term of the
bound, like the packed path's bf16 x) and exact integer sums, to which the kernel adds each token's bound as it
writes them (eager torch ops over the [rows, V] sums took an 8-row step as long as the pass); at a batch's rows
on AVX-512 VNNI, x on an 8-bit grid instead, its bytes' products twice as many an instruction. Its bound is wider than a
half-precision copy's, so it rescores 64 candidates, not 16. One-row steps of a float head can read an int4
copy instead (groups of 32, on gemmakit's int4 kernel, where this CPU packs int4 for AVX2 and the plan timed its
pass faster than the int8 one): 5/8 of the bytes, a bound about ten times wider, so most rows settle from a
thousand or more exact rows, gathered for the float kernel; an engine of one row then keeps no int8 copy. Where
those kernels are missing and oneDNN has no bf16, a float32 head's copy is fbgemm's fp16 one, read by every step.
Memory: the copy in each layout the engine's steps read (270M: +336 MB bf16 per layout, +512 MB for fbgemm's
padded fp16, +168 MB int8, +105 MB int4); the engine's forecast counts it. The gain is largest for fp32 one-row
steps, where the head is most of the bytes; less at 8 rows, and less for bf16 models, whose int8 pass is
compute-bound rather than bandwidth-bound
(benchmarks/engine_vs_peers.py measures it; docs/performance.md, "The greedy head screen").
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gemmakit.quantize_codes import pack_int4, quantize_int4
from gemmakit.runtime import gemv
from gemmakit.runtime.packing import HalfLinear, PackedLinear, packed_linear, packing_supported

CANDIDATES = 16  # exact rescoring costs 16 x 640 x 4 bytes; a wider gap fails the certificate less often
# The int8 copy's bound is wider than a half-precision copy's, so more tokens reach the best one: with 16
# candidates some rows of real text fell back to the full head (on an 8-row step, a fallback of any row costs
# the step a full head), with 64 none did (benchmarks/screen_certificate.py; docs/performance.md).
GEMV_CANDIDATES = 64
# The most tokens a row left uncertified rescores exactly (`settle`) before its step takes the full head: the
# byte pass's bound left up to about 1,400 on real text (benchmarks/screen_bits.py, 8-bit x), and rescoring
# 4,096 rows reads about a sixtieth of the 270M's head.
SETTLE_MAX = 4096
# The int4 copy of a float head that one-row steps read (`HeadScreen(quarter=True)`): groups of 32 on a plain
# min/max grid (built at every start-up; quantize.py's refitted search takes several times as long, though it
# leaves fewer tokens to settle). Its bound is about ten times the int8 copy's, so most rows settle, from
# hundreds to tens of thousands of tokens on real text (benchmarks/screen_certificate.py); up to an eighth of
# the vocabulary is rescored before a step takes the full head.
QUARTER_GROUP, QUARTER_FIT = 32, ((1.0,), 0)
QUARTER_SETTLE = 8
_U32, _U16 = 2.0**-24, 2.0**-8  # unit roundoff of float32 and bfloat16


@dataclass(frozen=True)
class Int8Head:
    """An int8 output head: codes [V, H] with a scale per row (quantize.Int8Linear's buffers), whose logits the
    model computes in `dtype`. Its screen reads the codes themselves (no copy, so the bound has no |w - b|
    term) and rescores candidates from them."""

    codes: Tensor
    scales: Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def timings(self, rows: int, repeats: int = 5) -> tuple[float, float]:
        """Seconds of a greedy pick over `rows` rows (`pick_timings`): the head on gemmakit's int8 kernel, then
        the screen's pass over the same codes. Both read the same bytes; the pass does half the arithmetic, so
        it wins where multiply-adds bind the kernel and ties where bandwidth does, less its top-k."""
        scales = self.scales.float()
        return pick_timings(lambda x: gemv.int8(x, self.codes, self.scales),
                            lambda x: gemv.screen_int8(x, self.codes, scales)[0], rows, self.shape[1], repeats)


@dataclass(frozen=True)
class Int4Head:
    """An int4 output head (quantize.Int4Linear `head`) tied to the table that looks its rows up
    (quantize.QuantizedEmbedding `table`, reading the head's codes), for activations of `dtype`. Its screen
    is an int8 copy built from the table's rows a block at a time, and rescoring dequantizes the candidates'
    rows the same way. The int4 head is half the copy's bytes, so the copy pays only at steps where the head's
    kernel is bound by multiply-adds rather than by bytes: several rows on AMX, and elsewhere wherever the plan
    times its pass faster here (`timings`)."""

    head: nn.Module
    table: nn.Module
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.head.out_features, self.head.in_features))

    def rows(self, ids: Tensor) -> Tensor:
        return self.table.rows(ids, torch.float32)

    def timings(self, rows: int, repeats: int = 5) -> tuple[float, float]:
        """Seconds of a greedy pick over `rows` rows (`pick_timings`): the head on its kernel (gemmakit's AVX2
        int4 kernel where the head fits it, else torch's, in its packing for this CPU), then the screen's pass
        over an int8 copy. Either kernel widens every code to a float, so multiply-adds or bytes bind it by CPU;
        the pass reads twice the bytes with integer multiply-adds. The copy is a stand-in of the head's shape
        (the pass's speed does not depend on the codes), freed on return."""
        head = self.head
        codes = torch.ones(self.shape, dtype=torch.int8)  # written, so the pages are real, not the zero page
        scales = torch.ones(self.shape[0])
        if gemv.int4_fits(head.out_features, head.in_features, head.group_size):
            full = lambda x: gemv.int4(x, head.weight, head.scales_and_zeros, head.group_size)  # noqa: E731
        else:
            full = head  # its forward: torch's int4 kernel at a batch's rows
        return pick_timings(full, lambda x: gemv.screen_int8(x, codes, scales)[0], rows, self.shape[1], repeats)

    def bf16_kernel(self) -> bool:
        """Whether a batch step's head product is torch's int4 kernel, which takes x and gives logits in bf16
        (gemmakit's takes and gives fp32): asked once the engine has given its linears their kernels."""
        return self.head.gemv_rows < gemv.INT4_ROWS


def pick_timings(full: Callable[[Tensor], Tensor], screened: Callable[[Tensor], Tensor], rows: int, width: int,
                 repeats: int = 5) -> tuple[float, float]:
    """Median seconds of a greedy pick over `rows` rows of `width` by the full head (`full`, then argmax) and by
    a screen's pass (`screened`, then its top candidates), each warmed up once, timed interleaved so a slow
    moment of the machine hits both. Where the head is quantized, which is faster depends on how the CPU's
    multiply-adds compare with its memory bandwidth, which no flag tells: the plan asks this instead."""
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    return interleaved_medians(lambda: full(x).argmax(dim=-1), lambda: top_k(screened(x), GEMV_CANDIDATES + 1),
                               repeats)


def quarter_timings(head: Tensor, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one row's screening pass over an int8 copy of the float `head` [vocab, width] (its
    bound added in the kernel), then over an int4 copy with its bound added by tensor ops
    (`HeadScreen._screen_quarter`). The int4 copy is 5/8 of the bytes with more work a byte, so which is faster
    depends on the CPU's bandwidth against its vector units. The passes' speed does not depend on the codes,
    so theirs are the head's own bytes (`stand_in_codes`): only the scales and norms are allocated, where
    stand-in copies would raise every engine's start-up peak by a copy and a half of the head."""
    vocab, width = head.shape
    x = torch.randn(1, width, generator=torch.Generator().manual_seed(0))
    codes, codes4 = stand_in_codes(head)
    scales, norms = torch.ones(vocab), torch.ones(3, vocab)
    sz = torch.ones(width // QUARTER_GROUP, vocab, 2, dtype=torch.bfloat16)
    coef = (x.norm(dim=-1, keepdim=True), norms[1:], 1e-6)
    return interleaved_medians(lambda: top_k(gemv.screen_int8(x, codes, scales, None, coef)[0], GEMV_CANDIDATES + 1),
                               lambda: top_k(gemv.int4(x, codes4, sz, QUARTER_GROUP) + norms[0] * 2 + norms[1],
                                             GEMV_CANDIDATES + 1), repeats)


def stand_in_codes(head: Tensor) -> tuple[Tensor, Tensor]:
    """Codes to time a float `head` [V, H]'s copies with: int8 [V, H] and packed int4 [V, H / 2], read from two
    disjoint spans of the head's own bytes (a float head holds both: 2 or 4 bytes a weight against 1.5), so
    each pass reads memory the other has not just read. Any bytes serve (the kernels do the same work whatever
    the codes, and the timed sums are thrown away). New codes where the head's bytes are not one contiguous CPU
    block."""
    vocab, width = head.shape
    eight, four = vocab * width, vocab * (width // 2)
    if head.device.type == "cpu" and head.is_contiguous() and head.numel() * head.element_size() >= eight + four:
        raw = head.detach().reshape(-1).view(torch.uint8)
        return raw[:eight].view(torch.int8).view(vocab, width), raw[eight:eight + four].view(vocab, width // 2)
    return torch.ones(vocab, width, dtype=torch.int8), torch.ones(vocab, width // 2, dtype=torch.uint8)


def interleaved_medians(first: Callable[[], object], second: Callable[[], object],
                        repeats: int) -> tuple[float, float]:
    """Median seconds of each call, both warmed up once, then timed in turn `repeats` times, so a slow moment of
    the machine hits both: what the plan's start-up timings compare."""
    calls = (first, second)
    for call in calls:
        call()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for call, out in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def int4_head(model: nn.Module, dtype: torch.dtype) -> Int4Head | None:
    """The tied int4 head of a Gemma quantized to int4 on CPU (an int4 `lm_head` whose table reads the same
    scales), for activations of `dtype`; None otherwise, or where logits are soft-capped (torch's int4 kernel
    rounds them to bf16, and capping bf16 logits ties tokens the screen would tell apart)."""
    head, table = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    sz = getattr(head, "scales_and_zeros", None)
    if not (isinstance(sz, Tensor) and getattr(head, "device_type", None) == "cpu"
            and callable(getattr(table, "rows", None)) and getattr(table, "scales", None) is sz):
        return None
    capped = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return None if capped or dtype not in (torch.float32, torch.bfloat16) else Int4Head(head, table, dtype)


def head_codes(model: nn.Module, dtype: torch.dtype) -> Int8Head | None:
    """The int8 output head of a Gemma quantized to int8 (an `lm_head` whose buffers are int8 codes and a
    scale per row), on CPU, for activations of `dtype`; None for any other head, or for a bf16 model whose
    logits are soft-capped (as `head_weight`)."""
    head = getattr(model, "lm_head", None)
    q, scales = getattr(head, "weight", None), getattr(head, "scales", None)
    if not (isinstance(q, Tensor) and isinstance(scales, Tensor) and q.dtype == torch.int8 and q.dim() == 2
            and q.device.type == "cpu" and scales.shape == q.shape[:1]):
        return None
    capped = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return Int8Head(q, scales, dtype) if dtype == torch.float32 or (dtype == torch.bfloat16 and not capped) else None


def head_weight(model: nn.Module) -> Tensor | None:
    """The tied output head (the embedding table) of a Gemma on CPU that a screen applies to, or None: a
    float32 one, or a bfloat16 one whose logits are not soft-capped (capping bf16 logits ties tokens that
    the screen would tell apart); not a quantized head or another device."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(embed, nn.Embedding) or embed.weight.device.type != "cpu":
        return None  # a quantized table, or another device
    head = getattr(model, "lm_head", "absent")
    # A head module over the table itself (a packed, fp16 or gemmakit-kernel head keeps it as `weight`).
    weight = getattr(head, "weight", None)
    if head is not None and not (isinstance(weight, Tensor) and weight.data_ptr() == embed.weight.data_ptr()):
        return None
    w = embed.weight.detach()
    capped = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return w if w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and not capped) else None


class HeadScreen(nn.Module):
    """A screen over a float32 head `weight` [V, H] in bf16, or over a bf16 one in int8 with a scale per row
    (not copied: rescoring reads it), or over an int8 head's own codes (`Int8Head`), or an int4 head in an int8
    copy (`Int4Head`), the last two on gemmakit's kernels only.
    `packed` (float32 heads) also keeps oneDNN's layout of the bf16 copy, for multi-row and eager steps
    (packing.py says why that layout is faster); `plain` keeps the copy in its ordinary layout, for compiled
    one-row steps (at least one of the two). `rows`, on gemmakit's kernels: the fewest and most rows of the
    steps it screens (the plan's timed choice for a quantized head on gemmakit's AVX2 kernels). `quarter`, on
    gemmakit's kernels for a float head: one-row steps read an int4 copy instead (`_screen_quarter`; a quarter
    of a bf16 head's bytes), and the int8 copy is built only for steps of more rows."""

    def __init__(self, weight: Tensor | Int8Head | Int4Head, packed: bool = False, plain: bool = True,
                 half: bool = False, gemv_kernel: bool = False, rows: tuple[int, int] | None = None,
                 candidates: int | None = None, quarter: bool = False):
        super().__init__()
        self.codes = weight if isinstance(weight, Int8Head) else None
        self.int4 = weight if isinstance(weight, Int4Head) else None
        if (self.codes is not None or self.int4 is not None) and not gemv_kernel:
            raise ValueError("quantized heads are screened by gemmakit's kernels only (gemv_kernel=True)")
        self.exact = weight if isinstance(weight, Tensor) else None
        self.out_dtype, self.vocab = weight.dtype, weight.shape[0]  # the head's logits: their dtype, how many
        # torch's int4 kernel rounds x to bf16 and its logits to bf16, gemmakit's rounds x onto its 14-bit grid
        # (gemv.int4): the screen and rescoring take x as the head's kernel does.
        self.x_bf16 = self.int4 is not None and self.int4.bf16_kernel()
        self.x_grid = self.int4 is not None and not self.x_bf16
        if self.x_bf16:
            self.out_dtype = torch.bfloat16
        # The step sizes gemmakit's kernels screen (`usable`): the plan's, else every one up to a batch step's,
        # but for an int4 head from two (at one row the int4 head reads half the copy's bytes).
        self.min_rows, self.max_rows = rows or (2 if self.int4 is not None else 1, gemv.INT8_ROWS)
        self.k = candidates or (GEMV_CANDIDATES if gemv_kernel else CANDIDATES)
        # fbgemm's fp16 copy of a float32 head (packing.HalfLinear), for every step where there is no fast
        # bf16 product (AVX2): fbgemm rounds to fp16 as torch does (probe.fbgemm_fp16 checks), so the bound's
        # norms come from torch's fp16 copy, a block at a time.
        self.fp16 = HalfLinear(weight) if half else None
        # gemmakit's AVX2 screening kernel (gemv.screen_int8) reads an int8 copy of either head dtype at any step
        # of up to gemv.INT8_ROWS rows, compiled or eager: x rounded to 14-bit integers, sums exact in int32,
        # twice the multiply-adds an instruction of fp32 FMAs (a many-row pass over the head is bound by them).
        self.gemv_kernel = gemv_kernel
        if half or gemv_kernel:
            packed = plain = False
        if quarter and not (gemv_kernel and self.exact is not None
                            and gemv.int4_fits(*weight.shape, QUARTER_GROUP)):
            raise ValueError("an int4 copy is for float heads on gemmakit's kernels, of a shape it packs")
        # Without steps of several rows to serve, a screen with an int4 copy keeps no int8 one.
        eight = not (quarter and self.max_rows == 1)
        build = eight and not half and self.codes is None and (weight.dtype != torch.float32 or gemv_kernel)
        if half or not eight:
            cheap, scale = None, None
        elif self.codes is not None:  # the head's codes, shared; fp32 scales for the kernel (a copy if bf16)
            cheap, scale = self.codes.codes, self.codes.scales.float()
        elif not build:
            cheap, scale = weight.to(torch.bfloat16), None
        else:  # int8 with a scale per row, filled by blocks of rows below (no float32 copy of the table)
            cheap, scale = torch.empty(weight.shape, dtype=torch.int8), torch.empty(self.vocab)
        self.register_buffer("cheap", cheap, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        # |w - b| and |b| per token, as one [2, V] buffer: gemmakit's kernel reads both as it adds the bound.
        self.register_buffer("norms", torch.empty(2, self.vocab if eight else 0), persistent=False)
        # The int4 copy: codes in torch's AVX2 packing, bf16 scales and zeros, and two norms a token (`_fill_quarter`).
        width = weight.shape[1]
        for name, shape, dtype in (("quarter_codes", (self.vocab, width // 2), torch.uint8),
                                   ("quarter_sz", (width // QUARTER_GROUP, self.vocab, 2), torch.bfloat16),
                                   ("quarter_norms", (2, self.vocab), torch.float32)):
            self.register_buffer(name, torch.empty(shape, dtype=dtype) if quarter else None, persistent=False)
        self.settle_max = max(SETTLE_MAX, self.vocab // QUARTER_SETTLE) if quarter else SETTLE_MAX
        widest = self._fill_blocks(build)
        n = weight.shape[1]
        # Worst float32 error of an n-term dot product, plus the scale product and computing the copy's norms.
        self.gamma = n * _U32 / (1 - n * _U32) + 4 * _U32
        self.rescore_slack = self.gamma * widest
        self.packed = None
        if packed and scale is None and packing_supported(cheap):
            self.packed = PackedLinear(cheap)
        self.copy_bytes = weight.numel() * 2 if half else 0 if cheap is None else cheap.numel() * cheap.element_size()
        held = ((self.codes.codes, self.codes.scales) if self.codes is not None else (self.exact,)
                if self.int4 is None else (self.int4.head.weight, self.int4.head.scales_and_zeros))
        self.head_bytes = sum(t.numel() * t.element_size() for t in held)
        if not plain and self.packed is not None:
            self.cheap = None  # only the packed layout is read
        self.fallbacks = 0  # steps that computed the full head: a row could not settle
        self.settled = 0  # rows their candidates did not certify, settled from their bounds

    def _fill_blocks(self, build: bool) -> float:
        """The norms, and with `build` the int8 copy and its scales, a block of rows at a time, each block's
        exact rows read once (an int4 head's are dequantized); returns the widest row norm of the head.
        Blocks write into preallocated outputs: a float32 copy of the table would be a transient of its size (a
        bf16 table's own norm() makes one), and small per-block results kept between the blocks' temporaries
        fragment the heap (either left resident memory behind that the process never handed back)."""
        widest = 0.0
        for i in range(0, self.vocab, 1024):
            j = i + 1024
            w = None if self.codes is not None else self._exact_rows(i, j)
            if build:
                self.scale[i:j] = w.abs().amax(dim=-1).clamp_min(1e-30) / 127
                self.cheap[i:j] = (w / self.scale[i:j, None]).round().clamp(-127, 127)
            if self.norms.numel():
                c = self._decoded(i, j)
                w = c if w is None else w
                self.delta_norm[i:j] = (w - c).norm(dim=-1)
                self.cheap_norm[i:j] = c.norm(dim=-1)
            if self.quarter_codes is not None:
                self._fill_quarter(i, j, w)
            widest = max(widest, float(w.norm(dim=-1).max()))
        return widest

    def _fill_quarter(self, start: int, stop: int, w: Tensor) -> None:
        """Rows [start, stop) of the int4 copy from the exact rows w, with |w - b| and a bound m >= |b| on the
        float32 fold's terms. The kernel sums each group's codes against x~ exactly, then adds scale * sum(q x~)
        and (zero - 8 scale) * sum(x~) in float32, whose rounding is relative to |scale| (q + 8) + |zero| <=
        23 |scale| + |zero| per weight, not to b itself; m is from that per group (it multiplies the bound's
        small terms only, and a group's scale and zero are 1/32 of its weights to read)."""
        q, sz = quantize_int4(w, QUARTER_GROUP, *QUARTER_FIT)
        self.quarter_codes[start:stop] = pack_int4(q)
        self.quarter_sz[:, start:stop] = sz
        scale, zero = sz.float().permute(2, 1, 0)[..., None]  # [rows, groups, 1] each
        b = q.float().view(q.shape[0], scale.shape[1], -1).sub_(8).mul_(scale).add_(zero)  # dequantized, in place
        self.quarter_norms[0, start:stop] = b.sub_(w.view_as(b)).flatten(1).norm(dim=-1)
        per_group = scale.abs().mul_(23).add_(zero.abs())[..., 0]  # [rows, groups]
        self.quarter_norms[1, start:stop] = per_group.norm(dim=-1) * math.sqrt(QUARTER_GROUP)

    @property
    def delta_norm(self) -> Tensor:
        return self.norms[0]

    @property
    def cheap_norm(self) -> Tensor:
        return self.norms[1]

    def _exact_rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the head in float32."""
        if self.int4 is not None:
            return self.int4.rows(torch.arange(start, min(stop, self.vocab)))
        return self.exact[start:stop].float()

    def _decoded(self, start: int, stop: int) -> Tensor:
        if self.fp16 is not None:
            return self.exact[start:stop].half().float()
        c = self.cheap[start:stop].float()
        return c if self.scale is None else c * self.scale[start:stop, None]

    def usable(self, rows: int, compiled: bool) -> bool:
        """Whether a step of `rows` rows can use the screen: eager float32 GEMMs over the copy would read
        more than the head itself, so it needs inductor's one-row pass, oneDNN's packed copy or fbgemm's fp16
        one."""
        if self.gemv_kernel:
            return self.min_rows <= rows <= self.max_rows
        return (compiled and rows == 1 and self.cheap is not None) or self.packed is not None or self.fp16 is not None

    @property
    def bytes_saved(self) -> int:
        """How many fewer bytes a screened step of `max_rows` rows reads than the full head: the head, less the
        copy and the per-token numbers read with it (the int4 copy's, where it serves one row only)."""
        if self.max_rows == 1 and self.quarter_codes is not None:
            read = (self.quarter_codes, self.quarter_sz, self.quarter_norms)
            return self.head_bytes - sum(t.numel() * t.element_size() for t in read)
        per_token = sum(t.numel() * t.element_size() for t in (self.scale, self.norms) if t is not None)
        return self.head_bytes - self.copy_bytes - per_token

    @property
    def nbytes(self) -> int:
        """Memory the screen adds: its buffers, less what it shares with an int8 head, and packed copies."""
        shared = {t.data_ptr() for t in (self.codes.codes, self.codes.scales)} if self.codes is not None else set()
        own = sum(t.numel() * t.element_size() for t in self.buffers() if t.data_ptr() not in shared)
        return own + sum(m.packed_bytes for m in (self.packed, self.fp16) if m is not None)

    def forward(self, x: Tensor, layout: str = "packed") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: [B, H] final hidden states (after the norm), screened through the copy in `layout` ("plain": one
        row, for compiled steps; "packed": any rows). Returns (tokens [B], certified [B] bool, upper [B, V],
        floor [B]): a row's pick is certified where no token outside its candidates has an upper bound at
        its floor; one that is not can still settle (`settle`) from its upper bounds and floor."""
        x = self._input(x)
        x_norm = x.norm(dim=-1, keepdim=True)
        upper = self._screen(x, x_norm, layout)
        values, indices = top_k(upper, self.k + 1)
        idx = indices[:, : self.k]
        exact = self._rescore(x, idx)  # [B, K] float32 logits of the candidates
        if self.out_dtype != torch.float32:  # the model's head rounds its logits to its dtype
            exact = round_to_bf16(exact)
        best = exact.amax(dim=-1)
        # Ties go to the lowest token id, as argmax over the full head does. The ids are reduced as int32:
        # inductor's AVX2 code for this masked int64 min returned the reduction's identity, 2^63 - 1
        # (tests/test_screen.py runs under AVX2 in CI); a vocabulary is far below 2^31.
        tokens = idx.int().masked_fill(exact != best[:, None], self.vocab).amin(dim=-1).long()
        if self.out_dtype != torch.float32:  # an outside token must round below the best, not tie it
            best = best - torch.ldexp(torch.ones_like(best), torch.frexp(best).exponent - 8)
        floor = best - x_norm[:, 0] * self.rescore_slack
        return tokens, values[:, self.k] < floor, upper, floor

    def settle(self, x: Tensor, upper: Tensor, floor: Tensor) -> int | None:
        """The greedy pick of one row that `forward` left uncertified, from its hidden state x [H], upper
        bounds [V] and floor: every token whose bound reaches the floor is rescored exactly, and the rest are
        below the pick by the certificate's argument (the floor is below the best candidate's logit by that
        rescoring's error, and settling only raises the best). Those tokens include the candidates, since their
        bounds reached the (K + 1)-th. None where more than SETTLE_MAX tokens reach it, or none does (a NaN
        row): the caller then computes the full head. A wider bound (the byte pass's grid) leaves more rows to
        settle, each costing a pass over its V bounds and a few hundred exact rows, far less than a full head."""
        idx = (upper >= floor).nonzero()[:, 0]
        if not 0 < idx.numel() <= self.settle_max:
            return None
        exact = self._rescore(self._input(x[None]), idx[None], many=True)[0]
        if self.out_dtype != torch.float32:
            exact = round_to_bf16(exact)
        best = exact.max()
        if not bool(best.isfinite()):
            return None
        self.settled += 1
        return int(idx[exact == best].min())

    def _input(self, x: Tensor) -> Tensor:
        """x as the head's kernel takes it: in bf16 for torch's int4 kernel (`x_bf16`), on the grid for
        gemmakit's (`x_grid`), else float32."""
        if self.x_grid:
            return gemv.on_grid(x)
        return x.to(torch.bfloat16).float() if self.x_bf16 else x.float()

    def _rescore(self, x: Tensor, idx: Tensor, many: bool = False) -> Tensor:
        """The head's float32 logits [B, K] of tokens `idx` [B, K]; an int8 head's as its kernel sums them,
        the codes' products first, then the row's scale. `many`: one row's tokens, up to `settle_max` of them,
        which a float head's rows give to gemmakit's kernel as they are gathered (no float32 copy of them)."""
        if self.int4 is not None:
            return (x[:, None, :] * self.int4.rows(idx)).sum(-1)
        if many and self.exact is not None and self.gemv_kernel:
            return gemv.floats(x, self.exact[idx[0]])
        if self.codes is None:
            return (x[:, None, :] * self.exact[idx].float()).sum(-1)
        return (x[:, None, :] * self.cheap[idx].float()).sum(-1) * self.scale[idx]

    def _screen(self, x: Tensor, x_norm: Tensor, layout: str) -> Tensor:
        """Upper bounds [B, V] of the float32 logits (module docstring). A screen with fbgemm's fp16 copy reads
        it for every step, whatever the layout asked."""
        if self.fp16 is not None:  # fp32 x times the fp16 copy, float32 sums: x~ = x
            s = self.fp16(x)
            return s + x_norm * (self.delta_norm + self.gamma * self.cheap_norm) * (1 + 2 * self.gamma)
        if self.quarter_codes is not None and (x.shape[0] == 1 or self.cheap is None):
            return self._screen_quarter(x, x_norm)
        if self.gemv_kernel:  # x~ (x on a 14-bit grid) times the int8 copy, exact integer sums, scaled in fp32;
            # the kernel adds |x| |w - b| + (|x - x~| + gamma |x~|) |b| as it writes each sum (gemv.screen_int8)
            return gemv.screen_int8(x, self.cheap, self.scale, None, (x_norm, self.norms, self.gamma))[0]
        if layout == "plain":
            if self.cheap is None or x.shape[0] != 1:
                raise RuntimeError("the plain copy serves one-row steps of screens built with plain=True")
            # Compiled, inductor turns this into one vectorised pass over the copy (compiled.py), float32 sums;
            # eager, it would make a float32 copy of the table, which is why only compiled steps take it.
            s = (x[:, None, :] * self.cheap.float()).sum(-1)
            s = s if self.scale is None else s * self.scale
            # (1 + 2 gamma): the norms themselves carry float32 error.
            return s + x_norm * (self.delta_norm + self.gamma * self.cheap_norm) * (1 + 2 * self.gamma)
        if self.packed is None:
            raise RuntimeError("this screen has no packed copy: use it in compiled one-row steps (see `usable`)")
        if layout != "packed":
            raise ValueError(f"unknown screen layout {layout!r}: plain or packed")
        x16 = x.to(torch.bfloat16)
        s = packed_linear(x16, self.packed.handle, self.packed.out_features).float()
        x16f = x16.float()
        rounding = (x - x16f).norm(dim=-1, keepdim=True)
        bound = (x_norm * self.delta_norm + (rounding + self.gamma * x16f.norm(dim=-1, keepdim=True))
                 * self.cheap_norm + 2 * _U16 * s.abs())
        return s + bound * (1 + 2 * self.gamma)

    def _screen_quarter(self, x: Tensor, x_norm: Tensor) -> Tensor:
        """Upper bounds [B, V] from the int4 copy b: s = x~ . b by gemmakit's int4 kernel (x~ on its 14-bit grid,
        exact integer sums per group), plus |x| |w - b| + (|x - x~| + gamma |x~|) m, where m >= |b| bounds
        what the kernel's float32 fold rounds (`_fill_quarter`). The bound is added by tensor ops: compiled
        one-row steps fuse them into one pass over the [V] sums."""
        s = gemv.int4(x, self.quarter_codes, self.quarter_sz, QUARTER_GROUP)
        xg = gemv.on_grid(x)
        off = (x - xg).norm(dim=-1, keepdim=True) + self.gamma * xg.norm(dim=-1, keepdim=True)
        return s + (x_norm * self.quarter_norms[0] + off * self.quarter_norms[1]) * (1 + 2 * self.gamma)


def round_to_bf16(x: Tensor) -> Tensor:
    """float32 `x` rounded to the nearest bfloat16 (ties to even), kept in float32. In integer operations
    because inductor drops a `.to(torch.bfloat16).float()` round trip inside a fused kernel, and the screen's
    ties must be the bf16 head's ties. Infinities stay; NaN stays NaN (its bits could carry over)."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return torch.where(x.isnan(), x, bits.view(torch.float32))


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x.topk(k) of [B, V] rows (values, indices), over the k blocks of values with the highest maxima: the k
    largest values lie in those, since each block outside holds nothing above the k-th largest block maximum.
    torch's CPU topk over a 262k row is slow, a visible share of an 8-row step; block maxima vectorise. The
    two topk calls then rank V / block maxima and k * block values, least work near block = sqrt(V / k); twice
    that measured a little faster (fewer, longer rows for the maxima), as a power of two from 64 to 1024."""
    rows, width = x.shape
    block = 2 ** min(10, max(6, round(math.log2(2 * math.sqrt(width / k)))))
    if width % block or width < 4 * k * block:
        return x.topk(k, dim=-1)
    blocks = x.view(rows, width // block, block)
    chosen = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [B, k]
    values, at = blocks.gather(1, chosen[..., None].expand(-1, -1, block)).flatten(1).topk(k, dim=-1)
    return values, chosen.gather(1, at // block) * block + at % block


def screen_bytes(weight: Tensor | Int8Head | Int4Head, packed: bool, plain: bool = True, half: bool = False,
                 gemv_kernel: bool = False, rows: tuple[int, int] | None = None, candidates: int | None = None,
                 quarter: bool = False) -> int:
    """Memory a `HeadScreen(weight, packed, plain, half, gemv_kernel, rows, candidates, quarter)` adds: the bf16
    copy in one or both layouts, the fp16 one, or the int8 one and its scales (an int8 head's: fp32 scales where
    its own are not), and two norms a token; an int4 copy's codes, scales and zeros, and norms."""
    vocab, width = weight.shape
    if quarter:
        four = vocab * width // 2 + width // QUARTER_GROUP * vocab * 4 + 2 * vocab * 4
        return four + (0 if rows and rows[1] == 1 else vocab * width + 3 * vocab * 4)
    if isinstance(weight, Int4Head):
        return vocab * width + 3 * vocab * 4
    if isinstance(weight, Int8Head):
        return vocab * 4 * (2 + int(weight.scales.dtype != torch.float32))
    if half:
        return HalfLinear.bytes_for(vocab, width) + 2 * vocab * 4
    if weight.dtype != torch.float32 or gemv_kernel:
        return vocab * width + 3 * vocab * 4
    return vocab * width * 2 * (int(packed) + int(plain or not packed)) + 2 * vocab * 4
