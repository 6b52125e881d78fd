"""Gemma 4's image encoder (HF `model.vision_tower`) and the projection into the text model (`model.embed_vision`).

Design:
- Every Gemma 4 checkpoint that reads images ships this tower, so it is one module tree switched by two flags
  rather than a class per variant: `use_clipped_linears` (the E-series were trained with activation ranges
  clamped around every linear and need the stored ranges at inference) and `standardize` (the large models
  re-centre the soft tokens with stored statistics). Names follow the checkpoint (`...q_proj.linear.weight`,
  `...q_proj.input_min`, `std_bias`), so a state dict loads strictly with no renaming table to maintain.
- Images keep their aspect ratio, so a batch mixes grids of different shapes. Rather than a per-image loop,
  each image arrives as a fixed-length row of patches with explicit (x, y) positions and padding marked by
  (-1, -1); attention masks the padding as keys, and pooling and RoPE read the positions, not the row index.
  The same code therefore serves any resolution up to the patch budget.
- Position information enters twice, as in the reference: a learned table per axis added to the patch
  embedding, and a 2-D rotary embedding in every attention layer (first half of each head turns with x,
  second half with y).
- Pooling averages k x k blocks of patches into one soft token, in float32 because the sqrt(hidden) scale that
  follows can leave the float16 range; standardization happens in float32 too, before the cast back.
- `MultimodalEmbedder` is modality-agnostic (it is also the audio tower's `embed_audio`): a weightless RMSNorm
  then a bias-free projection into the text width.
- RMSNorm is defined here rather than imported from the decoder so the decoder may later import this module
  without an import cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.config import ConfigError
from gemmakit.media.common import hf_fields

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


@dataclass
class Gemma4VisionConfig:
    """The fields of a Gemma 4 `vision_config` this tower reads; defaults are transformers 5.23's."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Gemma4VisionConfig:
        """Build from the `vision_config` dict of a config.json; unknown keys (model_type, dropout...) are ignored."""
        kwargs = hf_fields(cls, d)
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if self.hidden_activation not in _ACTIVATIONS:
            raise ConfigError(f"vision_config.hidden_activation {self.hidden_activation!r} is not supported; "
                              f"expected one of {sorted(_ACTIVATIONS)}")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config.head_dim must be a multiple of 4 for the 2-D rotary embedding "
                              f"(two axes, rotate-half pairs each), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"vision_config.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                              f"of num_key_value_heads ({self.num_key_value_heads})")

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


