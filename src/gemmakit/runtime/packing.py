"""oneDNN weight prepacking: faster CPU matmuls for inference, at every batch size the engine runs.

Why. On CPU a plain `x @ W.T` goes to MKL. For the row counts of decoding (1 to 8 rows against [N, K]
weights) MKL's small-row GEMV runs well below the memory bandwidth and gets slower as rows are added, on
the 262k x 640 tied head of Gemma 3 270M as on the layers' matrices. oneDNN, given the weight once in its
own blocked layout (`mkldnn._reorder_linear_weight`), streams it faster and holds its time nearly flat from
1 to 8 rows, in fp32 and bf16 alike, and is faster at prefill's hundreds of rows too (docs/performance.md,
"Packed weights", has the figures). Inductor's `freezing` mode does the same for a whole compiled graph,
but then holds its own constant copy of every weight; packing per module keeps eager prefill and the
compiled decode steps on one set of weights.

How. `pack_linears(model)` replaces each float `nn.Linear` on CPU by a `PackedLinear` that keeps only the
packed weight. A packed weight is an opaque MKLDNN tensor that torch.compile cannot take as a graph input,
so the module reaches it through the custom op `gemmakit::packed_linear`, which takes a handle (an int)
into a table of packed weights: dynamo sees a constant and an opaque call with a known output shape, and
the compiled step calls oneDNN directly.

The tied head. The output head is the embedding table, which lookups still need in its plain layout, so
`head=True` adds a packed copy (the table's size again: +336 MB for the 270M in bf16, counted by
`packed_bytes` and so by the engine's memory forecast). One-row steps under torch.compile still use the plain
table: there inductor's decomposed row reduction (compiled.py) streams it at close to the memory bandwidth,
faster than oneDNN's packed product, in fp32 and bf16.

Where gemmakit's kernels have AVX512_BF16 tiles (runtime/gemv.py, `bf16_pairs`), a bf16 linear that keeps its
plain weight sends products of 2-8 rows (a batch's decode step) there instead: they read the plain weight at close
to the memory's speed, where oneDNN's packed bf16 product takes well over that at those rows.

Limits. Inference only (no autograd through the op), CPU, float32 and bfloat16; the packed weights are not
in `state_dict`, so pack a model loaded for serving, not one that will be trained or saved. Quantized
modules (quantize.py) have their own kernels and are left alone.

Where oneDNN cannot pack bf16 (AVX2 CPUs: probe.py), it has no fast bf16 GEMM either, and torch's bf16
product of many rows runs several times slower than fp32's on the same machine (docs/performance.md,
"AVX2-only CPUs"). There `upcast_linears` gives bf16 linears an `UpcastLinear`: prompts and batched steps
multiply in fp32 by a passing fp32 copy of the weight (bf16 -> fp32 is exact, and oneDNN's bf16 GEMM
accumulates in fp32 too), a block of weight rows at a time so the copy stays small; one-row steps, which
only stream the weight, read the bf16 weight as before.

fp16 through fbgemm. Better still, where torch has fbgemm (its x86 builds), `half_linears` gives a bf16
model's decoder linears and tied head a `HalfLinear`: the weight converted to fp16 and packed by fbgemm,
which multiplies fp32 rows by it (F16C conversion, fp32 FMA) close to the memory bandwidth at one row and as
a real GEMM at many, where torch's bf16 product is emulated (docs/performance.md, "AVX2-only CPUs"). It is the
same product: every bf16 value of magnitude 2^-17 or more is an fp16 value (fp16 has three more mantissa
bits; only its narrower exponent range differs), so below that a weight loses at most 2^-25, far under the
bf16 rounding of the output; activations go to fp32 exactly, sums are fp32 and rounded to bf16 as torch's
bf16 product rounds them. A matrix with a weight fp16 cannot hold (|w| >= 65520) is left as it was. Memory:
an fp16 copy beside each bf16 weight (kept for `state_dict`, adapters and gradients) and of the tied head (the
embedding lookups still read the table), which fbgemm pads to whole blocks of 512 input features (a 640-wide
matrix takes 1.6 times its size). Where gemmakit's AVX2 kernels build, a decode step's few rows skip fbgemm and
read the bf16 weight itself (`HalfLinear.gemv_rows`, runtime/gemv.py): fewer bytes, and no call through Python.
"""

