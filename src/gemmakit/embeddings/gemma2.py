"""EmbeddingGemma 2's text encoder in plain PyTorch, numerically matching transformers' `EmbeddingGemma2Model`.

The network is a Gemma 4 E-series body run as an encoder, so the blocks come from model.py (RMSNorm, RoPE,
GeGLU MLP, attention) and only what differs lives here:
- every layer is bidirectional. A sliding layer lets token i see token j when |i - j| <= sliding_window: the
  config's value is an inclusive *radius* (2w + 1 keys), not the one-sided width the causal Gemmas configure;
  a full layer sees every non-pad key. Pad keys are masked; pad queries are computed and then left out.
- full layers are wider than sliding ones: `per_layer_config` gives them their own head_dim and KV heads
  (the release: 512-wide heads, one KV head), and RoPE's frequencies follow each layer type's head width.
- per-layer embeddings are *projection-only*: derived from the scaled token embedding alone (no token table,
  no blend), and mixed in by a third residual sub-block (`ple_block`) after attention and the MLP.
- the reference model ends with `embedding_projection` (hidden -> embedding_dim) on every token and leaves
  pooling and L2 normalisation to sentence-transformers (Pooling(mean) then Normalize). `encode` does the
  masked mean and returns it *unnormalised*: the caller normalises, as Normalize does.
- positions are 0..T-1 in every row whatever the padding, as in the reference: right padding gives each row
  what it gets alone, left padding shifts its positions (in the reference too).

Parameter names are those of the reference text model (`layers.3.self_attn.q_proj.weight`), so a checkpoint's
tensors load by name; a multimodal checkpoint's `language_model.` / `model.language_model.` prefix is dropped
and its vision/audio towers are skipped (this encoder reads text only).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from gemmakit.checkpoints.common import FLOAT_DTYPES, CheckpointError, check_bounds, place
from gemmakit.checkpoints.hf import read_json, shard_files
from gemmakit.config import FULL, SLIDING
from gemmakit.embeddings.model import mean_pool, module_kind, read_modules, read_pooling
from gemmakit.model import MLP, RMSNorm, apply_rope, attend, embedding, rope_tables, scaled_embedding

log = logging.getLogger(__name__)

MODEL_TYPES = ("embedding_gemma2", "embedding_gemma2_text")
ROPE_TYPES = ("default", "proportional")  # "default" is "proportional" with every pair rotated
MEDIA_TOKENS = ("image_token_id", "video_token_id", "audio_token_id")
TEXT_PREFIXES = ("model.language_model.", "language_model.", "model.", "")  # longest first
TOWERS = re.compile(r"^(model\.)?(vision_tower|embed_vision|audio_tower|embed_audio)\.")


@dataclass
class EncoderConfig:
    """The text config, resolved per layer; defaults are the reference's."""

    vocab_size: int = 262_144
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 4
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    sliding_window: int = 512  # inclusive radius: |i - j| <= sliding_window
    hidden_size_per_layer_input: int = 512  # width of each layer's PLE slice
    embedding_dim: int = 768  # width of the sentence embedding (embedding_projection's output)
    attention_bias: bool = False
    max_length: int = 262_144  # longest input the caller should send (sentence-transformers' max_seq_length)
    layer_types: list[str] = field(default_factory=list)
    head_dims: list[int] = field(default_factory=list)  # per layer: full layers are wider
    kv_heads: list[int] = field(default_factory=list)
    # layer type -> (rope_theta, fraction of frequency pairs rotated, position scaling factor)
    rope: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    media_token_ids: tuple[int, ...] = ()  # placeholders the multimodal reference embeds as pad in text

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)


