"""LoRA adapters are PEFT adapters (train/lora.py): a fresh adapter changes nothing, an adapter saved here
loads in `peft` on the transformers model with the same logits, a PEFT-saved adapter loads here, and merging
keeps the outputs. Run: .venv/bin/python -m pytest tests/test_lora.py
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.checkpoints import load_model
from gemmakit.train.lora import LoRALinear, add_lora, load_adapter, merge_lora, save_adapter
from tests.helpers import WINDOW, hf_model, tiny

peft = pytest.importorskip("peft")
IDS = torch.randint(0, 1000, (2, 2 * WINDOW + 3), generator=torch.Generator().manual_seed(4))


@pytest.fixture(params=["gemma3", "e2b"])
def base(request, tmp_path):
    ref = hf_model(tiny(request.param))
    ref.save_pretrained(tmp_path / "base")
    return ref, tmp_path


@torch.no_grad()
def test_a_fresh_adapter_changes_nothing(base):
    _, tmp = base
    model = load_model(tmp / "base")
    want = model(IDS)
    adapted = add_lora(model, r=4, alpha=8)
    assert adapted and all(isinstance(model.get_submodule(p), LoRALinear) for p in adapted)
    assert torch.equal(model(IDS), want)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


@torch.no_grad()
def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(base):
    ref, tmp = base
    model = load_model(tmp / "base")
    add_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.weight.normal_(0, 0.05)  # as after training
    save_adapter(model, tmp / "adapter", base_model=str(tmp / "base"))
    ours = model(IDS)
    theirs = peft.PeftModel.from_pretrained(ref, tmp / "adapter").eval()(IDS).logits
    assert (ours - load_model(tmp / "base")(IDS)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # Merging changes only rounding (W + s·BA is summed once, in fp32), a few 1e-4 on logits of size ~30.
    torch.testing.assert_close(merge_lora(model)(IDS), ours, atol=1e-3, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def test_a_peft_adapter_loads_here(base):
    ref, tmp = base
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "o_proj", "gate_proj"],
                             init_lora_weights=False)  # random B: a non-trivial adapter
    tuned = peft.get_peft_model(ref, config).eval()
    tuned.save_pretrained(tmp / "peft")
    want = tuned(IDS).logits
    model = load_model(tmp / "base")
    adapted = load_adapter(model, tmp / "peft")
    assert {p.rsplit(".", 1)[-1] for p in adapted} == {"k_proj", "o_proj", "gate_proj"}
    torch.testing.assert_close(model(IDS), want, atol=1e-4, rtol=0)


def test_bad_adapters_are_refused(tmp_path):
    model = load_model(_save(tmp_path))
    with pytest.raises(ValueError, match="not a readable PEFT adapter"):
        load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(model, targets=("no_such_proj",))


def _save(tmp_path):
    hf_model(tiny("gemma3")).save_pretrained(tmp_path / "m")
    return tmp_path / "m"
