"""Gemma 4 12B "unified": images and audio enter the decoder without an encoder.

The 12B drops the SigLIP tower and the Conformer: a 48 px pixel patch or a 640-sample
waveform frame is projected straight into the text space.  So this module is a handful of
norms and linears, kept as nn.Modules whose state_dict keys are exactly HF 5.23's keys under
`model.embed_vision.` and `model.embed_audio.`, so a checkpoint loads one to one once its
older names pass through `normalise_unified_key`.

Numerics follow HF where they differ from the textbook forms, because parity is the bar:
- the three LayerNorms are torch's default (eps 1e-5, affine with bias), not Gemma RMSNorms;
- the scale-free RMSNorm before each projection runs in fp32 with `pow(ms + eps, -0.5)`
  (HF's form, chosen there to agree with JAX) and casts back;
- inputs are cast to the projection's dtype first, as HF does, so a bf16 model sees bf16 pixels.

Padding is stripped here, not by the caller: the image processor pads every image to the
same patch count (positions (-1, -1)) and the audio processor pads clips to the longest,
and HF drops those rows before scattering into the prompt.  Returning one tensor per item
with only real soft tokens means the decoder's placeholder count is the only thing to check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from gemmakit.media.common import hf_fields

__all__ = [
    "UnifiedVisionConfig",
    "UnifiedAudioConfig",
    "UnifiedEmbeddingProjection",
    "UnifiedVisionEmbedder",
    "UnifiedAudioEmbedder",
    "normalise_unified_key",
    "unified_image_embeddings",
    "unified_audio_embeddings",
]


def _text_hidden(d: dict, sub: str, text_hidden_size: int | None) -> tuple[dict, int]:
    """Split a config dict into (sub-config, text hidden size), accepting config.json or its sub-dict."""
    if "text_config" in d or sub in d:
        sub_d = d.get(sub)
        if sub_d is None:
            raise ValueError(f"this config has no {sub}: the checkpoint has no such embedder to build")
        text = d.get("text_config") or {}
        hidden = text_hidden_size if text_hidden_size is not None else text.get("hidden_size")
    else:
        sub_d, hidden = d, text_hidden_size
    if hidden is None:
        raise ValueError(
            f"the text hidden size is unknown: pass the whole config.json, or {sub} with text_hidden_size="
        )
    return sub_d, int(hidden)


@dataclass
class UnifiedVisionConfig:
    """HF `Gemma4UnifiedVisionConfig` fields (5.23 defaults) plus the text width it projects to."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    rms_norm_eps: float = 1e-6
    output_proj_dims: int = 3840
    text_hidden_size: int = 3840

    @classmethod
    def from_hf(cls, d: dict, text_hidden_size: int | None = None) -> UnifiedVisionConfig:
        """From config.json (reads `vision_config` and `text_config.hidden_size`) or from `vision_config` alone."""
        sub, hidden = _text_hidden(d, "vision_config", text_hidden_size)
        cfg = cls(**hf_fields(cls, sub), text_hidden_size=hidden)
        if cfg.output_proj_dims != cfg.mm_embed_dim:
            raise ValueError(
                f"vision_config.output_proj_dims ({cfg.output_proj_dims}) must equal mm_embed_dim "
                f"({cfg.mm_embed_dim}): the final projection reads the patch embedding"
            )
        return cfg

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3


@dataclass
class UnifiedAudioConfig:
    """HF `Gemma4UnifiedAudioConfig` fields (5.23 defaults) plus the text width it projects to."""

    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6
    text_hidden_size: int = 3840

    @classmethod
    def from_hf(cls, d: dict, text_hidden_size: int | None = None) -> UnifiedAudioConfig:
        """From config.json (reads `audio_config` and `text_config.hidden_size`) or from `audio_config` alone."""
        sub, hidden = _text_hidden(d, "audio_config", text_hidden_size)
        return cls(**hf_fields(cls, sub), text_hidden_size=hidden)


def _rms_norm_no_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


