"""The Gemma 3 / Gemma 4 text decoder in plain PyTorch, one module tree for every released variant.

Notable features (all switched by `Config`, see config.py for which variant uses what):
- sandwich blocks: RMSNorm before and after both attention and the MLP, residual adds in the model dtype;
- RMSNorm in fp32: Gemma 3 multiplies by (1 + w), Gemma 4 by w as stored; V gets a weightless RMSNorm (G4);
- QK norm before RoPE; rotate-half RoPE with per-type theta; Gemma 4's global layers use 512-wide heads and
  "proportional" partial RoPE (only the first 25% of frequency pairs are non-zero, exponent over the full dim);
- sliding-window / full attention by `layer_types`; attention scale query_pre_attn_scalar**-0.5 (G3) or 1.0 (G4);
- K = V on global layers of the large Gemma 4 models (one projection, two norms);
- E-series per-layer embeddings (PLE), KV sharing (the last layers attend with the K/V of the last
  non-shared layer of their type and own no k/v weights) and the double-wide MLP of E2B's shared layers;
- the 26B-A4B block: a dense MLP in parallel with 128 experts, top-8, routed on the un-normalised residual;
- a learned per-layer scalar (G4), tied embeddings scaled by sqrt(H) rounded to the weight dtype, final logit
  soft-capping.

Module and parameter names are the HF checkpoint names (`model.layers.3.self_attn.q_proj.weight`), so a
checkpoint's state dict, a PEFT adapter or a tensor-parallel plan maps onto this model one to one.
What this file does not do: sampling, batching policy, quantization (see engine.py, quantize.py); it only
computes logits. Caching is a `Step` the caller passes (cache.py): the model hands each layer's new keys and
values to it and attends over what it returns, so the same code runs with no cache, a prefill, or a batched
decode of rows at different positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import checkpoint

from gemmakit.cache import Step
from gemmakit.config import FULL, SLIDING, Config
from gemmakit.media.soft import Media


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back. `offset` selects Gemma 3's (1 + w) convention."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: bool = False, with_scale: bool = True):
        super().__init__()
        self.eps, self.offset = eps, offset
        if with_scale:
            self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        ms = x32.pow(2).mean(-1, keepdim=True) + self.eps
        # Gemma 3 (HF) uses rsqrt, Gemma 4 uses pow(-0.5) to match JAX; the difference is a few ulps.
        y = x32 * (torch.rsqrt(ms) if self.offset else torch.pow(ms, -0.5))
        if self.weight is not None:
            y = y * (1.0 + self.weight.float() if self.offset else self.weight.float())
        return y.type_as(x)


def inv_frequencies(c: Config, kind: str) -> Tensor:
    """RoPE inverse frequencies for one layer type, over the pairs of a `layer_head_dim`-wide head."""
    if kind == SLIDING:
        dim, base, rotated, factor = c.head_dim, c.rope_local_base_freq, 1.0, 1.0
    else:
        dim, base = c.global_head_dim or c.head_dim, c.rope_theta
        rotated, factor = c.partial_rotary_factor, c.rope_scaling_factor
    n_rot = int(rotated * dim // 2)
    # Explicit CPU: the model may be built under a meta-device context, but these are never loaded.
    inv = 1.0 / (base ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float() / dim))
    inv = torch.cat([inv, torch.zeros(dim // 2 - n_rot, device="cpu")])  # non-rotated pairs: cos 1, sin 0
    return inv / factor


def rope_tables(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [b, T, D] for positions [b, T], computed in fp32 and cast to the activation dtype as the
    reference does."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, n_heads, D], cos/sin [B or 1, T, D]; rotate-half layout (pairs are i and i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, decode: str | int | Callable | None = None
           ) -> Tensor:
    """Softmax attention of q [B, Hq, T, D] over k, v [B, Hk, S, D] (Hq a multiple of Hk), mask [B, 1, T, S].

    Chunks of queries go to SDPA's fused kernels. A single query per row (a decode step) is where a long
    context's decode time goes, and it is regrouped first: the G query heads that share a KV head are G
    queries over the same keys with the same mask, so every key is read once for all of them. Which kernel
    then runs is the runtime plan's choice, passed as `decode` (benchmarks/decode_attention.py measures both
    in compiled steps of the 270M, whose 4 query heads share one KV head):
    - "sdpa": SDPA's fused kernel, which accumulates and softmaxes in fp32 (`decode_sdpa`). In half precision
      the plain ops would first copy K and V to fp32, which makes them the slower choice.
    - "plain": plain ops, which inductor fuses and spreads over the threads (`decode_plain`).
    - an int n (fp32 on CPU, n the threads): SDPA's CPU kernel gives each thread whole (row, KV head) pairs,
      so a step with at least n pairs goes to it, and a narrower one (a one-row step of the 270M) to the plain
      ops, where SDPA would leave threads idle. The plan passes n rather than this function asking torch,
      because torch.compile cannot trace that question; the shapes are static, so the choice is made once per
      traced batch size.
    - a function (q, k, v, mask, scale) -> out: a kernel of the runtime's own (gemmakit's CPU kernel reads
      each key and value once for all G queries, in the cache's dtype).
    - None (no plan): "sdpa" in half precision, else "plain".
    """
    if q.shape[2] != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if callable(decode):
        return decode(q, k, v, mask, scale)
    if decode is None:
        decode = "sdpa" if q.dtype in (torch.bfloat16, torch.float16) else "plain"
    elif isinstance(decode, int):
        decode = "sdpa" if q.shape[0] * k.shape[1] >= decode else "plain"
    return decode_sdpa(q, k, v, mask, scale) if decode == "sdpa" else decode_plain(q, k, v, mask, scale)


def decode_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query per row through SDPA, q [B, Hq, 1, D] viewed as [B, Hk, G, D] (G = Hq / Hk queries per KV
    head); mask [B, 1, 1, S] broadcasts over the KV heads and the G queries alike."""
    B, Hq, _, D = q.shape
    out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, D), k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, 1, D)


