"""One config dataclass for every Gemma 3 and Gemma 4 text backbone (the released ones are in registry.py,
which builds on this module: `registry.config_for(name)`).

Field names are the HF `config.json` names, so a checkpoint's config maps onto `Config` without a rename
table and `Config.to_hf()` writes a `config.json` that `transformers` loads. The two generations differ in a
handful of switches, all derived from `family`:

    gemma3: RMSNorm multiplies by (1 + w); attention scale query_pre_attn_scalar**-0.5; no V norm, no layer
            scalar; full-rotary RoPE on both layer types (global layers may use linear scaling).
    gemma4: RMSNorm multiplies by w; attention scale 1.0; weightless V norm; a per-layer scalar; global
            layers have their own head_dim (512), "proportional" partial RoPE and, with attention_k_eq_v,
            their own KV head count and K = V. E-series add per-layer embeddings (PLE) and KV sharing;
            26B-A4B adds the MoE block.

`layer_types` is the sliding/full pattern as data ("sliding_attention" / "full_attention", one per layer).
Parameter counts are computed from the config (`param_counts`), never from a built model, so `gemmakit
models` can list a 31B model on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
FAMILIES = ("gemma3", "gemma4")


class ConfigError(ValueError):
    """A config that gemmakit cannot build a model from; the message says why and what to do."""


@dataclass
class Config:
    name: str = "custom"
    family: str = "gemma4"  # "gemma3" | "gemma4": selects the norm convention, attention scale, V norm, ...
    vocab_size: int = 262144
    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 1  # KV heads of sliding layers (and of full layers unless k_eq_v overrides)
    head_dim: int = 256  # sliding layers
    global_head_dim: int | None = None  # full layers; None = head_dim (Gemma 3)
    num_global_key_value_heads: int | None = None  # full-layer KV heads, used only with attention_k_eq_v
    attention_k_eq_v: bool = False  # full layers: the K projection also serves as V (no v_proj)
    sliding_window: int = 512  # a sliding layer sees W keys including itself: q - W < k <= q
    layer_types: list[str] = field(default_factory=list)
    rope_local_base_freq: float = 10_000.0  # theta of sliding layers
    rope_theta: float = 1_000_000.0  # theta of full layers
    partial_rotary_factor: float = 1.0  # full layers; Gemma 4 rotates 25% of the frequency pairs
    rope_scaling_factor: float = 1.0  # full layers; Gemma 3 4B+ use linear scaling by 8
    query_pre_attn_scalar: float | None = None  # Gemma 3 attention scale is its -1/2 power; Gemma 4 uses 1.0
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    hidden_size_per_layer_input: int = 0  # PLE width P; 0 = no per-layer embeddings
    vocab_size_per_layer_input: int = 262144
    num_kv_shared_layers: int = 0  # the last N layers reuse K/V of the last non-shared layer of their type
    use_double_wide_mlp: bool = False  # KV-shared layers get a 2x intermediate_size MLP (E2B)
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    # Gemma 4 text configs: "vision" makes an image's soft tokens attend to each other on sliding layers.
    use_bidirectional_attention: str | None = None
    # A multimodal checkpoint's top-level HF config (model_type gemma3 / gemma4 / gemma4_unified) without its
    # text_config: the towers' vision_config / audio_config and the placeholder token ids, under HF names.
    multimodal: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers, last_full=self.family == "gemma4")
        self.validate()

    # --- derived facts -------------------------------------------------------------------------
    @property
    def is_gemma4(self) -> bool:
        return self.family == "gemma4"

    def layer_head_dim(self, i: int) -> int:
        full = self.layer_types[i] == FULL
        return (self.global_head_dim or self.head_dim) if full else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.layer_types[i] == FULL and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def layer_k_eq_v(self, i: int) -> bool:
        return self.attention_k_eq_v and self.layer_types[i] == FULL

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, i: int) -> int:
        """The layer whose K/V layer i attends with: itself, or for a shared layer the last
        non-shared layer of the same type."""
        first = self.first_kv_shared_layer
        if i < first:
            return i
        kind = self.layer_types[i]
        return max(j for j in range(first) if self.layer_types[j] == kind)

    def layer_intermediate(self, i: int) -> int:
        wide = self.use_double_wide_mlp and i >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if wide else 1)

    @property
    def media_type(self) -> str | None:
        """The multimodal model_type ("gemma3", "gemma4", "gemma4_unified"), None for a text-only model."""
        return None if self.multimodal is None else self.multimodal.get("model_type")

    def media_token(self, name: str) -> int | None:
        """A placeholder id by short name (image, boi, eoi, audio, boa, eoa, video); Gemma 3 spells the
        fields `*_token_index`, Gemma 4 `*_token_id` (and its end-of-audio `eoa_token_index`)."""
        m = self.multimodal or {}
        value = m.get(f"{name}_token_id", m.get(f"{name}_token_index"))
        return None if value is None else int(value)

    @property
    def bidirectional_kinds(self) -> frozenset[str]:
        """Layer kinds on which an image's soft tokens see each other (the reference's block overlay)."""
        if self.media_type == "gemma3":
            return frozenset((SLIDING, FULL))
        if self.media_type == "gemma4" and self.use_bidirectional_attention == "vision":
            return frozenset((SLIDING,))
        if self.media_type == "gemma4_unified" and self.use_bidirectional_attention == "vision":
            return frozenset((SLIDING, FULL))
        return frozenset()

    @property
    def windowed_blocks(self) -> bool:
        """On sliding layers, whether an image block is still cut by the window: Gemma 3 and Gemma 4 mask
        AND(window, OR(causal, block)); the 12B unified model's own forward ORs the block after the window."""
        return self.media_type != "gemma4_unified"

    @property
    def attention_scale(self) -> float:
        if self.is_gemma4:
            return 1.0
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # --- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid config {self.name!r}: {msg}")

        need(self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        need(set(self.layer_types) <= {SLIDING, FULL}, f"layer_types may hold only {SLIDING!r}/{FULL!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads")
        if self.attention_k_eq_v and self.num_global_key_value_heads:
            need(self.num_attention_heads % self.num_global_key_value_heads == 0,
                 "num_attention_heads must be a multiple of num_global_key_value_heads")
        need(0 <= self.num_kv_shared_layers < self.num_hidden_layers, "num_kv_shared_layers out of range")
        if self.num_kv_shared_layers:
            producers = set(self.layer_types[: self.first_kv_shared_layer])
            need(set(self.layer_types[self.first_kv_shared_layer:]) <= producers,
                 "every KV-shared layer type needs a non-shared layer of that type before it")
        if self.enable_moe_block:
            need(self.num_experts > 0 and 0 < self.top_k_experts <= self.num_experts
                 and self.moe_intermediate_size > 0, "MoE needs num_experts, top_k_experts, moe_intermediate_size")
        need(self.hidden_activation in ("gelu_pytorch_tanh", "gelu_tanh"),
             f"unsupported hidden_activation {self.hidden_activation!r}")
        need(self.sliding_window > 0, "sliding_window must be positive")

    # --- conversions ---------------------------------------------------------------------------
    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_hf(self) -> dict[str, Any]:
        """A text-model `config.json` dict with HF names (gemma3_text / gemma4_text)."""
        return to_hf_dict(self)

    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str = "custom") -> Config:
        return from_hf_dict(d, name=name)

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}. Is this a Hugging Face model directory?") from e
        return from_hf_dict(d, name=p.parent.name or "custom")


