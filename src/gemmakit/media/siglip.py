"""Gemma 3's eyes: the SigLIP vision tower and the projector that turns its patches into soft tokens.

Gemma 3 (4B and up) embeds an image by running a SigLIP ViT over it, average-pooling the patch grid down to a
fixed number of soft tokens, RMS-normalising them and projecting them into the text model's width. The soft
tokens then replace the `<image_soft_token>` placeholders of the prompt, so the decoder sees them as ordinary
embeddings.

Design:
- Module and parameter names are the HF checkpoint names under `model.vision_tower.` and
  `model.multi_modal_projector.` (transformers 5.23's `Gemma3ForConditionalGeneration`), so a checkpoint loads
  one to one; the lead attaches both modules to the decoder's `model` under those attribute names.
- State dict keys carry SigLIP's `vision_model.` level as released Gemma 3 checkpoints do; transformers 5.x
  drops that level in memory and in what it saves, so loading accepts both spellings.
- SigLIP's attention-pooling head exists in the library config (`vision_use_head`, on by default) but Gemma 3
  checkpoints have none and never use one, so a config asking for it is refused rather than built half-way.
- Positions are SigLIP's learned table at the trained resolution; Gemma 3 never interpolates it (its processor
  always resizes to `image_size`), so any other input size is an error telling the caller to use the processor.
- Attention is torch's scaled_dot_product_attention: the tower is bidirectional with no mask, which is the
  case that kernel serves best. The soft-token norm reuses the decoder's fp32 RMSNorm in its (1 + w) form.
- One function, `gemma3_image_embeddings`, is the whole interface the decoder needs: it runs all images and
  crops through the tower as one batch and hands back one `[mm_tokens_per_image, text_hidden]` tensor each.
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
from gemmakit.model import RMSNorm

_GELU_APPROXIMATION = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF hidden_act -> torch gelu approximate


def _side(value: Any, name: str) -> int:
    """HF lets image/patch sizes be an int or an (h, w) pair; SigLIP in Gemma 3 is square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config.{name} is {value}: only square sizes are supported; give one int")
        value = value[0]
    return int(value)


@dataclass
class SiglipVisionConfig:
    """HF `vision_config` of a Gemma 3 config.json; defaults are transformers 5.23's SiglipVisionConfig."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True

    @classmethod
    def from_hf(cls, d: dict) -> SiglipVisionConfig:
        """From the `vision_config` dict of a config.json (unknown keys such as `model_type` are ignored)."""
        c = cls(**hf_fields(cls, d))
        c.image_size, c.patch_size = _side(c.image_size, "image_size"), _side(c.patch_size, "patch_size")
        if c.image_size % c.patch_size:
            raise ConfigError(f"vision_config.image_size {c.image_size} is not a multiple of patch_size "
                              f"{c.patch_size}; the config is damaged")
        if c.hidden_size % c.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size {c.hidden_size} is not a multiple of "
                              f"num_attention_heads {c.num_attention_heads}; the config is damaged")
        if c.hidden_act not in _GELU_APPROXIMATION:
            raise ConfigError(f"vision_config.hidden_act {c.hidden_act!r} is not one SigLIP uses; expected one of "
                              f"{sorted(_GELU_APPROXIMATION)}")
        return c

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class Gemma3ProjectorConfig:
    """What the multimodal projector needs, read from the top level of a Gemma 3 config.json."""

    vision: SiglipVisionConfig
    text_hidden_size: int = 2304  # transformers 5.23's Gemma3TextConfig default
    mm_tokens_per_image: int = 256

    @classmethod
    def from_hf(cls, d: dict) -> Gemma3ProjectorConfig:
        """From a whole Gemma 3 config.json dict (`vision_config`, `text_config`, `mm_tokens_per_image`)."""
        vision = SiglipVisionConfig.from_hf(d.get("vision_config") or {})
        text = d.get("text_config") or {}
        c = cls(vision, int(text.get("hidden_size", cls.text_hidden_size)),
                int(d.get("mm_tokens_per_image", cls.mm_tokens_per_image)))
        side = math.isqrt(c.mm_tokens_per_image)
        if side * side != c.mm_tokens_per_image or side == 0 or vision.patches_per_side % side:
            raise ConfigError(f"mm_tokens_per_image {c.mm_tokens_per_image} must be a square whose side divides the "
                              f"{vision.patches_per_side}-patch grid; the config is damaged")
        return c

    @property
    def pool_kernel(self) -> int:
        return self.vision.patches_per_side // math.isqrt(self.mm_tokens_per_image)


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side**2, c.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, patches, D], row-major grid
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.n_heads = c.num_attention_heads
        d = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # default scale is head_dim**-0.5, as SigLIP's
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class SiglipMLP(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.approximate = _GELU_APPROXIMATION[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(c) for _ in range(c.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


def _accept_flat_names(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """transformers 5.x holds (and saves) SigLIP without its `vision_model.` level; accept that layout too."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".", 1)[0] in ("embeddings", "encoder", "post_layernorm"):
            state_dict[f"{prefix}vision_model.{rest}"] = state_dict.pop(key)


class SiglipVisionTower(nn.Module):
    """HF `model.vision_tower`: pixel_values [B, 3, S, S] -> last hidden state [B, (S/patch)^2, D]."""

    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        if c.vision_use_head:
            raise ConfigError("vision_config.vision_use_head is true, but Gemma 3 checkpoints have no SigLIP "
                              "pooling head; set it to false (as released Gemma 3 config.json files do)")
        self.config = c
        self.vision_model = SiglipVisionTransformer(c)
        self.register_load_state_dict_pre_hook(_accept_flat_names)

    def forward(self, pixel_values: Tensor) -> Tensor:
        c, vm = self.config, self.vision_model
        want = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected [batch, {want[0]}, "
                             f"{want[1]}, {want[2]}]; prepare images with gemmakit.media.gemma3_images")
        w = vm.embeddings.patch_embedding.weight
        x = vm.embeddings(pixel_values.to(device=w.device, dtype=w.dtype))
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x)


class Gemma3MultiModalProjector(nn.Module):
    """HF `model.multi_modal_projector`: patch states [B, P, D] -> soft tokens [B, mm_tokens_per_image, text_H]."""

    def __init__(self, c: Gemma3ProjectorConfig):
        super().__init__()
        self.config = c
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(c.vision.hidden_size, c.text_hidden_size))
        self.mm_soft_emb_norm = RMSNorm(c.vision.hidden_size, eps=c.vision.layer_norm_eps, offset=True)

    def forward(self, patches: Tensor) -> Tensor:
        b, _, d = patches.shape
        side, k = self.config.vision.patches_per_side, self.config.pool_kernel
        grid = patches.transpose(1, 2).reshape(b, d, side, side)
        pooled = F.avg_pool2d(grid, kernel_size=k, stride=k).flatten(2).transpose(1, 2)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(patches)


def gemma3_image_embeddings(vision_tower: SiglipVisionTower, projector: Gemma3MultiModalProjector,
                            pixel_values: Tensor) -> list[Tensor]:
    """Soft tokens for each image or crop of `pixel_values` [N, 3, S, S] (as gemma3_images prepares them), in
    order: a list of N tensors [mm_tokens_per_image, text_hidden] in the projector's dtype and device."""
    w = projector.mm_input_projection_weight
    if pixel_values.shape[0] == 0:  # a prompt without images; torch cannot reshape an empty batch by heads
        return []
    soft = projector(vision_tower(pixel_values).to(device=w.device, dtype=w.dtype))
    return list(soft.unbind(0))
