"""The config registry: published sizes, HF config.json round trips, validation.
Run: .venv/bin/python -m pytest tests/test_config.py
"""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit.config import FULL, Config, ConfigError, param_counts
from gemmakit.registry import PUBLISHED, REGISTRY, config_for
from tests.helpers import tiny

# Published sizes are rounded; "4.5B effective" for E4B is Google's rounding of 4.64B.
TOLERANCE = {"gemma-4-e4b": 0.035}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_param_counts_agree_with_published_sizes(name):
    """Counts computed from each registry config agree with the published size (1% unless noted)."""
    counts = param_counts(config_for(name))
    for kind, billions in PUBLISHED[name].items():
        assert abs(counts[kind] / 1e9 - billions) / billions < TOLERANCE.get(name, 0.01), (kind, counts[kind])


@pytest.mark.parametrize("name", list(REGISTRY))
def test_param_counts_equal_the_reference_model(name):
    """The count equals the parameters of transformers' model built from our config.json, exactly."""
    import transformers

    c = config_for(name)
    d = {k: v for k, v in c.to_hf().items() if k not in ("model_type", "architectures")}
    hf_cls = transformers.Gemma3TextConfig if c.family == "gemma3" else transformers.Gemma4TextConfig
    model_cls = transformers.Gemma3ForCausalLM if c.family == "gemma3" else transformers.Gemma4ForCausalLM
    with torch.device("meta"):
        model = model_cls(hf_cls(**d))
    hf_total = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("layer_scalar"))
    assert param_counts(c)["total"] == hf_total


@pytest.mark.parametrize("name", list(REGISTRY))
def test_config_json_round_trip(name):
    """to_hf() then from_hf() gives back the same config, through JSON text."""
    c = config_for(name)
    again = Config.from_hf(json.loads(json.dumps(c.to_hf())), name=name)
    assert again == c


def test_transformers_saved_per_layer_config_is_understood(tmp_path):
    """transformers 5.x saves Gemma 4's global geometry as per_layer_config; it maps back to the same config."""
    import transformers

    c = tiny("31b")
    d = {k: v for k, v in c.to_hf().items() if k not in ("model_type", "architectures")}
    transformers.Gemma4TextConfig(**d).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in saved and "global_head_dim" not in saved
    back = Config.from_json(tmp_path / "config.json")
    assert (back.global_head_dim, back.num_global_key_value_heads) == (32, 2)


def test_multimodal_config_reads_its_text_config():
    """A Gemma4ForConditionalGeneration config.json nests the text config; eos comes from the top level."""
    text = config_for("gemma-4-e2b").to_hf()
    text.pop("eos_token_id")
    c = Config.from_hf({"model_type": "gemma4", "text_config": text, "eos_token_id": [1, 106]})
    assert c.hidden_size_per_layer_input == 256 and c.eos_token_id == [1, 106]


def test_registry_facts_match_the_architecture():
    """Spot checks of derived per-layer facts: E2B sharing/producers, 26B global KV heads, 31B pattern."""
    e2b = config_for("gemma-4-e2b")
    assert e2b.first_kv_shared_layer == 15 and e2b.kv_source(15) == 13 and e2b.kv_source(19) == 14
    assert e2b.layer_intermediate(14) == 6144 and e2b.layer_intermediate(15) == 12288
    moe = config_for("gemma-4-26b-a4b")
    assert moe.layer_kv_heads(5) == 2 and moe.layer_kv_heads(4) == 8 and moe.layer_head_dim(5) == 512
    big = config_for("gemma-4-31b")
    assert [i for i, t in enumerate(big.layer_types) if t == FULL] == list(range(5, 60, 6))


def test_unknown_model_type_is_a_clear_error():
    """A non-Gemma config.json is refused with a message naming what is supported."""
    with pytest.raises(ConfigError, match="unknown model_type 'llama'.*Gemma"):
        Config.from_hf({"model_type": "llama", "hidden_size": 8})


def test_invalid_configs_are_refused():
    """Inconsistent numbers fail at construction with the reason."""
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        Config(num_attention_heads=6, num_key_value_heads=4, num_hidden_layers=2)
    with pytest.raises(ConfigError, match="layer_types has 3 entries"):
        Config(num_hidden_layers=2, layer_types=[FULL] * 3)
    with pytest.raises(ConfigError, match="unknown model"):
        config_for("gemma-5-huge")


@pytest.mark.parametrize("name", [n for n in REGISTRY if n.startswith("gemma-3")])
def test_gemma3_layer_pattern_is_transformers_own(name):
    """Gemma 3 does not force its last layer to full attention (the 1B's layer 26, the 4B's 34th and the
    27B's 62nd slide): the registry and a config.json without layer_types both agree with transformers."""
    import transformers

    c = config_for(name)
    d = {k: v for k, v in c.to_hf().items() if k not in ("model_type", "architectures", "layer_types")}
    assert transformers.Gemma3TextConfig(**d).layer_types == c.layer_types
    assert Config.from_hf({**d, "model_type": "gemma3_text"}, name=name).layer_types == c.layer_types