class RMSNorm(nn.Module):
    """Gemma 4's RMSNorm: fp32, x * (mean(x^2) + eps)^-0.5, times a plain weight when it has one."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output may be clamped to ranges stored in the checkpoint.

    The four range buffers exist only when clipping is on (as in the checkpoints); they start unbounded so a
    model built without a checkpoint computes a plain linear.
    """

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.clipped = clipped
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            for name, value in (("input_min", -math.inf), ("input_max", math.inf),
                                ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(value))

    def forward(self, x: Tensor) -> Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class VisionPatchEmbedder(nn.Module):
    """Flattened 16x16 patches -> hidden, plus one learned embedding per axis (none on padding patches)."""

    def __init__(self, c: Gemma4VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(c.patch_dim, c.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, c.position_embedding_size, c.hidden_size))

    def forward(self, pixel_values: Tensor, positions: Tensor, padding: Tensor) -> Tensor:
        # The processor leaves pixels in [0, 1]; the model was trained on [-1, 1].
        x = self.input_proj((2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype))
        p = positions.clamp(min=0)
        table = self.position_embedding_table
        pos = F.embedding(p[..., 0], table[0]) + F.embedding(p[..., 1], table[1])
        return x + pos.masked_fill(padding[..., None], 0.0)


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def axial_rope(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [b, n, head_dim] for (x, y) positions [b, n, 2]: each axis owns half the head, and within a half
    the usual rotate-half layout over head_dim/4 frequencies shared by both axes."""
    half = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, 2, device=positions.device, dtype=torch.float) / half))
    freqs = positions.float()[..., None] * inv  # [b, n, 2, half/2]
    emb = torch.cat([freqs[:, :, 0], freqs[:, :, 0], freqs[:, :, 1], freqs[:, :, 1]], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_axial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, n, heads, head_dim]; rotate each axis' half of the head on its own."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    parts = [x[..., i * half:(i + 1) * half] * cos[..., i * half:(i + 1) * half]
             + rotate_half(x[..., i * half:(i + 1) * half]) * sin[..., i * half:(i + 1) * half] for i in range(2)]
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention over the valid patches: QK-norm with weights, weightless V-norm, 2-D RoPE,
    scale 1 (the norms fix the logit scale)."""

    def __init__(self, c: Gemma4VisionConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        clip = c.use_clipped_linears
        self.q_proj = ClippableLinear(c.hidden_size, self.heads * c.head_dim, clip)
        self.k_proj = ClippableLinear(c.hidden_size, self.kv_heads * c.head_dim, clip)
        self.v_proj = ClippableLinear(c.hidden_size, self.kv_heads * c.head_dim, clip)
        self.o_proj = ClippableLinear(self.heads * c.head_dim, c.hidden_size, clip)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.v_norm = RMSNorm(c.head_dim, c.rms_norm_eps, with_scale=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head_dim)), *rope)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)), *rope)
        v = self.v_norm(self.v_proj(x).view(b, n, self.kv_heads, self.head_dim))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: Gemma4VisionConfig):
        super().__init__()
        clip = c.use_clipped_linears
        self.gate_proj = ClippableLinear(c.hidden_size, c.intermediate_size, clip)
        self.up_proj = ClippableLinear(c.hidden_size, c.intermediate_size, clip)
        self.down_proj = ClippableLinear(c.intermediate_size, c.hidden_size, clip)
        self.act = _ACTIVATIONS[c.hidden_activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    """The text model's sandwich block: norms before and after both attention and the MLP."""

    def __init__(self, c: Gemma4VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(c)
        self.mlp = VisionMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, key_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, c: Gemma4VisionConfig):
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(VisionEncoderLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        rope = axial_rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, key_mask)
        return x


def pool_patches(hidden: Tensor, positions: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Average each k x k block of valid patches into one slot, row-major over the pooled grid of each image.

    Returns fp32 [b, n / k^2, d] and the mask of slots that hold a soft token. Every slot is divided by k^2,
    as the reference does; the processor only makes grids whose sides are multiples of k, so blocks are full.
    """
    b, n, d = hidden.shape
    slots = n // (k * k)
    p = positions.clamp(min=0)
    width = p[..., 0].max(dim=-1, keepdim=True).values + 1
    col, row = (torch.div(p[..., i], k, rounding_mode="floor") for i in range(2))
    slot = col + (width // k) * row
    slot = slot.masked_fill(~valid, 0)
    if int(slot.max()) >= slots:
        raise ValueError(f"patch positions describe a grid larger than {n} patches pooled by {k}x{k}; pass "
                         "pixel_values and position_ids as the Gemma 4 image processor makes them")
    h = hidden.float().masked_fill(~valid[..., None], 0.0)
    pooled = torch.zeros(b, slots, d, dtype=torch.float32, device=hidden.device)
    pooled.scatter_add_(1, slot[..., None].expand(b, n, d), h)
    counts = torch.zeros(b, slots, device=hidden.device).scatter_add_(1, slot, valid.float())
    return pooled / (k * k), counts > 0


class Gemma4VisionTower(nn.Module):
    """HF `Gemma4VisionModel`: patches with (x, y) positions -> pooled, scaled (and standardized) soft tokens."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.patch_embedder = VisionPatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def check_inputs(self, pixel_values: Tensor, position_ids: Tensor) -> None:
        c = self.config
        kk = c.pooling_kernel_size**2
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != c.patch_dim:
            raise ValueError(f"pixel_values must be [images, patches, {c.patch_dim}] (flattened {c.patch_size}x"
                             f"{c.patch_size} RGB patches from the Gemma 4 image processor), got "
                             f"{list(pixel_values.shape)}")
        if position_ids.shape != (*pixel_values.shape[:2], 2):
            raise ValueError(f"position_ids must be [images, patches, 2] matching pixel_values "
                             f"{list(pixel_values.shape[:2])}, got {list(position_ids.shape)}")
        if pixel_values.shape[1] % kk:
            raise ValueError(f"the number of patches per image ({pixel_values.shape[1]}) must be a multiple of "
                             f"{kk} (the pooling kernel squared)")
        if int(position_ids.max()) >= c.position_embedding_size:
            raise ValueError(f"a patch position exceeds the position table ({c.position_embedding_size}); the "
                             "image is too large for this model: use a smaller max_soft_tokens")

    def forward(self, pixel_values: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values [b, n, 3*p*p] in [0, 1], position_ids [b, n, 2] (x, y; padding (-1, -1)).

        Returns soft tokens [b, n / k^2, hidden] in the weights' dtype and a mask [b, n / k^2] of the real ones.
        """
        self.check_inputs(pixel_values, position_ids)
        position_ids = position_ids.long()
        valid = (position_ids != -1).any(dim=-1)
        x = self.patch_embedder(pixel_values, position_ids, ~valid)
        x = self.encoder(x, position_ids, valid)
        pooled, mask = pool_patches(x, position_ids, valid, self.config.pooling_kernel_size)
        # The reference rounds the average to the activation dtype before scaling; do the same in bf16.
        pooled = pooled.to(x.dtype).float() * self.config.hidden_size**0.5
        if self.config.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled.to(x.dtype), mask


class MultimodalEmbedder(nn.Module):
    """HF `Gemma4MultimodalEmbedder` (`embed_vision`, `embed_audio`): weightless RMSNorm, then a bias-free
    projection from the tower's width into the text model's."""

    def __init__(self, in_dim: int, text_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.embedding_projection = nn.Linear(in_dim, text_hidden, bias=False)
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps, with_scale=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def gemma4_image_embeddings(tower: Gemma4VisionTower, embedder: MultimodalEmbedder, pixel_values: Tensor,
                            position_ids: Tensor) -> list[Tensor]:
    """Soft tokens in the text model's space: one [n_soft_tokens_i, text_hidden] tensor per image, input order,
    padding removed (what `Gemma4Model.get_image_features(...).pooler_output` holds)."""
    param = next(tower.parameters())
    pooled, mask = tower(pixel_values.to(param.device), position_ids.to(param.device))
    tokens = embedder(pooled[mask])
    return list(tokens.split(mask.sum(dim=1).tolist()))
