"""`export_hf` writes HF directories that transformers and gemmakit load with the same logits (checkpoints/
export.py), also for a LoRA-merged model and the real 270M GGUF. Run: .venv/bin/python -m pytest tests/test_export.py
"""

from __future__ import annotations

import pytest
import torch
import transformers

from gemmakit.checkpoints import load_model, load_model_and_tokenizer
from gemmakit.checkpoints.export import export_hf
from gemmakit.runtime.packing import pack_linears
from gemmakit.train.lora import LoRALinear, add_lora, merge_lora
from tests.helpers import WINDOW, hf_model, tiny

IDS = torch.randint(0, 1000, (2, 2 * WINDOW + 3), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("variant", ["gemma3", "e2b"])
@torch.no_grad()
def test_an_adapted_model_exports_to_transformers(variant, tmp_path):
    hf_model(tiny(variant)).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_lora(model, r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.weight.normal_(0, 0.05)
    want = model(IDS)
    with pytest.raises(ValueError, match="merge LoRA adapters first"):
        export_hf(model, tmp_path / "out")
    export_hf(merge_lora(model), tmp_path / "out", shard_bytes=200_000)  # several shards and an index
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(IDS).logits
    torch.testing.assert_close(theirs, want, atol=1e-3, rtol=0)
    torch.testing.assert_close(load_model(tmp_path / "out")(IDS), want, atol=1e-3, rtol=0)
    with pytest.raises(FileExistsError):
        export_hf(model, tmp_path / "out")
    with pytest.raises(ValueError, match="PackedLinear"):
        export_hf(pack_linears(model), tmp_path / "packed")
    assert not (tmp_path / "packed").exists() and not list(tmp_path.glob(".packed*"))


@pytest.mark.slow
@torch.no_grad()
def test_the_default_gguf_exports_to_an_hf_directory(default_model, tmp_path):
    """The embedded 270M GGUF becomes an HF directory: transformers' logits equal gemmakit's, and gemmakit
    reloads it with the same tokenizer."""
    model, tok = load_model_and_tokenizer(default_model)
    export_hf(model, tmp_path / "gemma-3-270m", tokenizer=tok)
    ids = torch.tensor([tok.encode("The capital of France is")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gemma-3-270m").eval()(ids).logits
    torch.testing.assert_close(theirs, model(ids), atol=1e-3, rtol=0)
    again, tok2 = load_model_and_tokenizer(tmp_path / "gemma-3-270m")
    assert tok2.encode("The capital of France is") == ids[0].tolist()
    assert torch.equal(again(ids), model(ids))


def test_merge_command_folds_a_peft_adapter(tmp_path, capsys):
    """`gemmakit merge --adapter`: a PEFT-made adapter folded into the base and written where asked (transformers
    gives the PEFT model's logits), never over an existing directory."""
    peft = pytest.importorskip("peft")
    from gemmakit.cli import main

    ref = hf_model(tiny("gemma3"))
    ref.save_pretrained(tmp_path / "base")
    tuned = peft.get_peft_model(ref, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                     init_lora_weights=False)).eval()
    tuned.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = tuned(IDS).logits
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
            str(tmp_path / "merged")]
    assert main(args) == 0  # the tiny checkpoint has no tokenizer: the weights are written, with a note
    assert "without a tokenizer" in capsys.readouterr().err
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
