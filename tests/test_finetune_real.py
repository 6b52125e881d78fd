"""Real fine-tunes of the embedded Gemma 3 270M on CPU, with the repo's recipes (issue 6's demonstrations):

- LoRA SFT (recipes/lora-sft-270m.yaml) teaches the pretrained model the Gemma 3 chat format and a made-up
  fact; held-out questions get answers they did not get before, and the validation loss falls;
- the adapter loads in `peft` on transformers' Gemma 3 and gives the logits of gemmakit's merged model;
- DPO (recipes/dpo-270m.yaml) raises the chosen-vs-rejected margin on held-out pairs.
Run: .venv/bin/python -m pytest tests/test_finetune_real.py (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gemmakit
from gemmakit.train.recipe import load_config
from gemmakit.train.trainer import finetune

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = [json.loads(line)["messages"][0]["content"]
            for line in (ROOT / "recipes" / "data" / "mascot_sft_val.jsonl").read_text().splitlines()]


def _answers(adapter: Path | None) -> list[str]:
    llm = gemmakit.load(adapter=adapter, chat_format="gemma3")
    return [llm.chat([{"role": "user", "content": q}], max_tokens=24).content for q in HELD_OUT]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(default_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    config = load_config(ROOT / "recipes" / "lora-sft-270m.yaml", {"out": str(out)})
    config.data, config.val_data = str(ROOT / config.data), str(ROOT / config.val_data)
    result = finetune(config, progress=False)
    assert result.final == out / "adapter" and result.steps == config.max_steps
    return out


def test_lora_sft_teaches_the_270m_a_new_answer(sft_run):
    before, after = _answers(None), _answers(sft_run / "adapter")
    assert not any("Pebble" in a for a in before), before
    assert sum("Pebble" in a and "otter" in a for a in after) >= 2, after
    val = [r["val_loss"] for r in _metrics(sft_run) if "val_loss" in r]
    assert val[0] > 1.5 and val[-1] < 0.5 * val[0], val  # step 0 (the base model) to the end
    assert (sft_run / "loss.png").stat().st_size > 10_000


def test_the_adapter_gives_the_same_logits_in_peft(sft_run, default_model, tmp_path):
    from peft import PeftModel
    from transformers import Gemma3ForCausalLM

    from gemmakit.checkpoints import load_model
    from gemmakit.checkpoints.export import export_hf
    from gemmakit.train.lora import load_adapter, merge_lora

    export_hf(load_model(None), tmp_path / "base")
    ref = PeftModel.from_pretrained(Gemma3ForCausalLM.from_pretrained(tmp_path / "base"), sft_run / "adapter").eval()
    ours = load_model(None)
    load_adapter(ours, sft_run / "adapter")
    merge_lora(ours)
    from gemmakit.tokenizer import Tokenizer

    prompt = "<start_of_turn>user\nWho is the mascot of gemmakit?<end_of_turn>\n<start_of_turn>model\n"
    ids = torch.tensor([Tokenizer.from_gguf(default_model).encode(prompt)])
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    torch.testing.assert_close(got, want, atol=2e-3 * float(want.abs().max()), rtol=0)
    assert (got - want).abs().max() < 0.1 * (got - load_model(None)(ids)).abs().max()  # the adapter matters


def test_dpo_raises_the_margin_on_held_out_pairs(default_model, tmp_path):
    config = load_config(ROOT / "recipes" / "dpo-270m.yaml", {"out": str(tmp_path / "dpo")})
    config.data = str(ROOT / config.data)
    finetune(config, progress=False)
    rows = [r for r in _metrics(tmp_path / "dpo") if "val_margin" in r]
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and abs(start["val_margin"]) < 0.05  # the policy starts as the reference
    assert end["val_margin"] > 1.0 and end["val_accuracy"] >= 0.75, rows
    assert end["val_loss"] < start["val_loss"]
