"""Parity with the reference: every variant's structure, random weights, logits equal to transformers 5.23.0.

Each test builds a tiny config with the real variant's structure, gives the HF model random weights (norm
weights and layer scalars moved away from their init), saves it with `save_pretrained`, loads the directory
through gemmakit's public loader and compares fp32 logits over a sequence longer than the sliding window.
Run: .venv/bin/python -m pytest tests/test_parity.py
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.cache import Append, KVCache, Prefill
from gemmakit.checkpoints import load_model
from gemmakit.config import SLIDING
from tests.helpers import WINDOW, hf_model, tiny

VARIANTS = ["gemma3", "gemma3-27b", "e2b", "e4b", "26b-a4b", "31b", "12b"]


def _ids(n: int = 3 * WINDOW + 5, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, tmp_path):
    """gemmakit's logits equal transformers' to 1e-4 for a checkpoint saved by transformers."""
    config = tiny(variant)
    ref = hf_model(config)
    ref.save_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        got = load_model(tmp_path)(ids)
    assert expected.std() > 0.5, "random weights too small for the comparison to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["e2b", "gemma3", "31b"])
def test_cached_decode_matches_full_forward(variant, tmp_path):
    """Prefill + one-token decode steps through the rolling KV cache reproduce the uncached forward pass,
    far past the sliding window (the ring holds only window + slack slots)."""
    config = tiny(variant)
    hf_model(config).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = _ids(n=5 * WINDOW, batch=1)
    cache = KVCache(config, 1, ids.shape[1], torch.float32, "cpu", slack=2)
    assert cache.slots[SLIDING] == WINDOW + 2
    row = torch.tensor([0])
    with torch.no_grad():
        full = model(ids)
        split = 5
        steps = [model(ids[:, :split], step=Prefill(torch.arange(split)[None], cache, row))]
        for t in range(split, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], step=Append(torch.tensor([[t]]), cache, row)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=5e-4, rtol=1e-4)


def test_prefill_longer_than_the_ring_then_decode(tmp_path):
    """A prompt longer than the sliding ring keeps only its tail, and decoding after it is still exact."""
    config = tiny("e4b")
    hf_model(config).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = _ids(n=4 * WINDOW, batch=1)
    cache = KVCache(config, 1, ids.shape[1], torch.float32, "cpu", slack=1)
    row, n = torch.tensor([0]), 3 * WINDOW
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :n], step=Prefill(torch.arange(n)[None], cache, row))]
        for t in range(n, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], step=Append(torch.tensor([[t]]), cache, row)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=5e-4, rtol=1e-4)


def test_logits_to_keep_returns_the_last_positions(tmp_path):
    """Computing logits only where needed gives the same numbers as slicing the full output."""
    hf_model(tiny("e4b")).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = _ids(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=3), model(ids)[:, -3:], atol=1e-5, rtol=0)


def test_bf16_error_is_no_worse_than_the_references(tmp_path):
    """In bf16, gemmakit's distance to the fp32 reference is within the reference's own bf16 distance (x1.5)."""
    config = tiny("e2b")
    ref = hf_model(config)
    ref.save_pretrained(tmp_path)
    ids = _ids(batch=1)
    with torch.no_grad():
        exact = ref(ids).logits
        ref_err = (ref.to(torch.bfloat16)(ids).logits.float() - exact).abs().max()
        our_err = (load_model(tmp_path, dtype=torch.bfloat16)(ids).float() - exact).abs().max()
    assert our_err <= 1.5 * ref_err, (our_err, ref_err)