def text_section(d: Any, source: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The text config inside a config.json (composite or text-only) and the composite's media token ids."""
    if not isinstance(d, dict) or d.get("model_type") not in MODEL_TYPES:
        kind = d.get("model_type") if isinstance(d, dict) else type(d).__name__
        raise CheckpointError(f"{source}: model_type {kind!r} is not EmbeddingGemma 2 ({' or '.join(MODEL_TYPES)}); "
                              "point at an EmbeddingGemma 2 checkpoint directory")
    if d["model_type"] == "embedding_gemma2_text":
        return d, ()
    text = d.get("text_config") or {}
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: text_config is {type(text).__name__}, not an object; re-download it")
    media = tuple(d.get(k, v) for k, v in zip(MEDIA_TOKENS, (258_880, 258_884, 258_881), strict=True))
    return text, tuple(int(t) for t in media if t is not None)


def resolve_layers(t: dict[str, Any], source: str) -> tuple[list[str], list[int], list[int]]:
    """layer_types, head_dim and KV heads per layer, derived as the reference config derives them."""
    n = t.get("num_hidden_layers", 24)
    types = t.get("layer_types")
    if types is None:
        period = t.get("sliding_window_pattern", 6)
        types = [SLIDING if (i + 1) % period else FULL for i in range(n)]
    types = list(types)
    if len(types) != n or any(k not in (SLIDING, FULL) for k in types):
        raise CheckpointError(f"{source}: layer_types must list {n} entries of {SLIDING!r} / {FULL!r}; re-download it")
    types[-1] = FULL  # the reference forces it
    head_dims, kv = [t.get("head_dim", 256)] * n, [t.get("num_key_value_heads", 2)] * n
    per_layer = t.get("per_layer_config")
    if per_layer is None:  # builder-only keys of a hand-written config
        per_layer = {i: {"head_dim": t.get("global_head_dim", 512),
                         "num_key_value_heads": t.get("num_global_key_value_heads", 1)}
                     for i, kind in enumerate(types) if kind == FULL}
    for key, override in dict(per_layer).items():
        i = int(key) if str(key).isdigit() else -1
        if not 0 <= i < n or not isinstance(override, dict) or set(override) - {"head_dim", "num_key_value_heads"}:
            raise CheckpointError(f"{source}: per_layer_config[{key!r}] = {override!r} is not a layer index with "
                                  "head_dim / num_key_value_heads, the only overrides this encoder supports")
        head_dims[i] = override.get("head_dim", head_dims[i])
        kv[i] = override.get("num_key_value_heads", kv[i])
    for kind in (SLIDING, FULL):
        if len({d for d, k in zip(head_dims, types, strict=True) if k == kind}) > 1:
            raise CheckpointError(f"{source}: {kind} layers have different head_dim values; RoPE is per layer type")
    return types, head_dims, kv


def resolve_rope(t: dict[str, Any], source: str) -> dict[str, tuple[float, float, float]]:
    params = t.get("rope_parameters") or {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                                          FULL: {"rope_type": "default", "rope_theta": 1_000_000.0}}
    out = {}
    for kind in (SLIDING, FULL):
        p = params.get(kind) if isinstance(params, dict) else None
        if not isinstance(p, dict) or p.get("rope_type", "default") not in ROPE_TYPES or "rope_theta" not in p:
            raise CheckpointError(f"{source}: rope_parameters[{kind!r}] = {p!r}; this encoder supports rope_type "
                                  f"{' / '.join(ROPE_TYPES)} with a rope_theta")
        proportional = p.get("rope_type") == "proportional"
        rotated = float(p.get("partial_rotary_factor", 1.0)) if proportional else 1.0
        out[kind] = (float(p["rope_theta"]), rotated, float(p.get("factor", 1.0)) if proportional else 1.0)
    return out


def parse_config(d: Any, source: str = "config") -> EncoderConfig:
    """An `EncoderConfig` from a config.json dict, composite (`embedding_gemma2`) or text-only."""
    t, media = text_section(d, source)
    check_bounds(t, source)
    if t.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"{source}: hidden_activation {t['hidden_activation']!r} is not gelu_pytorch_tanh")
    types, head_dims, kv = resolve_layers(t, source)
    heads = t.get("num_attention_heads", 4)
    if any(heads % k for k in kv):
        raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of every layer's KV heads {kv}")
    names = ("vocab_size", "hidden_size", "intermediate_size", "rms_norm_eps", "pad_token_id", "sliding_window",
             "hidden_size_per_layer_input", "embedding_dim", "attention_bias")
    given = {k: t[k] for k in names if t.get(k) is not None}
    return EncoderConfig(**given, num_attention_heads=heads, layer_types=types, head_dims=head_dims, kv_heads=kv,
                         rope=resolve_rope(t, source), media_token_ids=media,
                         max_length=t.get("max_position_embeddings", 262_144))


