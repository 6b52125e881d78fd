"""Decode-step products on x86 CPUs, int4 / int8 / bf16 / fp32 weights: gemmakit's own AVX2 kernels (`gemv_avx2.cpp`).

Why our own. A quantized one-row decode step is nearly all weight reading, so its kernels should run at the
memory's speed. torch's CPU int4 and int8 kernels do on some AVX-512 CPUs, but their AVX2 builds are bound by
arithmetic instead: on such CPUs they took most of an int4 step (docs/performance.md, "A real AVX2 CPU"). On an
AVX-512 + AMX Xeon, inductor's int8 reductions and oneDNN's packed fp32 product also streamed below these
kernels ("CPU C with gemmakit's kernels"), so the plan takes them on every x86 CPU where they build. The kernels
here do the same sums with the work arranged for 256-bit vectors: the int4 one reads torch's own packing
(blocks of 32 rows, [K, 16] bytes each), so one 16-byte load is one input for 32 outputs and the kernel
vectorises over rows (several rows of x widen each code once); the int8 one runs along K, eight weight rows
sharing each load of x and eight streams of codes in flight. In the int8 kernel activations stay fp32
(torch's kernels round them to bf16), so the result is the dequantized product in another summation order:
the same maths, rounded less.

int4 products. The int4 kernel takes x as the int8 layers do (below), on the 14-bit grid (`on_grid`), and
sums each group's codes against x~ exactly: one row with 16-bit multiply-adds, two inputs of a row an
instruction and no code converted to float (widening each code to fp32 held the one-row pass below the
memory's speed on CPU B: docs/performance.md, "int4 products on the grid"), several rows in fp32 tiles whose
integer products and sums are exact too, so a row gets the same bits alone or in a batch. Rounding x moves a
product by at most |x - x~| |w| (tests/test_gemv.py checks that bound), less than torch's kernel's bf16 x does.

int8 layers. An int4 model of the 270M keeps most of its layers int8 (the GGUF's 640-wide matrices, and every
v_proj), and at a batch step's 8 rows their fp32 tiles were bound by multiply-adds, each code widened to fp32.
So the layers' decode rows (`int8_grid`) take the screen's pass instead: x rounded per row onto the screen's
integer grid, exact int32 sums of 16-bit multiply-adds, twice the products an instruction. Rounding x there
moves a product on average several times less than torch's int8 kernel's bf16 x does, in rows with a far
larger outlier a little more (docs/performance.md, "int8 layers on the screen's grid"), and because the sums
are exact a row gets the same bits however many rows share its step.
An int8 head keeps the fp32 kernel: its screen certifies picks against that product. So do layers past
`GRID_FULL_K` inputs, whose exact sums would need a coarser grid.

Float weights. A float model's decode step is bound by memory as well, and on AVX2 the products it had were
not: oneDNN's packed fp32 product and fbgemm's fp16 one (bf16 models: torch's bf16 product is emulated there)
stream the layers' weights well below the bandwidth, and fbgemm reads a 640-wide matrix padded to 1024. The
float kernel reads the model's own fp32 or bf16 weight in place with the int8 kernel's arrangement (a bf16
value widens to fp32 with a shift), sums in fp32 and rounds a bf16 output once, as torch's bf16 product does.
`GemvLinear` sends an fp32 linear's decode rows to it and its prompts to torch's product; bf16 linears keep
fbgemm for prompts (packing.HalfLinear) and send decode rows here.

The head screen. A greedy step's pass over the head's int8 copy (screen.py) needs upper bounds, not exact
sums, so `screen_int8` rounds x to 14-bit integers (the bound counts what that moved) and sums exactly in
int32 with 16-bit multiply-adds: twice the products an instruction of fp32 FMAs, which bound the pass over a
262k-row head at several rows (docs/performance.md has what that gains on CPU B). On the AVX-512 VNNI pass a
batch's rows go on an 8-bit grid (`screen_bits`): byte products, twice as many an instruction again and no
widening of the codes, so the pass at 8 rows is bound by reading them; the wider bound leaves more rows for the
screen to settle (screen.py). Given the screen's norms,
it adds each token's bound as it writes the token's sum, rather than leaving torch ops to pass over the
[rows, 262k] result again. The pass reads an int8 model's head codes as they are, too (screen.Int8Head): its
screen needs no copy.

Wider CPUs. Where ATen runs AVX-512 and the CPU has VNNI (`vector_width`), the several-row tiles also come in an
AVX-512 build (function attributes, so the file still runs on AVX2-only CPUs): twice the lanes a multiply-add,
eight rows of x a tile in 32 registers, and for the screen one instruction per 16-bit pair product and sum, two
weight rows a step against every row of x so that each load of x feeds two of them. Where the CPU also has
AMX-INT8 and Linux grants the process its tiles (`screen_amx`), the screen's pass for 2-8 rows runs on AMX: x~
split into two signed bytes fills a tile's 16 columns with 8 rows, the sums stay exact, and the pass is bound by
reading the codes instead of by multiply-adds. One-row steps keep the AVX2 paths, which already stream at the
memory's speed. Where the CPU also has AVX512_BF16 (`bf16_pairs`), a bf16 model's batch rows (bf16 x, bf16
weights) take tiles of bf16 pairs: one instruction multiplies 16 pairs exactly and adds them to fp32 sums, with
no widening, so those steps read the layers at close to the memory's speed, where oneDNN's packed bf16 product
and the widening tiles spent well over that time; the plan sends a oneDNN-packed bf16 model's 2-8 row products
there (packing.PackedLinear). A run held to AVX2 takes none of these.

Only a decode step's few rows come here (up to `INT4_ROWS` / `INT8_ROWS` / `FLOAT_ROWS`, a batch-8 step): for
several rows of x each weight is widened once per pass of up to four rows (eight in the AVX-512 build), in
tiles that keep a dozen sums in registers, so a batch-8 step is bound by the multiply-adds rather than by the
loads feeding them; that beats torch's kernels there too on cold weights (benchmarks/cpu_products.py).
Prompts keep the plan's GEMM paths.

Decode attention. The same library holds a decode attention kernel (`attention_avx2.cpp`, `attention`): each
(row, KV head) pair's key and value rows read once, in place, against all its query heads, where torch's SDPA
ran two GEMMs of a few rows each (docs/architecture.md, "Decode attention").

The C++ is built at run time with torch's extension builder, once per machine, torch version and kernel
source (kept in `~/.cache/gemmakit/kernels`), and only on x86 CPUs where ATen runs AVX2 or wider. Anything
that stops it (no compiler, a failed build, a result that disagrees with the reference on a probe) leaves
torch's kernels in place and says why (`unavailable()`); it never raises. `GEMMAKIT_GEMV=off` turns the
kernels off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.files import cache_dir
from gemmakit.model import decode_plain
from gemmakit.quantize_codes import (
    cpu_int4_block_rows,
    dequantize_int4,
    quantize_int4,
    quantize_int4_packed,
    quantize_int8,
)
from gemmakit.runtime.probe import cpu_capability

_SOURCES = [Path(__file__).with_name(name) for name in ("gemv_avx2.cpp", "screen_avx2.cpp", "attention_avx2.cpp")]
_HEADERS = [Path(__file__).with_name(name) for name in ("lanes_avx2.h", "tiles_avx2.h")]  # included: part of the key
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for in the kernels splits rows by it
_NAME = "gemmakit_gemv_avx2"
BLOCK_ROWS = 32  # rows per block of torch's AVX2 int4 packing, the only layout the int4 kernel reads
GRID_TOP = 8191  # x~'s largest integer: AMX's split of x~ into two signed bytes holds 14 bits (gemv_avx2.cpp)
# The widest K whose grid keeps all 14 bits (past it int32 sums stay exact only on a coarser grid): int8 layers
# wider than this keep fp32 x (quantize.use_gemv_kernels), so a large model's wide down_proj is not rounded more.
GRID_FULL_K = (2**31 - 1) // (127 * GRID_TOP)
# The fewest rows whose screening pass takes bytes (`screen_bits`): at 2 or 3 both grids read the codes at the
# memory's speed, and the wider bound would only leave more rows to settle.
BYTES_FROM = 4
INT4_ROWS = INT8_ROWS = FLOAT_ROWS = 8  # products of up to this many rows go to the kernels (a batch-8 step)
_registered = False  # whether the ops' shape functions (for torch.compile) are registered
# Whether several-row passes take the kernels' AVX-512 build (set by `unavailable`, read where a product is
# called: a plain global, which compiled steps guard on, rather than a cached call traced into their graphs).
_wide = False
_amx = False  # and the screen's pass of 2-8 rows its AMX one
_bf16 = False  # and bf16 products of bf16 x their AVX512_BF16 tiles


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
    global _wide, _amx, _bf16
    _wide = cpu_capability() == "AVX512" and bool(torch.ops.gemmakit_avx2.avx512_vnni())
    _amx = _wide and bool(torch.ops.gemmakit_avx2.amx_int8())
    _bf16 = _wide and bool(torch.ops.gemmakit_avx2.avx512_bf16())
    return None if _agrees() else "gemmakit's AVX2 kernels disagree with the reference here"


def vector_width() -> int:
    """The vector width of the kernels' several-row passes: 512 on CPUs with AVX-512 and VNNI where ATen runs
    AVX-512 (a run held to AVX2 takes the AVX2 build, as an AVX2 CPU would), else 256. A batch step's passes
    are bound by their multiply-adds, and one AVX-512 instruction does twice an AVX2 one's (four times, for the
    screen's 16-bit pairs: VNNI multiplies and adds in one). Ask `unavailable()` first."""
    return 512 if _wide else 256