from __future__ import annotations

import itertools
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.runtime import gemv
from gemmakit.runtime.probe import fbgemm_fp16, onednn_packs

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Row count oneDNN chooses the blocked layout for; any count works, the engine's batches are about this size.
_LAYOUT_ROWS = 8

# Rows from which an `UpcastLinear` multiplies in fp32: below it, converting the weight costs more than the
# slow bf16 product does. Weight elements converted at a time, so the fp32 copy stays a passing few MB.
UPCAST_ROWS = 8
_UPCAST_BLOCK = 1 << 22

_PACKED: dict[int, Tensor] = {}
_handles = itertools.count()


@torch.library.custom_op("gemmakit::packed_linear", mutates_args=())
def packed_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    """x [..., K] @ W.T for the packed weight W [out_features, K] registered under `handle`."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], None, "none", [], "")


@packed_linear.register_fake
def _(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def packing_supported(weight: Tensor) -> bool:
    """Whether `weight` can be packed here: a CPU weight of a dtype this machine's oneDNN really packs (its bf16
    reorder needs AVX-512 or AVX-NE-CONVERT; runtime/probe.py asks it rather than reading CPU flags)."""
    return weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES and onednn_packs(weight.dtype)


class PackedLinear(nn.Module):
    """A bias-free linear whose weight is held in oneDNN's blocked layout. `plain`, when given, is the same
    weight in its ordinary layout, kept as `weight` (so `state_dict` keeps the checkpoint's names) for one-row
    products, which compiled steps stream faster from it; a tied head passes the embedding table, and
    `plain_one_row=False` where its one-row products should still take the packed layout (eager engines)."""

    def __init__(self, weight: Tensor, plain: Tensor | None = None, plain_one_row: bool | None = None):
        super().__init__()
        # One-row products read the plain layout where it is kept for them (compiled one-row steps stream it
        # faster); a tied head keeps it anyway, for the embedding lookups, and says here whether to read it.
        self.plain_one_row = plain is not None if plain_one_row is None else plain_one_row and plain is not None
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.handle = next(_handles)
        _PACKED[self.handle] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _LAYOUT_ROWS)
        weakref.finalize(self, _PACKED.pop, self.handle, None)
        self.weight = plain  # an nn.Parameter registers under the checkpoint's name; a tensor stays an alias
        # Products of 2 to this many rows read the plain bf16 weight through gemmakit's AVX512_BF16 tiles (set by
        # the runtime where they run, runtime/gemv.py): a batch step's rows, where oneDNN's packed product is
        # slower.
        self.gemv_rows = 0

    @property
    def packed_bytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if self.plain_one_row and rows == 1:
            return F.linear(x, self.weight)
        if x.requires_grad and torch.is_grad_enabled():  # the op has no backward: fail, never drop gradients
            raise RuntimeError("packed weights are for inference: load without packing (`pack=False`, "
                               "`--pack off`) to train or to take gradients")
        if 1 < rows <= self.gemv_rows and x.dtype == torch.bfloat16:
            return gemv.linear(x, self.weight)
        return packed_linear(x, self.handle, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
                f"packed{' + plain' if self.weight is not None else ''}")


def bf16_pairs_take(m: PackedLinear) -> bool:
    """Whether a packed linear's batch rows go to gemmakit's AVX512_BF16 tiles: a bf16 one that keeps its plain
    weight, on a CPU where they run (`gemv.bf16_pairs`; the caller checks the kernels are available)."""
    return m.dtype == torch.bfloat16 and m.weight is not None and gemv.bf16_pairs()


def pack_linears(model: nn.Module, keep_plain: bool = False, head: bool = True) -> nn.Module:
    """Replace, in place, every bias-free float `nn.Linear` on CPU by a `PackedLinear`, and with `head` give a
    tied-head Gemma a packed copy of its output head. `keep_plain` keeps the ordinary weights too (twice the
    memory of those layers) for compiled one-row steps, which are faster on them. Returns the model; packing
    a packed model changes nothing."""
    for parent in _decoder_parents(model):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and packing_supported(child.weight):
                setattr(parent, name, PackedLinear(child.weight, child.weight if keep_plain else None))
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head and getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding) \
            and packing_supported(embed.weight):
        model.lm_head = PackedLinear(embed.weight, embed.weight.detach(), plain_one_row=keep_plain)
    return model


def _decoder_parents(model: nn.Module) -> list[nn.Module]:
    """The modules whose linears get a machine layout: the decoder's, not an image / audio tower's, whose
    code reads its own weights (their layout stays the checkpoint's)."""
    if hasattr(model, "decoder_modules"):
        return [model, *model.decoder_modules()]
    return list(model.modules())


def packed_bytes(model: nn.Module) -> int:
    """Memory held by the model's packed weights, which are neither parameters nor buffers."""
    return sum(m.packed_bytes for m in model.modules() if isinstance(m, (PackedLinear, HalfLinear)))


_HALF: dict[int, list] = {}
_FP16_MAX = 65504.0
# fbgemm packs one matrix on one thread, and a 262k-row head took seconds at load: its rows are packed in
# blocks of this many on all threads, and the product runs block by block (no slower: each block streams).
_HALF_BLOCK_ROWS = 32768


@torch.library.custom_op("gemmakit::half_linear", mutates_args=())
def half_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    """fp32 x [..., K] @ W.T for the fbgemm fp16 weight W [out_features, K] registered under `handle`. Nothing
    else happens in here: a compiled step calls it from Python each time, and the casts around it fuse into
    the graph's neighbouring kernels."""
    blocks = _HALF[handle]
    if len(blocks) == 1:
        return torch.ops.quantized.linear_dynamic_fp16(x, blocks[0])
    return torch.cat([torch.ops.quantized.linear_dynamic_fp16(x, b) for b in blocks], dim=-1)


@half_linear.register_fake
def _(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def half_supported(weight: Tensor) -> bool:
    """Whether `weight` can take fbgemm's fp16 layout: a bf16 (or fp32, for a screen's copy) CPU matrix fp16 can
    hold, on an x86 torch."""
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or weight.dim() != 2 or not fbgemm_fp16():
        return False
    # By blocks of rows: abs() of a 262k-row table would be a transient of its size.
    block = max(1, _UPCAST_BLOCK // weight.shape[1])
    return all(bool(w.abs().amax() < _FP16_MAX) for w in weight.detach().split(block))


class HalfLinear(nn.Module):
    """A bias-free bf16 linear multiplied through fbgemm's packed fp16 copy of its weight (module docstring);
    the head screen also builds one over an fp32 head (screen.py). `weight` stays the original weight (a
    parameter keeps the checkpoint's name; a tied head passes the table as a plain tensor); products that need
    gradients take it through the ordinary product."""

    def __init__(self, weight: Tensor, packed: list | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.handle = next(_handles)
        if packed is None:
            packed = _prepack_fp16(weight.detach().split(_HALF_BLOCK_ROWS))
        _HALF[self.handle] = packed
        weakref.finalize(self, _HALF.pop, self.handle, None)
        self.weight = weight
        # Decode rows up to this many read the bf16 weight in place through gemmakit's AVX2 kernel (set by
        # the runtime where it applies, runtime/gemv.py): fbgemm streams its padded fp16 copy slower.
        self.gemv_rows = 0

    @property
    def packed_bytes(self) -> int:
        return self.bytes_for(self.out_features, self.in_features)

    @staticmethod
    def bytes_for(out_features: int, in_features: int) -> int:
        """Memory fbgemm's fp16 copy of an [out, in] weight holds: it pads the inner dimension to whole blocks
        of 512 and the outer one to whole vector tiles."""
        # Blocks of _HALF_BLOCK_ROWS rows are whole tiles, so packing a tall weight in blocks adds no padding.
        return _round_up(in_features, 512) * _round_up(out_features, 32) * 2

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight)
        if x.shape[:-1].numel() <= self.gemv_rows:
            return gemv.linear(x, self.weight)
        return half_linear(x.float(), self.handle, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fbgemm fp16"


def _prepack_fp16(blocks: list[Tensor] | tuple[Tensor, ...]) -> list:
    """fbgemm's packed fp16 form of each weight block, packed on torch's threads at once (the op releases the
    GIL)."""
    def pack(w: Tensor) -> object:
        return torch.ops.quantized.linear_prepack_fp16(w, None)

    if len(blocks) <= 1 or torch.get_num_threads() == 1:
        return [pack(w) for w in blocks]
    with ThreadPoolExecutor(min(len(blocks), torch.get_num_threads())) as pool:
        return list(pool.map(pack, blocks))


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def half_linears(model: nn.Module, head: bool = True) -> int:
    """Give every bias-free bf16 `nn.Linear` of the decoder a `HalfLinear` in place, and with `head` a tied-head
    Gemma an fp16 head; returns how many (0 where fbgemm is missing)."""
    places = [(parent, name, child.weight) for parent in _decoder_parents(model)
              for name, child in parent.named_children()
              if type(child) is nn.Linear and child.bias is None and child.weight.dtype == torch.bfloat16
              and half_supported(child.weight)]
    # The layers' matrices are small: pack them on all threads at once, as a head's blocks are.
    packed = _prepack_fp16([w.detach() for _, _, w in places])
    for (parent, name, w), one in zip(places, packed, strict=True):
        setattr(parent, name, HalfLinear(w, [one]))
    count = len(places)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head and getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding) \
            and embed.weight.dtype == torch.bfloat16 and half_supported(embed.weight):
        model.lm_head = HalfLinear(embed.weight.detach())
        count += 1
    return count


class UpcastLinear(nn.Linear):
    """A bf16 linear for CPUs without a fast bf16 GEMM (see the module docstring): products of `UPCAST_ROWS`
    rows or more run in fp32 on the upcast weight (and bias), a block of rows at a time; fewer rows, or
    weights of another dtype, take the ordinary product. Same parameters, so `state_dict` is unchanged."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> UpcastLinear:
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[:-1].numel() < UPCAST_ROWS or self.weight.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        xf = x.float()
        block = max(1, _UPCAST_BLOCK // self.in_features)
        biases = self.bias.split(block) if self.bias is not None else [None] * len(self.weight.split(block))
        parts = [F.linear(xf, w.float(), None if b is None else b.float())
                 for w, b in zip(self.weight.split(block), biases, strict=True)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).to(x.dtype)


class UpcastConv2d(nn.Conv2d):
    """A bf16 convolution run in fp32 (an image tower's patch embedding): torch has no fast bf16 kernel for
    it where oneDNN has no bf16, and falls back to a slow reference loop."""

    @classmethod
    def wrap(cls, conv: nn.Conv2d) -> UpcastConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        m.weight, m.bias = conv.weight, conv.bias
        return m

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype != torch.bfloat16:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


def upcast_linears(model: nn.Module) -> int:
    """Give every bf16 CPU `nn.Linear` (and `nn.Conv2d`) of `model`, the towers' included, its upcasting form in
    place; returns how many. The parameters stay where they are, so code that reads a weight still finds it."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = {nn.Linear: UpcastLinear, nn.Conv2d: UpcastConv2d}.get(type(child))
            w = child.weight if kind is not None else None
            if w is not None and w.dtype == torch.bfloat16 and w.device.type == "cpu":
                setattr(parent, name, kind.wrap(child))
                count += 1
    return count