def decode_plain(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query per row in plain ops with an fp32 softmax, for inductor to fuse. Their orientation matters
    over a long context: K @ q^T streams the keys where q @ K^T, the same product, reads them at a fraction of
    that rate, and P @ V split into 32 partial sums runs faster than as one GEMM of the G query rows
    (docs/performance.md, "Decode attention"). In half precision K and V would first be copied to fp32, which
    is why `attend` sends those to `decode_sdpa`."""
    B, Hq, _, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hk, Hq // Hk, D).float()  # [B, Hk, G, D]: the query heads that share a KV head
    scores = (k.float() @ qg.transpose(-1, -2)).transpose(-1, -2) * scale  # [B, Hk, G, S]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    # In a compiled step S may be a symbol: split only where it is known to divide, as a test on it would be a
    # guard (cache.Append keeps spans known multiples of 32).
    parts = 32 if statically_known_true(S % 32 == 0) else 1
    probs = probs.reshape(B, Hk, -1, parts, S // parts).transpose(2, 3)  # [B, Hk, parts, G, S/parts]
    out = (probs @ v.float().reshape(B, Hk, parts, S // parts, D)).sum(2)  # [B, Hk, G, D]
    return out.to(q.dtype).reshape(B, Hq, 1, D)


class Attention(nn.Module):
    def __init__(self, c: Config, i: int):
        super().__init__()
        self.kind = c.layer_types[i]
        self.head_dim, self.n_heads, n_kv = c.layer_head_dim(i), c.num_attention_heads, c.layer_kv_heads(i)
        self.shared = i >= c.first_kv_shared_layer
        self.k_eq_v = c.layer_k_eq_v(i)
        self.scale = c.attention_scale
        self.window = c.sliding_window if self.kind == SLIDING else None
        self.decode_kernel: str | int | Callable | None = None  # one-query steps' kernel (`attend`), set by the plan
        g3, H, d = not c.is_gemma4, c.hidden_size, self.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * d, bias=False)
        self.q_norm = RMSNorm(d, c.rms_norm_eps, offset=g3)
        if not self.shared:
            self.k_proj = nn.Linear(H, n_kv * d, bias=False)
            self.k_norm = RMSNorm(d, c.rms_norm_eps, offset=g3)
            self.v_proj = None if self.k_eq_v else nn.Linear(H, n_kv * d, bias=False)
            self.v_norm = RMSNorm(d, c.rms_norm_eps, with_scale=False) if c.is_gemma4 else nn.Identity()
        self.o_proj = nn.Linear(self.n_heads * d, H, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, step: Step, layer: int,
                published: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), *rope).transpose(1, 2)
        if self.shared:
            k, v = published[self.kind]
        else:
            k_raw = self.k_proj(x).view(B, T, -1, self.head_dim)
            v_raw = k_raw if self.v_proj is None else self.v_proj(x).view(B, T, -1, self.head_dim)
            k = apply_rope(self.k_norm(k_raw), *rope).transpose(1, 2)
            k, v = step.kv(layer, self.kind, k, self.v_norm(v_raw).transpose(1, 2))
            # Later KV-shared layers of this type read the last non-shared layer's keys and values.
            published[self.kind] = (k, v)
        y = attend(q, k, v, mask, self.scale, self.decode_kernel)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Top-k routing on the *un-normalised* residual: weightless RMSNorm, learned scale, H**-0.5."""

    def __init__(self, c: Config):
        super().__init__()
        self.top_k, self.scalar = c.top_k_experts, c.hidden_size**-0.5
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(c.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(c.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(self.proj(self.norm(x) * self.scale * self.scalar), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """128 GeGLU experts stored fused as in the checkpoint: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, c: Config):
        super().__init__()
        E, H, inter = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, inter))

    def forward(self, x: Tensor, weights: Tensor, index: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        flat = index.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of = order // index.shape[1]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows, sel = token_of[start:start + n], order[start:start + n]
            start += n
            y = self.expert(e, x[rows])
            # Router weights stay fp32 until the product is accumulated, as in the reference.
            out.index_add_(0, rows, (y * weights.flatten()[sel, None]).to(out.dtype))
        return out

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e's GeGLU on its tokens x [n, H] (quantize.py swaps in int8 matmuls here)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])


class DecoderLayer(nn.Module):
    def __init__(self, c: Config, i: int):
        super().__init__()
        g3, H, eps = not c.is_gemma4, c.hidden_size, c.rms_norm_eps
        self.self_attn = Attention(c, i)
        self.mlp = MLP(H, c.layer_intermediate(i))
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(H, eps, offset=g3))
        self.moe = c.enable_moe_block
        if self.moe:
            self.router, self.experts = Router(c), Experts(c)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.ple = c.hidden_size_per_layer_input > 0
        if self.ple:
            P = c.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(H, P, bias=False)
            self.per_layer_projection = nn.Linear(P, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps)
        if c.is_gemma4:
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, step: Step, layer: int,
                published: dict[str, tuple[Tensor, Tensor]], ple: Tensor | None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, mask, step, layer, published)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(self._experts(x))
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            g = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * ple
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x if self.layer_scalar is None else x * self.layer_scalar

    def _experts(self, residual: Tensor) -> Tensor:
        flat = residual.reshape(-1, residual.shape[-1])
        weights, index = self.router(flat)
        return self.experts(self.pre_feedforward_layernorm_2(flat), weights, index).view_as(residual)


class TextModel(nn.Module):
    """HF's `model.` subtree: embeddings, layers, final norm (and the PLE tables on E-series models)."""

    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, offset=not c.is_gemma4)
        P, L = c.hidden_size_per_layer_input, c.num_hidden_layers
        if P:
            self.embed_tokens_per_layer = embedding(c.vocab_size_per_layer_input, L * P, c.pad_token_id)
            self.per_layer_model_projection = nn.Linear(c.hidden_size, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, c.rms_norm_eps)

    def per_layer_inputs(self, ids: Tensor, e: Tensor) -> Tensor:
        """PLE: token-identity table lookup plus a normalised projection of the embedding, [B, T, L, P]."""
        c = self.config
        shape = (*ids.shape, c.num_hidden_layers, c.hidden_size_per_layer_input)
        tok = scaled_embedding(self.embed_tokens_per_layer, ids, c.hidden_size_per_layer_input).view(shape)
        ctx = self.per_layer_projection_norm((self.per_layer_model_projection(e) * c.hidden_size**-0.5).view(shape))
        return (ctx + tok) * 2.0**-0.5


def embedding(rows: int, width: int, pad: int) -> nn.Embedding:
    # Passing the storage skips nn.Embedding's normal_ init: on the meta device that first call alone
    # imports torch's reference decompositions, a visible part of start-up. Fresh weights get N(0, 1) here.
    return nn.Embedding(rows, width, padding_idx=pad, _weight=torch.randn(rows, width))


def scaled_embedding(table: nn.Embedding, ids: Tensor, width: int) -> Tensor:
    # sqrt(width) is rounded to the weight dtype first (39.25, not 39.19, for E2B in bf16), as in the reference.
    # A quantized table (quantize.py) has no .weight; it names the dtype it dequantizes to.
    dtype = table.weight.dtype if isinstance(table, nn.Embedding) else table.dtype
    return table(ids) * torch.tensor(width**0.5, dtype=torch.float32).to(dtype)


# Where media/towers.py attaches a multimodal checkpoint's towers on `Gemma.model` (HF's names beside
# `language_model`); the decoder never calls them, and quantization leaves them in float.
TOWER_NAMES = ("vision_tower", "multi_modal_projector", "embed_vision", "audio_tower", "embed_audio")


class Gemma(nn.Module):
    """A Gemma 3 or Gemma 4 causal LM: `model` (the HF text model subtree) and a tied, soft-capped head."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.inv_freq = {kind: inv_frequencies(config, kind) for kind in (SLIDING, FULL)}
        self.lm_head: nn.Module | None = None
        # Training: recompute each layer's activations in the backward pass instead of keeping them.
        self.activation_checkpointing = False

    def forward(self, input_ids: Tensor, input_pos: Tensor | None = None, logits_to_keep: int | Tensor = 0,
                step: Step | None = None, media: Media | None = None) -> Tensor:
        """input_ids: [B, T]; positions from `step` (with a KV cache, see cache.py), else `input_pos` ([T] or
        [B, T], default 0..T-1). Returns logits [B, T', V] for the last `logits_to_keep` positions (0 = all),
        or, when `logits_to_keep` is a bool mask [B, T], logits [N, V] for its N true positions: a training
        loss over a 262k vocabulary then pays for the scored tokens only. `media`: image / audio soft tokens
        that replace placeholder positions (media/soft.py)."""
        return self.head(self.hidden(input_ids, input_pos, logits_to_keep, step, media))

    def hidden(self, input_ids: Tensor, input_pos: Tensor | None = None, logits_to_keep: int | Tensor = 0,
               step: Step | None = None, media: Media | None = None) -> Tensor:
        """What `forward` feeds the head: the final-normed hidden states at the kept positions, [..., H]."""
        c, m = self.config, self.model
        B, T = input_ids.shape
        if step is None:
            pos = torch.arange(T, device=input_ids.device) if input_pos is None else input_pos
            step = Step(pos.expand(B, T) if pos.dim() == 1 else pos)
        step.begin()
        if media is not None:  # placeholders read as pad (PLE too), then their rows become the soft tokens
            input_ids = input_ids.masked_fill(media.where, c.pad_token_id)
        x = scaled_embedding(m.embed_tokens, input_ids, c.hidden_size)
        if media is not None:
            x = x.masked_scatter(media.where[..., None], media.embeds.to(x.dtype))
        ple = m.per_layer_inputs(input_ids, x) if c.hidden_size_per_layer_input else None
        kinds = set(c.layer_types)
        ropes = {kind: rope_tables(self.inv_freq[kind], step.positions, x.dtype) for kind in kinds}
        masks = {kind: step.mask(kind, c.sliding_window) for kind in kinds}
        if media is not None:
            masks = {kind: self._with_blocks(mask, kind, step, media) for kind, mask in masks.items()}
        published: dict[str, tuple[Tensor, Tensor]] = {}
        for i, layer in enumerate(m.layers):
            kind = c.layer_types[i]
            args = (x, ropes[kind], masks[kind], step, i, published, None if ple is None else ple[:, :, i])
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if isinstance(logits_to_keep, Tensor):
            x = x[logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return m.norm(x)

    def _with_blocks(self, mask: Tensor, kind: str, step: Step, media: Media) -> Tensor:
        """The causal mask OR each image block's own keys; on sliding layers still inside the window where the
        reference composes it so (`Config.windowed_blocks`)."""
        key_pos = step.key_positions(kind)
        extra = media.overlay(kind, key_pos)
        if extra is None:
            return mask
        if kind == SLIDING and self.config.windowed_blocks:
            q = step.positions[:, None, :, None]
            extra = extra & (key_pos[:, None, None, :] > q - self.config.sliding_window)
        return mask | extra

    def decoder_modules(self) -> list[nn.Module]:
        """The text model's modules (`model` and below), without any attached towers."""
        skip = {id(m) for name in TOWER_NAMES if hasattr(self.model, name)
                for m in getattr(self.model, name).modules()}
        return [m for m in self.model.modules() if id(m) not in skip]

    def head(self, x: Tensor) -> Tensor:
        """Logits of final-normed hidden states x [..., H]."""
        c, m = self.config, self.model
        # A quantized model carries its own output projection; otherwise the head is the tied embedding.
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, m.embed_tokens.weight)
        if c.final_logit_softcapping:
            logits = torch.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        return logits


@torch.no_grad()
def last_token_logits(model: nn.Module, rows: list[list[int]], pad_id: int) -> Tensor:
    """Logits [B, V] (float32) after each of `rows`, batched right-padded: only the last position of each row
    goes through the head (scoring the next token, as classifiers and multiple-choice letters do)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        keep[b, len(r) - 1] = True
    return model(ids.to(device), logits_to_keep=keep.to(device)).float()