def screen_amx() -> bool:
    """Whether the screen's pass of 2-8 rows runs on AMX tiles here (AVX-512 CPUs with AMX-INT8, where Linux
    grants the process its tiles): bound by reading the codes rather than by multiply-adds. One row keeps the
    AVX2 pass, which reads them as fast."""
    return _amx


def bf16_pairs() -> bool:
    """Whether several-row products of bf16 x by bf16 weights run on AVX512_BF16 here (CPUs whose several-row
    passes are 512 bits wide and have it): one instruction multiplies 16 pairs of bf16 values exactly into fp32
    sums, so a bf16 model's batch step reads its weights as they are with half the multiply-adds of widening
    them to fp32 first, and outruns oneDNN's packed bf16 product at a batch's few rows. Ask `unavailable()`
    first."""
    return _bf16


def _build() -> None:
    from torch.utils.cpp_extension import load

    ninja = _ninja_dir()
    path = os.environ.get("PATH", "")
    if ninja and ninja not in path.split(os.pathsep):
        os.environ["PATH"] = ninja + os.pathsep + path  # the pip `ninja` package puts its binary here
    where = build_dir()
    where.mkdir(parents=True, exist_ok=True)
    with _builder_lock(where):
        if not (where / f"{_NAME}.so").exists():
            print("gemmakit: building its AVX2 decode kernels (once per machine and torch version)...",
                  file=sys.stderr, flush=True)
        load(name=_NAME, sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(where), is_python_module=False, verbose=False)
    global _registered
    if not _registered:  # once per process, however often the probe is asked again
        for op in ("int4_gemv", "int8_gemv", "int8_grid", "float_gemv"):
            torch.library.register_fake(f"gemmakit_avx2::{op}")(_fake)
        torch.library.register_fake("gemmakit_avx2::int8_screen")(_fake_screen)
        torch.library.register_fake("gemmakit_avx2::decode_attention")(_fake_attention)
        _registered = True


