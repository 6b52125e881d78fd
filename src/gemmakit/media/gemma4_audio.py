"""Gemma 4's audio encoder (E2B/E4B): a USM-style conformer that turns log-mel frames into soft tokens.

Design:
- Module and parameter names are transformers' (`model.audio_tower.*`), clip bounds included, so a released
  checkpoint loads with `load_state_dict(strict=True)` and no renaming table.
- Attention is local and computed per chunk: each chunk of `attention_chunk_size` queries meets only the
  window of keys it can see, so memory grows with the clip's length, not its square. The relative-position
  term is one small (chunk x positions) product per chunk, read back with a fixed index table
  (key slot j, query i -> position j - i); that table is the Transformer-XL "rel shift" written as a gather.
- transformers is the parity target where it and the JAX reference disagree: a query sees itself and the
  `attention_context_left - 1` frames before it (HF's sliding-window mask), one frame fewer than JAX's band.
- A batch of clips of unequal length gives each clip the tokens it would get alone: the subsampling zeroes
  padded frames before each convolution, attention never reads a padded key and the light convolution only
  looks back, so padding (always at the end) cannot reach a real frame. The padded tokens are dropped at the
  end, as `Gemma4Model` does, so each clip yields exactly the count the processor wrote into the prompt.
- Attention logits and softmax run in fp32 whatever the weights' dtype, like the reference; the rest runs in
  the weights' dtype with RMSNorms computed in fp32 (gemmakit.model.RMSNorm, Gemma 4's plain-weight form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.media.common import hf_fields
from gemmakit.media.gemma4_vision import ClippableLinear  # the same clipped linear as the image tower's
from gemmakit.model import RMSNorm

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class Gemma4AudioConfig:
    """`audio_config` of a Gemma 4 config.json; field names and defaults are transformers 5.23's."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_hf(cls, d: dict) -> Gemma4AudioConfig:
        """Read the fields this encoder uses from an HF `audio_config` dict; others are ignored."""
        cfg = cls(**hf_fields(cls, d))
        cfg.subsampling_conv_channels = tuple(cfg.subsampling_conv_channels)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of "
                            f"num_attention_heads {self.num_attention_heads}")
        if len(self.subsampling_conv_channels) != 2:
            problems.append(f"subsampling_conv_channels must have two entries, got {self.subsampling_conv_channels}")
        if self.hidden_act not in _ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.attention_chunk_size < 1 or self.attention_context_left < 1 or self.attention_context_right < 0:
            problems.append("attention_chunk_size and attention_context_left must be >= 1, "
                            "attention_context_right >= 0")
        elif self.context_size // 2 + 1 > self.past_frames + self.attention_context_right + 2:
            # transformers' rel shift would wrap positions of one query row into the next one's
            problems.append(f"attention_chunk_size {self.attention_chunk_size} is too large for "
                            f"attention_context_left {self.attention_context_left} and "
                            f"attention_context_right {self.attention_context_right}")
        if problems:
            raise ValueError("unsupported Gemma 4 audio_config: " + "; ".join(problems)
                             + ". Use the audio_config of a released Gemma 4 E2B/E4B checkpoint.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def past_frames(self) -> int:
        """Frames before a chunk that its keys window reaches back to."""
        return self.attention_context_left - 1

    @property
    def context_size(self) -> int:
        """Keys in one chunk's window: the past frames, the chunk itself, the future frames."""
        return self.attention_chunk_size + self.past_frames + self.attention_context_right


def _clip(x: Tensor, limit: float) -> Tensor:
    # The checkpoint's clip value (1e10) overflows half precision; there it means "no clipping".
    limit = min(limit, torch.finfo(x.dtype).max)
    return torch.clamp(x, -limit, limit)


class SubsampleLayer(nn.Module):
    """3x3 stride-2 convolution over (time, mel), then LayerNorm over channels and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        x = x * valid[:, None, :, None].to(x.dtype)  # padded frames must not leak into real ones
        x = self.conv(x.to(self.conv.weight.dtype))
        x = F.relu(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x, valid[:, ::2]


class SubsampleConvProjection(nn.Module):
    """Two stride-2 subsampling layers (10 ms frames -> 40 ms), flattened and projected to the model width."""

    def __init__(self, c: Gemma4AudioConfig):
        super().__init__()
        c0, c1 = c.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, c.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, c.rms_norm_eps)
        # transformers sizes this as (c0 // 4) * c1; with the released 128 mel bins and c0 = 128 that is the
        # flattened (mel / 4) * c1 the convolutions produce. Any other pairing fails in forward, with a message.
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, c.hidden_size, bias=False)

    def forward(self, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        x, valid = self.layer0(features.unsqueeze(1), valid)
        x, valid = self.layer1(x, valid)
        b, ch, t, mel = x.shape
        if ch * mel != self.input_proj_linear.in_features:
            raise ValueError(f"audio features with {features.shape[-1]} mel bins flatten to {ch * mel} values per "
                             f"frame, but this encoder expects {self.input_proj_linear.in_features}; compute "
                             "features with gemmakit.media.audio_features (128 mel bins)")
        x = x.permute(0, 2, 3, 1).reshape(b, t, mel * ch)
        return self.input_proj_linear(x), valid


def relative_positions(c: Gemma4AudioConfig) -> Tensor:
    """Sinusoidal embeddings ([sin | cos]) of the distances context//2 ... 0, farthest first."""
    half = c.hidden_size // 2
    rate = math.log(10000.0) / max(half - 1, 1)
    inv_timescales = torch.exp(torch.arange(half) * -rate)
    distance = torch.arange(c.context_size // 2, -1, -1)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(distance), torch.cos(distance)], dim=-1)


def _chunk_windows(x: Tensor, c: Gemma4AudioConfig, n_chunks: int, fill: float | bool = 0.0) -> Tensor:
    """[B, T, ...] -> [B, n_chunks, context, ...]: for each chunk, the frames its queries may look at."""
    t = x.shape[1]
    right = n_chunks * c.attention_chunk_size + c.attention_context_right - t
    pad = [0, 0] * (x.dim() - 2) + [c.past_frames, right]
    x = F.pad(x, pad, value=fill)
    x = x.unfold(1, c.context_size, c.attention_chunk_size)  # [B, n, ..., context]
    return torch.movedim(x, -1, 2)


class ChunkedAttention(nn.Module):
    """Local self-attention with a learned per-dim query scale, a relative-position bias and a logit cap."""

    def __init__(self, c: Gemma4AudioConfig):
        super().__init__()
        self.c = c
        h, clip = c.hidden_size, c.use_clipped_linears
        self.q_proj, self.k_proj, self.v_proj = (ClippableLinear(h, h, clip) for _ in range(3))
        self.post = ClippableLinear(h, h, clip)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(c.head_dim))

    def _position_bias(self, q: Tensor, positions: Tensor) -> Tensor:
        """q [B, n, chunk, H, D] -> [B, H, n, chunk, context]: query i's bias for key slot j is its product
        with position j - i, and zero where that position does not exist."""
        c = self.c
        rel = self.relative_k_proj(positions).float().view(-1, c.num_attention_heads, c.head_dim)
        table = torch.einsum("bnihd,phd->bhnip", q, rel)
        slot = torch.arange(c.context_size, device=q.device)[None, :] - torch.arange(
            c.attention_chunk_size, device=q.device)[:, None]  # [chunk, context]
        exists = (slot >= 0) & (slot < rel.shape[0])
        index = slot.clamp(0, rel.shape[0] - 1).expand(*table.shape[:-1], -1)
        return torch.gather(table, -1, index) * exists

    def forward(self, x: Tensor, positions: Tensor, allowed: Tensor) -> Tensor:
        c = self.c
        b, t, _ = x.shape
        n = allowed.shape[1]
        heads = (b, t, c.num_attention_heads, c.head_dim)
        q_scale = c.head_dim**-0.5 / math.log(2) * F.softplus(self.per_dim_scale.float())
        q = self.q_proj(x).float().view(heads) * q_scale
        k = self.k_proj(x).float().view(heads) * (math.log(1 + math.e) / math.log(2))
        v = self.v_proj(x).float().view(heads)
        q = F.pad(q, (0, 0, 0, 0, 0, n * c.attention_chunk_size - t)).view(b, n, c.attention_chunk_size,
                                                                         *heads[2:])
        k_win, v_win = _chunk_windows(k, c, n), _chunk_windows(v, c, n)  # [B, n, context, H, D]
        logits = torch.einsum("bnihd,bnjhd->bhnij", q, k_win) + self._position_bias(q, positions)
        cap = c.attention_logit_cap
        logits = cap * torch.tanh(logits / cap)
        logits = logits.masked_fill(~allowed[:, None], c.attention_invalid_logits_value)
        probs = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhnij,bnjhd->bnihd", probs, v_win).reshape(b, n * c.attention_chunk_size, -1)
        return self.post(out[:, :t].to(x.dtype))


def attention_allowed(valid: Tensor, c: Gemma4AudioConfig) -> Tensor:
    """[B, T] real frames -> [B, n_chunks, chunk, context]: may query i of a chunk read key slot j?"""
    t = valid.shape[1]
    n = -(-t // c.attention_chunk_size)
    key_real = _chunk_windows(valid, c, n, fill=False)  # [B, n, context]
    # distance query - key for query i and key slot j is i + past - j
    dist = (torch.arange(c.attention_chunk_size, device=valid.device)[:, None] + c.past_frames
            - torch.arange(c.context_size, device=valid.device)[None, :])
    band = ((dist >= 0) & (dist < c.past_frames)) | ((dist < 0) & (-dist < c.attention_context_right))
    return key_real[:, :, None, :] & band


class FeedForward(nn.Module):
    """Half-step conformer FFN: clip, norm, 4x SiLU MLP, clip, norm, scaled residual."""

    def __init__(self, c: Gemma4AudioConfig):
        super().__init__()
        self.c = c
        self.ffw_layer_1 = ClippableLinear(c.hidden_size, 4 * c.hidden_size, c.use_clipped_linears)
        self.ffw_layer_2 = ClippableLinear(4 * c.hidden_size, c.hidden_size, c.use_clipped_linears)
        self.pre_layer_norm = RMSNorm(c.hidden_size)
        self.post_layer_norm = RMSNorm(c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pre_layer_norm(_clip(x, self.c.gradient_clipping))
        y = self.ffw_layer_2(_ACTIVATIONS[self.c.hidden_act](self.ffw_layer_1(y)))
        y = self.post_layer_norm(_clip(y, self.c.gradient_clipping))
        return x + y * self.c.residual_weight


class LightConv1d(nn.Module):
    """GLU, then a causal depthwise convolution over time, norm, activation and projection, residual."""

    def __init__(self, c: Gemma4AudioConfig):
        super().__init__()
        self.c = c
        h = c.hidden_size
        self.linear_start = ClippableLinear(h, 2 * h, c.use_clipped_linears)
        self.linear_end = ClippableLinear(h, h, c.use_clipped_linears)
        self.depthwise_conv1d = nn.Conv1d(h, h, c.conv_kernel_size, groups=h, bias=False)
        self.pre_layer_norm = RMSNorm(h, eps=c.rms_norm_eps)
        self.conv_norm = RMSNorm(h, eps=c.rms_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        y = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        y = F.pad(y.transpose(1, 2), (self.c.conv_kernel_size - 1, 0))  # causal: only past frames
        y = self.depthwise_conv1d(y).transpose(1, 2)
        y = self.conv_norm(_clip(y, self.c.gradient_clipping))
        return x + self.linear_end(_ACTIVATIONS[self.c.hidden_act](y))


class ConformerLayer(nn.Module):
    """FFN/2, attention, light convolution, FFN/2, final norm."""

    def __init__(self, c: Gemma4AudioConfig):
        super().__init__()
        self.c = c
        self.feed_forward1 = FeedForward(c)
        self.self_attn = ChunkedAttention(c)
        self.lconv1d = LightConv1d(c)
        self.feed_forward2 = FeedForward(c)
        self.norm_pre_attn = RMSNorm(c.hidden_size)
        self.norm_post_attn = RMSNorm(c.hidden_size)
        self.norm_out = RMSNorm(c.hidden_size)

    def forward(self, x: Tensor, positions: Tensor, allowed: Tensor) -> Tensor:
        x = self.feed_forward1(x)
        y = self.self_attn(self.norm_pre_attn(_clip(x, self.c.gradient_clipping)), positions, allowed)
        x = x + self.norm_post_attn(_clip(y, self.c.gradient_clipping))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip(x, self.c.gradient_clipping))


class Gemma4AudioTower(nn.Module):
    """HF `model.audio_tower`: log-mel frames [B, T, 128] -> [B, ceil(T/4), output_proj_dims] and their mask."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.subsample_conv_projection = SubsampleConvProjection(config)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_hidden_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def forward(self, input_features: Tensor, input_features_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the encoded frames and which of them are real (True) rather than padding."""
        x, valid = self.subsample_conv_projection(input_features, input_features_mask.bool())
        positions = relative_positions(self.config).to(x.device, x.dtype)
        allowed = attention_allowed(valid, self.config)
        for layer in self.layers:
            x = layer(x, positions, allowed)
        return self.output_proj(x), valid


def gemma4_audio_embeddings(tower: Gemma4AudioTower, embedder: nn.Module, input_features: Tensor,
                            input_features_mask: Tensor) -> list[Tensor]:
    """Soft tokens in the text model's space, one `[n_soft_tokens_i, text_hidden]` tensor per clip.

    `input_features` [B, T, 128] and `input_features_mask` [B, T] are what
    gemmakit.media.audio_features.extract_features gives; `embedder` is HF's `model.embed_audio`.
    """
    features, mask = torch.as_tensor(input_features), torch.as_tensor(input_features_mask)
    if features.dim() != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"expected input_features [clips, frames, mel] and input_features_mask [clips, frames], "
                         f"got {tuple(features.shape)} and {tuple(mask.shape)}; pass extract_features' outputs")
    weight = tower.output_proj.weight
    hidden, valid = tower(features.to(weight.device, weight.dtype), mask.to(weight.device))
    soft = embedder(hidden)
    return [soft[i][valid[i]] for i in range(soft.shape[0])]