def default_layer_types(n_layers: int, period: int = 6, last_full: bool = True) -> list[str]:
    """`period - 1` sliding layers then one full layer. Gemma 4 forces the last layer full; Gemma 3 does not
    (transformers' Gemma3TextConfig and llama.cpp: the 1B's 26th layer, the 4B's 34th, the 27B's 62nd slide)."""
    types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]
    if last_full:
        types[-1] = FULL
    return types


# The HF -> gemmakit conversion is where checkpoint dialects meet: nested text_config, Gemma 3's flat rope
# keys or rope_parameters dicts, and Gemma 4's global geometry stored either as real checkpoints do
# (global_head_dim / num_global_key_value_heads) or as transformers 5.x saves it (per_layer_config).
_TEXT_MODEL_TYPES = {"gemma3_text": "gemma3", "gemma3": "gemma3", "gemma4_text": "gemma4", "gemma4": "gemma4",
                     "gemma4_unified": "gemma4", "gemma4_unified_text": "gemma4"}
_MULTIMODAL_TYPES = ("gemma3", "gemma4", "gemma4_unified")
_PLAIN_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "sliding_window", "final_logit_softcapping", "rms_norm_eps",
                 "max_position_embeddings", "pad_token_id", "bos_token_id", "hidden_activation")
_G4_FIELDS = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers",
              "use_double_wide_mlp", "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
              "attention_k_eq_v")