def build_dir() -> Path:
    """Where this machine's build of the kernels lives: keyed by what goes into the build, so a changed kernel
    or torch builds afresh (and says so)."""
    source = b"".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:12]
    return cache_dir("kernels") / f"torch-{torch.__version__}-{key}"


@contextlib.contextmanager
def _builder_lock(where: Path) -> Iterator[None]:
    """One builder at a time in `where`, and no build left waiting on a dead one.

    torch's builder marks a build with a `lock` file that it removes when done, and every other process waits
    for that file to go. A builder that is killed (Ctrl-C at the wrong moment, a CI timeout) leaves the file
    behind, and from then on every gemmakit process would hang at start-up. So gemmakit's builders first take
    an OS lock of their own, which the kernel drops when its holder dies however it dies; whoever holds it knows
    no live gemmakit builder owns torch's `lock`, and removes one it finds."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file is all there is
        yield
        return
    with open(where / "gemmakit-build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # waits while another process builds or loads
        try:
            stale = where / "lock"
            if stale.exists():
                print(f"gemmakit: removing {stale}, left by a kernel build that did not finish",
                      file=sys.stderr, flush=True)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def _ninja_dir() -> str | None:
    try:
        import ninja

        return ninja.BIN_DIR
    except (ImportError, AttributeError):
        return None


def _fake(x: Tensor, weight: Tensor, *rest: object) -> Tensor:  # rest: scales, group or `wide`
    return x.new_empty(x.shape[0], weight.shape[0])  # in x's dtype: fp32, or bf16 for a bf16 float product


def _fake_screen(xq: Tensor, x_scale: Tensor, q: Tensor, scales: Tensor, isa: int, coef: Tensor,
                 norms: Tensor) -> Tensor:
    return x_scale.new_empty(xq.shape[0], q.shape[0])


def _fake_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query per row, q [B, Hq, 1, D], over k, v [B, Hk, S, D] (fp32 or bf16, unit stride along D: a
    narrowed cache is read in place) where mask [B, 1, 1, S] lets it; out in q's dtype (`attention_avx2.cpp`)."""
    return torch.ops.gemmakit_avx2.decode_attention(q, k, v, mask, scale)