class UnifiedEmbeddingProjection(nn.Module):
    """HF `Gemma4UnifiedMultimodalEmbedder`: scale-free RMSNorm, then a bias-free Linear into the text space."""

    def __init__(self, in_dim: int, text_hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dim, text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding_projection.weight.dtype.is_floating_point:
            x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(_rms_norm_no_scale(x, self.eps))


class UnifiedAudioEmbedder(UnifiedEmbeddingProjection):
    """HF `model.embed_audio`: each 640-sample frame is one soft token."""

    def __init__(self, cfg: UnifiedAudioConfig) -> None:
        super().__init__(cfg.audio_embed_dim, cfg.text_hidden_size, cfg.rms_norm_eps)
        self.config = cfg


class UnifiedVisionEmbedder(nn.Module):
    """HF `model.embed_vision`: merged 48 px patch -> LN, Linear, LN, + 2-D position, LN -> projection."""

    def __init__(self, cfg: UnifiedVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim)
        self.patch_dense = nn.Linear(cfg.patch_dim, d)
        self.patch_ln2 = nn.LayerNorm(d)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.mm_posemb_size, 2, d))
        self.pos_norm = nn.LayerNorm(d)
        self.multimodal_embedder = UnifiedEmbeddingProjection(cfg.output_proj_dims, cfg.text_hidden_size,
                                                              cfg.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        """[B, N, patch_dim] pixels and [B, N, 2] (x, y) cells (-1 = padding) -> [B, N, text_hidden]."""
        if self.patch_dense.weight.dtype.is_floating_point:
            pixel_values = pixel_values.to(self.patch_dense.weight.dtype)
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values)))
        # One row of the table per axis; a padding coordinate contributes nothing.
        cells = image_position_ids.clamp(min=0).long()
        valid = (image_position_ids != -1).to(self.pos_embedding.dtype).unsqueeze(-1)
        pos = self.pos_embedding[cells, torch.arange(2, device=cells.device)] * valid
        h = self.pos_norm(h + pos.sum(-2))
        return self.multimodal_embedder(h)


# Names used by checkpoints written before transformers settled on `embed_vision.*`
# (HF conversion_mapping.py, "gemma4_unified"); the new names pass through unchanged.
_KEY_RENAMES = (
    (re.compile(r"vision_embedder\.(patch_ln1|patch_dense|patch_ln2|pos_embedding|pos_norm)"), r"embed_vision.\1"),
    (re.compile(r"embed_vision\.embedding_projection"), "embed_vision.multimodal_embedder.embedding_projection"),
)


def normalise_unified_key(key: str) -> str:
    """Map an older 12B checkpoint key to its transformers 5.23 name; other keys come back as they are."""
    for pattern, repl in _KEY_RENAMES:
        key = pattern.sub(repl, key, count=1)
    return key


def unified_image_embeddings(embed_vision: UnifiedVisionEmbedder, pixel_values: torch.Tensor,
                             image_position_ids: torch.Tensor) -> list[torch.Tensor]:
    """Soft tokens per image, `[n_i, text_hidden]`, in input order, padding patches dropped.

    Takes the processor's `pixel_values` [B, N, 6912] and `image_position_ids` [B, N, 2].
    """
    if pixel_values.dim() != 3 or image_position_ids.shape != (*pixel_values.shape[:2], 2):
        raise ValueError(
            f"expected pixel_values [images, patches, {embed_vision.config.patch_dim}] and image_position_ids "
            f"[images, patches, 2]; got {tuple(pixel_values.shape)} and {tuple(image_position_ids.shape)}"
        )
    if pixel_values.shape[-1] != embed_vision.config.patch_dim:
        raise ValueError(
            f"pixel patches have {pixel_values.shape[-1]} values, this model takes {embed_vision.config.patch_dim} "
            f"({embed_vision.config.model_patch_size} px squares): use the Gemma 4 unified image processor"
        )
    out = embed_vision(pixel_values, image_position_ids)
    keep = (image_position_ids != -1).all(dim=-1).to(out.device)
    return [o[k] for o, k in zip(out, keep, strict=True)]


def unified_audio_embeddings(embed_audio: UnifiedAudioEmbedder, input_features: torch.Tensor,
                             input_features_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Soft tokens per clip, `[n_i, text_hidden]`, in input order, padding frames dropped.

    Takes the processor's `input_features` [B, T, 640] and `input_features_mask` [B, T] (True = real).
    """
    width = embed_audio.embedding_projection.in_features
    if input_features.dim() != 3 or input_features.shape[-1] != width:
        raise ValueError(
            f"expected input_features [clips, frames, {width}] (raw 16 kHz samples in {width}-sample frames); "
            f"got {tuple(input_features.shape)}: use the Gemma 4 unified audio processor"
        )
    if input_features_mask is None:
        input_features_mask = torch.ones(input_features.shape[:2], dtype=torch.bool)
    if input_features_mask.shape != input_features.shape[:2]:
        raise ValueError(
            f"input_features_mask {tuple(input_features_mask.shape)} does not match input_features "
            f"{tuple(input_features.shape[:2])}"
        )
    out = embed_audio(input_features)
    keep = input_features_mask.bool().to(out.device)
    return [o[k] for o, k in zip(out, keep, strict=True)]
