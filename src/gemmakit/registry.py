"""The released Gemma 3 and Gemma 4 text backbones, one entry each, as `Config` keyword arguments.

Numbers are copied from the checkpoints' HF `config.json` (text part); the URL above each entry says which.
Gemma 4 numbers agree field for field with Google's JAX library (`gemma/gm/nn/gemma4/_gemma4.py`). Shared
values live in the two family dicts; an entry lists only what makes that model what it is. The parameter
counts that `gemmakit models` prints are computed from these configs and tested against the published sizes.
"""

from __future__ import annotations

from typing import Any

from gemmakit.config import Config, ConfigError, default_layer_types

_GEMMA3: dict[str, Any] = dict(family="gemma3", head_dim=256, query_pre_attn_scalar=256, rope_theta=1_000_000.0,
                               rope_local_base_freq=10_000.0, eos_token_id=[1, 106])
_GEMMA3_LARGE: dict[str, Any] = dict(_GEMMA3, vocab_size=262208, sliding_window=1024,
                                     max_position_embeddings=131072, rope_scaling_factor=8.0)
_GEMMA4: dict[str, Any] = dict(family="gemma4", head_dim=256, global_head_dim=512, rope_theta=1_000_000.0,
                               rope_local_base_freq=10_000.0, partial_rotary_factor=0.25,
                               final_logit_softcapping=30.0, eos_token_id=[1, 106], sliding_window=1024,
                               max_position_embeddings=262144)


def _layers(n: int, period: int = 6) -> dict[str, Any]:
    """Gemma 4's pattern: the last layer is always full."""
    return dict(num_hidden_layers=n, layer_types=default_layer_types(n, period))


def _layers3(n: int) -> dict[str, Any]:
    """Gemma 3's pattern: every 6th layer full, the last one only if it falls there (transformers' rule)."""
    return dict(num_hidden_layers=n, layer_types=default_layer_types(n, 6, last_full=False))


REGISTRY: dict[str, dict[str, Any]] = {
    # https://huggingface.co/google/gemma-3-270m/blob/main/config.json
    "gemma-3-270m": dict(_GEMMA3, **_layers3(18), hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                         num_key_value_heads=1, sliding_window=512, max_position_embeddings=32768),
    # https://huggingface.co/google/gemma-3-1b-pt/blob/main/config.json
    "gemma-3-1b": dict(_GEMMA3, **_layers3(26), hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                       num_key_value_heads=1, sliding_window=512, max_position_embeddings=32768),
    # https://huggingface.co/google/gemma-3-4b-pt/blob/main/config.json (text_config)
    "gemma-3-4b": dict(_GEMMA3_LARGE, **_layers3(34), hidden_size=2560, intermediate_size=10240,
                       num_attention_heads=8, num_key_value_heads=4),
    # https://huggingface.co/google/gemma-3-12b-pt/blob/main/config.json (text_config)
    "gemma-3-12b": dict(_GEMMA3_LARGE, **_layers3(48), hidden_size=3840, intermediate_size=15360,
                        num_attention_heads=16, num_key_value_heads=8),
    # https://huggingface.co/google/gemma-3-27b-pt/blob/main/config.json (text_config)
    "gemma-3-27b": dict(_GEMMA3_LARGE, **_layers3(62), hidden_size=5376, intermediate_size=21504,
                        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
    # https://huggingface.co/google/gemma-4-E2B/blob/main/config.json (text_config)
    "gemma-4-e2b": dict(_GEMMA4, **_layers(35, period=5), hidden_size=1536, intermediate_size=6144,
                        num_attention_heads=8, num_key_value_heads=1, sliding_window=512,
                        max_position_embeddings=131072, hidden_size_per_layer_input=256,
                        num_kv_shared_layers=20, use_double_wide_mlp=True),
    # https://huggingface.co/google/gemma-4-E4B/blob/main/config.json (text_config)
    "gemma-4-e4b": dict(_GEMMA4, **_layers(42), hidden_size=2560, intermediate_size=10240, num_attention_heads=8,
                        num_key_value_heads=2, sliding_window=512, max_position_embeddings=131072,
                        hidden_size_per_layer_input=256, num_kv_shared_layers=18),
    # https://huggingface.co/google/gemma-4-12B/blob/main/config.json (text_config of the unified model)
    "gemma-4-12b": dict(_GEMMA4, **_layers(48), hidden_size=3840, intermediate_size=15360,
                        num_attention_heads=16, num_key_value_heads=8, attention_k_eq_v=True,
                        num_global_key_value_heads=1),
    # https://huggingface.co/google/gemma-4-26B-A4B/blob/main/config.json (text_config)
    "gemma-4-26b-a4b": dict(_GEMMA4, **_layers(30), hidden_size=2816, intermediate_size=2112,
                            num_attention_heads=16, num_key_value_heads=8, attention_k_eq_v=True,
                            num_global_key_value_heads=2, enable_moe_block=True, num_experts=128,
                            top_k_experts=8, moe_intermediate_size=704),
    # https://huggingface.co/google/gemma-4-31B/blob/main/config.json (text_config)
    "gemma-4-31b": dict(_GEMMA4, **_layers(60), hidden_size=5376, intermediate_size=21504,
                        num_attention_heads=32, num_key_value_heads=16, attention_k_eq_v=True,
                        num_global_key_value_heads=4),
}


def config_for(name: str, **overrides: Any) -> Config:
    """The `Config` of a released model by its registry name (any case), with `overrides` applied."""
    key = name.lower()
    if key not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; `gemmakit models` lists the known ones: " + ", ".join(REGISTRY))
    return Config(**{**REGISTRY[key], "name": key, **overrides})


# Published sizes (model cards / technical reports), billions: what the computed counts must agree with.
# Gemma 3 sizes are text-only; E-series "effective" excludes the PLE table; 26B-A4B also has an active count.
PUBLISHED: dict[str, dict[str, float]] = {
    "gemma-3-270m": {"total": 0.268},
    "gemma-3-1b": {"total": 1.0},
    "gemma-3-4b": {"total": 3.88},
    "gemma-3-12b": {"total": 11.77},
    "gemma-3-27b": {"total": 27.0},
    "gemma-4-e2b": {"effective": 2.3},
    "gemma-4-e4b": {"effective": 4.5},
    "gemma-4-12b": {"total": 11.91},
    "gemma-4-26b-a4b": {"total": 25.2, "active": 3.8},
    "gemma-4-31b": {"total": 30.7},
}