def inv_frequencies(dim: int, theta: float, rotated: float, factor: float) -> Tensor:
    """Inverse frequencies over the pairs of a `dim`-wide head; pairs past `rotated` stay unrotated."""
    n_rot = int(rotated * dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float() / dim))
    return torch.cat([inv, torch.zeros(dim // 2 - n_rot, device="cpu")]) / factor


class Attention(nn.Module):
    """Bidirectional GQA with QK norm before RoPE, a weightless V norm and scale 1.0 (the norms set it)."""

    def __init__(self, c: EncoderConfig, i: int):
        super().__init__()
        self.head_dim, H, n_kv, bias = c.head_dims[i], c.hidden_size, c.kv_heads[i], c.attention_bias
        self.q_proj = nn.Linear(H, c.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_attention_heads * self.head_dim, H, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, c.rms_norm_eps, with_scale=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        shape = (B, T, -1, self.head_dim)
        q = apply_rope(self.q_norm(self.q_proj(x).view(shape)), *rope).transpose(1, 2)
        k = apply_rope(self.k_norm(self.k_proj(x).view(shape)), *rope).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(shape)).transpose(1, 2)
        return self.o_proj(attend(q, k, v, mask, 1.0).transpose(1, 2).reshape(B, T, -1))


class PLEBlock(nn.Module):
    """The third residual sub-block: gate this layer's PLE slice by the hidden state, project back up."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        H, P = c.hidden_size, c.hidden_size_per_layer_input
        self.per_layer_input_gate = nn.Linear(H, P, bias=False)
        self.per_layer_projection = nn.Linear(P, H, bias=False)
        self.post_per_layer_input_norm = RMSNorm(H, c.rms_norm_eps)

    def forward(self, x: Tensor, ple: Tensor) -> Tensor:
        g = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * ple
        return x + self.post_per_layer_input_norm(self.per_layer_projection(g))


class EncoderLayer(nn.Module):
    def __init__(self, c: EncoderConfig, i: int):
        super().__init__()
        H, eps = c.hidden_size, c.rms_norm_eps
        self.kind = c.layer_types[i]
        self.self_attn = Attention(c, i)
        self.mlp = MLP(H, c.intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(H, eps))
        self.ple_block = PLEBlock(c)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, ple: Tensor) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return self.ple_block(x, ple) * self.layer_scalar


class PLE(nn.Module):
    """Projection-only per-layer embeddings: [B, T, H] scaled embeddings -> [B, T, layers, P], normalised."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.shape = (c.num_hidden_layers, c.hidden_size_per_layer_input)
        self.scale = c.hidden_size**-0.5
        self.per_layer_model_projection = nn.Linear(c.hidden_size, self.shape[0] * self.shape[1], bias=False)
        self.per_layer_projection_norm = RMSNorm(self.shape[1], c.rms_norm_eps)

    def forward(self, e: Tensor) -> Tensor:
        p = self.per_layer_model_projection(e) * self.scale
        return self.per_layer_projection_norm(p.view(*e.shape[:-1], *self.shape))


class Encoder(nn.Module):
    """The EmbeddingGemma 2 text model: `encode` maps token ids to unnormalised sentence embeddings."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.ple = PLE(c)
        self.layers = nn.ModuleList(EncoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.embedding_projection = nn.Linear(c.hidden_size, c.embedding_dim, bias=False)
        dims = dict(zip(c.layer_types, c.head_dims, strict=True))
        self.inv_freq = {kind: inv_frequencies(dim, *c.rope[kind]) for kind, dim in dims.items()}

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def masks(self, keep: Tensor) -> dict[str, Tensor]:
        """Boolean [B, 1, T, T] masks per layer type: key padding, and the symmetric window on sliding layers."""
        pos = torch.arange(keep.shape[1], device=keep.device)
        window = (pos[:, None] - pos[None, :]).abs() <= self.config.sliding_window
        full = keep[:, None, None, :]
        return {FULL: full, SLIDING: full & window}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: [B, T] (mask 1 = token, 0 = pad) -> [B, embedding_dim], not normalised."""
        keep = self.check(input_ids, attention_mask)
        c = self.config
        if c.media_token_ids:  # the reference embeds media placeholders as pad when no media is merged in
            media = torch.tensor(c.media_token_ids, device=input_ids.device)
            input_ids = torch.where(torch.isin(input_ids, media), c.pad_token_id, input_ids)
        x = scaled_embedding(self.embed_tokens, input_ids, c.hidden_size)
        ple = self.ple(x)
        positions = torch.arange(x.shape[1], device=x.device)[None]
        ropes = {kind: rope_tables(inv, positions, x.dtype) for kind, inv in self.inv_freq.items()}
        masks = self.masks(keep)
        for i, layer in enumerate(self.layers):
            x = layer(x, ropes[layer.kind], masks[layer.kind], ple[:, :, i])
        # Pooled before the projection, which is linear: the same vector for T times less work.
        x = self.norm(x)
        return self.embedding_projection(mean_pool(x, keep).to(x.dtype))

    def check(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must both be [batch, tokens] with at least one token")
        if input_ids.is_floating_point() or input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
            raise ValueError(f"input_ids must be integer token ids in [0, {self.config.vocab_size})")
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
        return attention_mask.bool()

    @torch.no_grad()
    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The reference's sentence embedding before its final L2 normalisation, [B, embedding_dim]."""
        return self(input_ids, attention_mask)


def from_config(cfg: dict[str, Any]) -> Encoder:
    """A randomly initialised encoder for a config.json-style dict (composite or text-only)."""
    return Encoder(parse_config(cfg)).eval()


def check_pipeline(path: Path) -> int | None:
    """Refuse a sentence-transformers pipeline this encoder would silently get wrong (a pooling other than the
    mean over every token, an extra Dense after it), read as EmbeddingGemma's loader reads it (model.py);
    returns its max_seq_length, if it sets one."""
    after = read_modules(path)[1:]  # the list checked, the Transformer first
    for m in after:
        if (kind := module_kind(m)) not in ("Pooling", "Normalize"):
            raise CheckpointError(f"{path / 'modules.json'} applies {kind} to the embeddings; gemmakit's "
                                  "EmbeddingGemma 2 encoder does only Transformer -> Pooling(mean) -> Normalize")
    for m in after:
        if module_kind(m) == "Pooling":
            read_pooling(path / str(m.get("path", "")))  # mean over every token, or refused
    st = path / "sentence_bert_config.json"
    length = read_json(st).get("max_seq_length") if st.is_file() else None
    return length if isinstance(length, int) and length > 0 else None


def text_prefix(keys: set[str], path: Path) -> str:
    for prefix in TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in keys:
            return prefix
    raise CheckpointError(f"{path}: no embed_tokens.weight under any of {TEXT_PREFIXES[:-1]} or at the top level; "
                          "this is not an EmbeddingGemma 2 checkpoint saved by transformers")


def load(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Encoder:
    """An `Encoder` from a Hugging Face directory (config.json + safetensors; pickled weights are refused)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; point at a Hugging Face EmbeddingGemma 2 directory")
    config = parse_config(read_json(path / "config.json"), str(path / "config.json"))
    config.max_length = check_pipeline(path) or config.max_length
    files = shard_files(path)
    with torch.device("meta"):
        encoder = Encoder(config)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    try:
        handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        names = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except SafetensorError as e:
        raise CheckpointError(f"{path}: a safetensors shard is unreadable ({e}); re-download the checkpoint") from e
    prefix, towers = text_prefix(set(names), path), 0
    for raw, handle in names.items():
        if TOWERS.match(raw):
            towers += 1
            continue
        key = raw[len(prefix):] if raw.startswith(prefix) else None
        if key not in expected:
            raise CheckpointError(f"{path}: tensor {raw!r} has no place in the EmbeddingGemma 2 text encoder; the "
                                  "checkpoint is a different model or its config.json does not match its weights")
        expected_shape = expected.pop(key)
        piece = handle.get_slice(raw)
        if tuple(piece.get_shape()) != expected_shape or piece.get_dtype() not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {raw!r} is {piece.get_dtype()} {tuple(piece.get_shape())} where "
                                  f"config.json implies a float {expected_shape}; re-download the checkpoint or "
                                  "fix config.json to match its weights")
        place(encoder, key, piece[:].to(device=device, dtype=dtype))
    if expected:
        missing = ", ".join(prefix + k for k in sorted(expected)[:5])
        raise CheckpointError(f"{path}: {len(expected)} tensor(s) the config needs are absent from the safetensors "
                              f"files ({missing}{', ...' if len(expected) > 5 else ''}); the download is incomplete "
                              "or the config.json belongs to another model: re-download the checkpoint")
    if towers:
        log.info("%s: skipped %d vision/audio tower tensors; gemmakit's EmbeddingGemma 2 encoder is text only",
                 path, towers)
    return encoder.eval()