def text_config_of(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    model_type = d.get("model_type")
    if model_type not in _TEXT_MODEL_TYPES:
        raise ConfigError(f"unknown model_type {model_type!r}: gemmakit loads Gemma 3 and Gemma 4 checkpoints "
                          f"({', '.join(sorted(_TEXT_MODEL_TYPES))}). Check that this is a Gemma model directory.")
    text = d.get("text_config")
    if isinstance(text, dict):
        return _TEXT_MODEL_TYPES[model_type], {**text, "eos_token_id": text.get("eos_token_id", d.get("eos_token_id"))}
    return _TEXT_MODEL_TYPES[model_type], d


def from_hf_dict(d: dict[str, Any], name: str = "custom") -> Config:
    family, t = text_config_of(d)
    kw: dict[str, Any] = {k: t[k] for k in _PLAIN_FIELDS if t.get(k) is not None}
    if isinstance(d.get("text_config"), dict) and d.get("model_type") in _MULTIMODAL_TYPES:
        kw["multimodal"] = {k: v for k, v in d.items() if k != "text_config"}
    kw.update(name=name, family=family, layer_types=list(t.get("layer_types") or []))
    if not kw["layer_types"] and "num_hidden_layers" in kw:
        kw["layer_types"] = default_layer_types(kw["num_hidden_layers"], t.get("sliding_window_pattern", 6),
                                                last_full=family == "gemma4")
    if t.get("eos_token_id") is not None:
        kw["eos_token_id"] = t["eos_token_id"]
    rope = t.get("rope_parameters") or {}
    full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
    scaling = t.get("rope_scaling") or {}
    kw["rope_theta"] = float(full.get("rope_theta", t.get("rope_theta", 1_000_000.0)))
    kw["rope_local_base_freq"] = float(local.get("rope_theta", t.get("rope_local_base_freq", 10_000.0)))
    rope_type = full.get("rope_type", scaling.get("rope_type", "default"))
    if rope_type not in ("default", "linear", "proportional"):
        raise ConfigError(f"unsupported rope_type {rope_type!r} on full layers (gemmakit knows default, linear, "
                          "proportional)")
    kw["rope_scaling_factor"] = float(full.get("factor", scaling.get("factor", 1.0)) or 1.0)
    if family == "gemma3":
        kw["query_pre_attn_scalar"] = t.get("query_pre_attn_scalar", 256)
        if t.get("attn_logit_softcapping") is not None:
            raise ConfigError("attn_logit_softcapping is not supported (no released Gemma 3 model uses it)")
        return Config(**kw)
    for k in _G4_FIELDS:
        if t.get(k) is not None:
            kw[k] = t[k]
    kw.setdefault("hidden_size_per_layer_input", 0)
    if t.get("use_bidirectional_attention") == "vision":
        kw["use_bidirectional_attention"] = t["use_bidirectional_attention"]
    kw["partial_rotary_factor"] = float(full.get("partial_rotary_factor", 1.0))
    kw["global_head_dim"], kw["num_global_key_value_heads"] = _global_geometry(t, kw["layer_types"])
    return Config(**kw)


def _global_geometry(t: dict[str, Any], layer_types: list[str]) -> tuple[int, int | None]:
    if "global_head_dim" in t or "per_layer_config" not in t:
        return t.get("global_head_dim") or 512, t.get("num_global_key_value_heads")
    per_layer = {int(k): v for k, v in t["per_layer_config"].items()}
    full = [per_layer.get(i, {}) for i, kind in enumerate(layer_types) if kind == FULL]
    dims = {p.get("head_dim", t.get("head_dim")) for p in full}
    heads = {p.get("num_key_value_heads") for p in full}
    if len(dims) > 1 or len(heads) > 1:
        raise ConfigError("per_layer_config gives full layers different geometries; gemmakit expects one")
    return dims.pop() if dims else 512, heads.pop() if heads else None


def to_hf_dict(c: Config) -> dict[str, Any]:
    d: dict[str, Any] = {k: getattr(c, k) for k in _PLAIN_FIELDS}
    d.update(layer_types=list(c.layer_types), eos_token_id=c.eos_token_id, tie_word_embeddings=True,
             attention_bias=False)
    if c.family == "gemma3":
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_scaling_factor != 1.0:
            full = {"rope_type": "linear", "factor": c.rope_scaling_factor, "rope_theta": c.rope_theta}
        d.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                 query_pre_attn_scalar=c.query_pre_attn_scalar, attn_logit_softcapping=None,
                 rope_parameters={FULL: full, SLIDING: {"rope_type": "default", "rope_theta": c.rope_local_base_freq}})
        return d
    d.update({k: getattr(c, k) for k in _G4_FIELDS})
    d.update(model_type="gemma4_text", architectures=["Gemma4ForCausalLM"], global_head_dim=c.global_head_dim,
             num_global_key_value_heads=c.num_global_key_value_heads,
             rope_parameters={FULL: {"rope_type": "proportional", "partial_rotary_factor": c.partial_rotary_factor,
                                     "rope_theta": c.rope_theta},
                              SLIDING: {"rope_type": "default", "rope_theta": c.rope_local_base_freq}})
    for k in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        d[k] = d[k] or None
    return d


