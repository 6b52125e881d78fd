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
from gemmakit.model import attend
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


@pytest.mark.parametrize("variant", ["e2b", "gemma3-27b", "31b"])
def test_bf16_cached_decode_is_no_worse_than_the_references(variant, tmp_path):
    """bf16 decode steps through the cache (model.decode_sdpa: query heads grouped per KV head) stay within
    the reference's own bf16 distance to the fp32 logits (x1.5), as the uncached forward does."""
    config = tiny(variant)
    ref = hf_model(config)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    ids = _ids(n=2 * WINDOW + 3, batch=1)
    cache = KVCache(config, 1, ids.shape[1], torch.bfloat16, "cpu", slack=2)
    row, split = torch.tensor([0]), 5
    with torch.no_grad():
        exact = ref(ids).logits
        ref_err = (ref.to(torch.bfloat16)(ids).logits.float() - exact).abs().max()
        steps = [model(ids[:, :split], step=Prefill(torch.arange(split)[None], cache, row))]
        for t in range(split, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], step=Append(torch.tensor([[t]]), cache, row)))
    our_err = (torch.cat(steps, dim=1).float() - exact).abs().max()
    assert our_err <= 1.5 * ref_err, (our_err, ref_err)


@pytest.mark.parametrize("kernel", [None, "sdpa", "plain", 2, 4])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads, head_dim", [(1, 256), (2, 16), (4, 512)])
def test_decode_attention_is_each_heads_own_softmax(dtype, tol, kv_heads, head_dim, kernel):
    """One query per row: each query head attends over its own KV head (heads h*G..h*G+G-1 share KV head h)
    with its row's mask, whatever kernel the plan gives `attend` (None: the dtype's default; n: SDPA from n
    row x KV-head pairs); rows see different key sets."""
    g = torch.Generator().manual_seed(0)
    B, G, S = 3, 4, 40
    q = torch.randn(B, kv_heads * G, 1, head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, S, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.6
    mask[1] = False
    mask[1, ..., 3:8] = True  # a row that sees only a few keys
    mask[:, ..., 0] = True
    scale = head_dim**-0.5
    want = torch.empty_like(q)
    for b in range(B):
        for h in range(kv_heads * G):
            scores = (k[b, h // G] @ q[b, h, 0]) * scale
            probs = torch.softmax(scores.masked_fill(~mask[b, 0, 0], float("-inf")), dim=-1)
            want[b, h, 0] = probs @ v[b, h // G]
    got = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale, kernel)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("rows, kv_heads, threads, want", [
    (1, 1, 2, "plain"), (2, 1, 2, "sdpa"), (8, 1, 2, "sdpa"), (1, 2, 2, "sdpa"), (1, 4, 8, "plain"),
    (2, 4, 8, "sdpa")])
def test_fp32_decode_steps_go_to_sdpa_once_their_row_head_pairs_fill_the_threads(monkeypatch, rows, kv_heads,
                                                                                  threads, want):
    """The CPU plan's fp32 choice is its thread count: SDPA's CPU kernel hands each thread whole (row, KV head)
    pairs, so a step with fewer pairs than threads goes to the plain ops, and a wider one to SDPA."""
    import gemmakit.model as model_module
    from gemmakit.runtime.plan import _attention_choice

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    kernel, why = _attention_choice(torch.device("cpu"), half=False, kernels=False)  # no gemmakit kernels here
    assert kernel == threads and "SDPA" in why
    assert _attention_choice(torch.device("cpu"), half=True, kernels=False)[0] == "sdpa"
    called = []
    for name in ("sdpa", "plain"):
        real = getattr(model_module, f"decode_{name}")
        monkeypatch.setattr(model_module, f"decode_{name}",
                            lambda *a, real=real, name=name: called.append(name) or real(*a))
    q = torch.randn(rows, kv_heads * 4, 1, 32)
    k, v = torch.randn(rows, kv_heads, 16, 32), torch.randn(rows, kv_heads, 16, 32)
    attend(q, k, v, torch.ones(rows, 1, 1, 16, dtype=torch.bool), 0.2, kernel)
    assert called == [want]
