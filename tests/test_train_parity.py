"""Training parity with the reference (issue 6's first requirement): for tiny configs with the real variants'
structure, the cross-entropy loss and the gradient of every parameter equal transformers' on the same
weights and batch, in fp32. Run: .venv/bin/python -m pytest tests/test_train_parity.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemmakit.checkpoints import load_model
from tests.helpers import WINDOW, hf_model, tiny


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("variant", ["gemma3", "e2b", "26b-a4b", "31b"])
def test_loss_and_gradients_match_transformers(variant, tmp_path):
    ref = hf_model(tiny(variant))
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path).train().requires_grad_(True)  # loaded frozen for inference
    ref.train()
    ids = torch.randint(0, 1000, (2, 3 * WINDOW + 5), generator=torch.Generator().manual_seed(1))
    want, got = _loss(ref(ids).logits, ids), _loss(ours(ids), ids)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert our_grads.keys() == ref_grads.keys()  # HF names, and the same parameters take part
    assert sum(float(g.abs().sum()) for g in ref_grads.values()) > 0  # a comparison of zeros would mean nothing
    for name, g in ref_grads.items():
        torch.testing.assert_close(our_grads[name], g, atol=1e-4 * float(g.abs().max()) + 1e-7, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_activation_checkpointing_gives_the_same_gradients(variant):
    """Recomputing each layer in the backward pass (with E2B's shared KV and the MoE router) changes nothing."""
    from gemmakit.model import Gemma

    torch.manual_seed(0)
    model = Gemma(tiny(variant)).train()
    with torch.no_grad():  # the constructor leaves weights to the loaders
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    ids = torch.randint(0, 1000, (2, 3 * WINDOW + 5), generator=torch.Generator().manual_seed(2))
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        _loss(model(ids), ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