def param_counts(c: Config) -> dict[str, int]:
    """Parameter counts from the config alone: total, embedding, PLE table, experts, active per token."""
    H, P, L = c.hidden_size, c.hidden_size_per_layer_input, c.num_hidden_layers
    embed = c.vocab_size * H
    ple = c.vocab_size_per_layer_input * L * P if P else 0
    total = embed + ple + H + ((L * P * H + P) if P else 0)
    experts = 0
    for i in range(L):
        d, kv, shared = c.layer_head_dim(i), c.layer_kv_heads(i), i >= c.first_kv_shared_layer
        attn = 2 * c.num_attention_heads * d * H + d  # q_proj, o_proj, q_norm
        if not shared:
            attn += (1 if c.layer_k_eq_v(i) else 2) * kv * d * H + d  # k_proj (+ v_proj), k_norm
        layer = attn + 4 * H + 3 * H * c.layer_intermediate(i) + (1 if c.is_gemma4 else 0)
        if P:
            layer += 2 * P * H + H
        if c.enable_moe_block:
            e = c.num_experts * 3 * c.moe_intermediate_size * H
            experts += e
            layer += e + c.num_experts * H + H + c.num_experts + 3 * H
        total += layer
    active = total - experts + (experts * c.top_k_experts // c.num_experts if c.enable_moe_block else 0)
    return {"total": total, "embedding": embed, "ple": ple, "experts": experts, "active": active,
            "effective": total - ple}
