"""QLoRA: LoRA adapters over a frozen base whose linear weights are stored in int8 or int4.

The inference kernels (`_weight_int8pack_mm`, the int4 packs) have no backward, and LoRA needs the gradient
with respect to each layer's input. So a `QuantizedBase` keeps its codes in a plain layout (int8 rows, or
two 4-bit codes per byte with quantize.py's group-wise scales and zeros) and dequantizes one layer at a time:
in the forward, and again in the backward instead of keeping the dequantized weight, which is what makes the
memory QLoRA's. The codes come from the same quantizers as inference (`quantize_int8`, `quantize_int4`).

What is quantized: the LoRA-targeted linears. The tied embedding/head stays in the compute dtype (it is also
the output layer, and quantizing it would cost quality where LoRA cannot correct it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.quantize_codes import pack_nibbles, quantize_int4, quantize_int8


class QuantizedBase(nn.Module):
    """A frozen, bias-free linear stored as int8 (per output row) or int4 (per group of inputs)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 32):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QLoRA bases have no bias (Gemma's linears have none)")
        w = linear.weight.detach()
        self.out_features, self.in_features = w.shape
        self.bits, self.dtype = bits, w.dtype
        if bits == 8:
            q, scales = quantize_int8(w, torch.float32)
            self.register_buffer("codes", q)
            self.register_buffer("scales", scales)
        else:
            if self.in_features % group_size:
                raise ValueError(f"int4 needs in_features divisible by {group_size}, not {self.in_features}")
            q, sz = quantize_int4(w, group_size)
            self.register_buffer("codes", pack_nibbles(q))  # two codes per byte
            self.register_buffer("scales", sz.transpose(0, 1).contiguous())  # [N, K/G, 2]
        self.group_size = group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        if self.bits == 8:
            w = self.codes.float() * self.scales[:, None]
        else:
            q = torch.stack([self.codes >> 4, self.codes & 15], dim=-1).view(self.out_features, -1, self.group_size)
            scale, zero = self.scales[..., :1].float(), self.scales[..., 1:].float()
            w = ((q.float() - 8) * scale + zero).view(self.out_features, self.in_features)
        return w.to(dtype or self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _DequantizedLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class _DequantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, base: QuantizedBase) -> Tensor:
        ctx.base = base
        return F.linear(x, base.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.base.dequantize(grad.dtype), None


def quantize_targets(model: nn.Module, paths: list[str], bits: int) -> None:
    """Replace each linear at `paths` by its QuantizedBase (called before the LoRA layers wrap them)."""
    for path in paths:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, QuantizedBase(model.get_submodule(path), bits))