def attention_from(pairs: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """`attention` for steps of at least `pairs` (row, KV head) pairs, plain ops for narrower ones: in a
    compiled fp32 step inductor fuses those with the ops around them (model.decode_plain)."""
    if q.shape[0] * k.shape[1] < pairs:
        return decode_plain(q, k, v, mask, scale)
    return attention(q, k, v, mask, scale)


def _agrees() -> bool:
    """Every kernel against the fp32 product of its decoded weight, one row and three (their two paths), on
    shapes with every tail the kernels handle."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 96, generator=g), torch.randn(3, 96, generator=g)
    q, s = quantize_int8(w[:61, :93], torch.float32)  # 61 rows, 93 inputs: the row and K tails
    full = w[:61, :93].contiguous()
    q64, s64 = quantize_int8(w[:, :64].contiguous(), torch.float32)  # K = 64: the screen's AMX pass, where taken
    plain = lambda rows: rows  # noqa: E731
    products = [(int8, (q, s), q.float() * s[:, None], 93, plain), (floats, (full,), full, 93, plain),
                (floats, (full.bfloat16(),), full.bfloat16().float(), 93, plain)]
    if cpu_int4_block_rows(96) == BLOCK_ROWS:  # the int4 kernel takes x on the grid (`int4`)
        packed, sz, _ = quantize_int4_packed(w, 32)
        products.append((functools.partial(int4, group=32), (packed, sz), dequantize_int4(*quantize_int4(w, 32)), 96,
                         on_grid))
    exact = all(torch.allclose(kernel(rows[:, :k], *operands), rounded(rows[:, :k]) @ weight.T, rtol=1e-4, atol=1e-4)
                for kernel, operands, weight, k, rounded in products for rows in (x[:1], x))
    # bf16 x (a bf16 model's rows, the AVX512_BF16 tiles' case where they run): the fp32 sum rounded to bf16.
    half, w16 = x[:, :93].bfloat16(), full.bfloat16()
    exact = exact and all(torch.allclose(floats(rows, w16).float(), (rows.float() @ w16.float().T).bfloat16().float(),
                                         rtol=2**-7, atol=1e-4) for rows in (half[:1], half))
    return exact and _grid_is_the_screens(x[:, :93], q, s) and all(
        _screen_within_bound(rows[:, :k], *codes) for rows in (x[:1], x)
        for k, codes in ((93, (q, s)), (64, (q64, s64)))) and _attention_agrees(g)


def _grid_is_the_screens(x: Tensor, q: Tensor, scales: Tensor) -> bool:
    """The int8 layers' rows round x onto the grid in C++ exactly as the screen's pass does in torch ops."""
    return all(torch.equal(int8_grid(rows, q, scales), screen_int8(rows, q, scales, bits=14)[0])
               for rows in (x[:1], x))


def _attention_agrees(g: torch.Generator) -> bool:
    """The decode attention kernel against plain ops: fp32 and bf16 caches read through a narrowed view, 5
    queries per KV head (a group of 4 and one of 1), a head width with a tail, some keys masked, and one row
    over enough keys that it splits them over the threads."""
    for rows, keys in ((3, 40), (1, 1100)):
        q = torch.randn(rows, 10, 1, 36, generator=g)
        k, v = (torch.randn(rows, 2, keys + 3, 36, generator=g).narrow(2, 0, keys) for _ in range(2))
        mask = torch.rand(rows, 1, 1, keys, generator=g) < 0.7
        mask[..., 0] = True
        want = decode_plain(q, k, v, mask, 0.2)
        if not (torch.allclose(attention(q, k, v, mask, 0.2), want, rtol=1e-4, atol=1e-5) and torch.allclose(
                attention(q, k.bfloat16(), v.bfloat16(), mask, 0.2), decode_plain(
                    q, k.bfloat16().float(), v.bfloat16().float(), mask, 0.2), rtol=1e-4, atol=1e-5)):
            return False
    return True


def _screen_within_bound(x: Tensor, q: Tensor, scales: Tensor) -> bool:
    """The screen's pass is off the exact product by no more than what rounding x moved (|x - x~| |b|), plus
    fp32 rounding: the part of the screen's bound that is the kernel's; on each grid the pass has here."""
    decoded = q.float() * scales[:, None]
    for bits in (14, 8) if _wide else (14,):
        s, rounding, _ = screen_int8(x, q, scales, bits=bits)
        if not bool(((s - x @ decoded.T).abs() <= rounding * decoded.norm(dim=-1) + 1e-4).all()):
            return False
    return True


def screen_int8(x: Tensor, q: Tensor, scales: Tensor, isa: int | None = None,
                bound: tuple[Tensor, Tensor, float] | None = None,
                bits: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A head screen's pass (screen.py): x [M, K] against int8 codes q [N, K] with an fp32 scale per row.
    x is rounded to x~, integers times a scale per row: on `bits` = 14, as wide as keeps the kernel's int32 sums
    exact (14 bits up to K = 2064, fewer beyond); on 8, to [-127, 127] for the byte pass (AVX-512 VNNI only),
    whose wider rounding the bound counts (None: `screen_bits`). Returns (x~ . (q * scales) [M, N] fp32,
    |x - x~| [M, 1], |x~| [M, 1]), which the screen's bound needs. `isa`: 0 the AVX2 pass, 1 AVX-512 VNNI, 2 AMX
    (None: the best here). `bound` = (|x| [M, 1], norms [2, N]: |w - b| and |b| per row of q, gamma): the first
    result is then the screen's upper bound, s + (|x| |w - b| + (|x - x~| + gamma |x~|) |b|) (1 + 2 gamma), added
    by the kernel as it writes each sum (separate eager passes over the [M, N] result cost an 8-row step as much
    as the pass)."""
    isa = _isa() if isa is None else isa
    bits = screen_bits(x.shape[0], isa) if bits is None else bits
    if bits not in (8, 14):
        raise ValueError(f"the screen's grid is 8 or 14 bits, not {bits}")
    top = 127 if bits == 8 else min(GRID_TOP, (2**31 - 1) // (127 * max(x.shape[1], 1)))
    x = x.float()
    xq, x_scale = grid(x, top)
    rounded = xq * x_scale[:, None]
    rounding, rounded_norm = (x - rounded).norm(dim=-1, keepdim=True), rounded.norm(dim=-1, keepdim=True)
    coef = norms = x.new_empty(0)  # no bound
    if bound is not None:
        x_norm, norms, gamma = bound
        # (1 + 2 gamma): the norms themselves carry float32 error (screen.py).
        coef = (torch.cat([x_norm, rounding + gamma * rounded_norm], dim=1) * (1 + 2 * gamma)).contiguous()
    xq = xq.to(torch.int8 if bits == 8 else torch.int16).contiguous()
    s = torch.ops.gemmakit_avx2.int8_screen(xq, x_scale, q, scales, isa, coef, norms)
    return s, rounding, rounded_norm


def grid(x: Tensor, top: int = GRID_TOP) -> tuple[Tensor, Tensor]:
    """x [M, K] fp32 on the kernels' integer grid: (x / s rounded half to even, as fp32 integers in [-top, top];
    s [M] = max |x| / top per row). The kernels round x in C++ the same way (onto_grid: the same fp32 division)."""
    x_scale = (x.abs().amax(dim=-1) / top).clamp_min(1e-30)
    return (x / x_scale[:, None]).round(), x_scale


def on_grid(x: Tensor) -> Tensor:
    """x [M, K] as the int8 layers' and int4 kernels take it: rounded per row onto the 14-bit grid, in fp32."""
    xq, x_scale = grid(x.float())
    return xq * x_scale[:, None]


def screen_bits(rows: int, isa: int | None = None) -> int:
    """The grid the screen's pass rounds x onto at a step of `rows` rows on pass `isa` (None: the best here):
    8 bits from `BYTES_FROM` rows on the AVX-512 VNNI pass (bytes halve its multiply-adds, which bind it there
    at a batch's rows; its wider bound leaves more tokens to rescore, screen.py), else 14. AMX's pass is bound
    by reading the codes already, and one row's by reading them on every path."""
    return 8 if (_isa() if isa is None else isa) == 1 and rows >= BYTES_FROM else 14


def floats(x: Tensor, weight: Tensor, wide: bool | None = None) -> Tensor:
    """x [M, K] @ weight^T for an fp32 or bf16 `weight` [N, K] read in place; out in x's dtype (fp32 or bf16;
    a bf16 out is the fp32 sum rounded once). `wide`: as `int8`'s."""
    return torch.ops.gemmakit_avx2.float_gemv(x.contiguous(), weight, _wide if wide is None else wide)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """`floats` for x [..., K] of any leading shape: a linear's decode rows, out [..., N]."""
    rows = x.shape[:-1].numel()
    return floats(x.reshape(rows, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])


class GemvLinear(nn.Module):
    """A bias-free float CPU linear whose decode rows (up to `FLOAT_ROWS`) go to gemmakit's AVX2 kernel and
    whose prompts go to torch's product. `weight` stays the original: a parameter keeps the checkpoint's name,
    a tied head passes the table as a plain tensor (so it is not saved twice). The caller checks the kernels
    are available (`unavailable()`)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.gemv_rows = FLOAT_ROWS

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[:-1].numel() > self.gemv_rows or x.dtype not in (torch.float32, torch.bfloat16) or (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight)
        return linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gemmakit AVX2 decode rows"


def gemv_linears(model: nn.Module) -> int:
    """Give every bias-free fp32 `nn.Linear` of `model` on CPU a `GemvLinear` in place, and a tied-head Gemma
    with an fp32 table a `GemvLinear` head over it; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and child.weight.dtype == torch.float32 \
                    and child.weight.device.type == "cpu":
                setattr(parent, name, GemvLinear(child.weight))
                count += 1
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding) \
            and embed.weight.dtype == torch.float32 and embed.weight.device.type == "cpu":
        model.lm_head = GemvLinear(embed.weight.detach())
        count += 1
    return count


def int4(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group: int) -> Tensor:
    """on_grid(x) [M, K] @ W^T for W in torch's AVX2 int4 packing (`packed` [N, K/2], N a multiple of 32), fp32
    out: x rounded per row onto the 14-bit grid in the kernel, the integer sums exact (module docstring)."""
    return torch.ops.gemmakit_avx2.int4_gemv(x.float().contiguous(), packed, scales_and_zeros, group)


def int8(x: Tensor, q: Tensor, scales: Tensor, wide: bool | None = None) -> Tensor:
    """x [M, K] @ (q [N, K] * scales[:, None])^T, fp32 out. `wide`: the several-row tiles' AVX-512 build
    (None: where `vector_width` is 512)."""
    return torch.ops.gemmakit_avx2.int8_gemv(x.float().contiguous(), q, scales, _wide if wide is None else wide)


def int8_grid(x: Tensor, q: Tensor, scales: Tensor, isa: int | None = None) -> Tensor:
    """`int8` with each row of x first rounded onto the screen's integer grid (`screen_int8`'s x~), then summed
    exactly in int32: the int8 layers' decode rows (quantize.Int8Linear). Several rows run at twice the
    multiply-adds of the fp32 tiles, and a row's result is the same whatever rows share its pass. x~ keeps 14
    bits of each row's largest value (fewer past K = `GRID_FULL_K`, so layers that wide keep `int8`), which
    moves a product about as much as rounding x to bf16, as torch's int8 kernel does, on average several times
    less. `isa`: as `screen_int8`'s."""
    return torch.ops.gemmakit_avx2.int8_grid(x.float().contiguous(), q, scales, _isa() if isa is None else isa)


def _isa() -> int:
    """The screen's pass here: 2 AMX, 1 AVX-512 VNNI, 0 AVX2 (read at call time, as `_wide` is)."""
    return 2 if _amx else int(_wide)


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether an int4 weight of this shape is packed in the layout the int4 kernel reads."""
    return out_features % BLOCK_ROWS == 0 and group % 8 == 0 and cpu_int4_block_rows(in_features) == BLOCK_ROWS
