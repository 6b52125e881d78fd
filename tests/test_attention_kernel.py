"""gemmakit's CPU decode attention kernel (runtime/attention_avx2.cpp) computes what plain ops do, reading the
cache in place, and the plan sends CPU decode steps to it.
Run: .venv/bin/python -m pytest tests/test_attention_kernel.py
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.model import attend, decode_plain
from gemmakit.runtime import gemv
from gemmakit.runtime.plan import _attention_choice
from gemmakit.runtime.steps import set_decode_attention
from gemmakit.sampling import SamplingParams
from tests.helpers import assert_same_until_a_tie, hf_model, tiny

pytestmark = pytest.mark.skipif(gemv.unavailable() is not None, reason=f"no kernels here: {gemv.unavailable()}")


def _case(B: int, Hq: int, Hk: int, S: int, D: int, dtype: torch.dtype, seed: int = 0):
    """q, a cache narrowed to S of S + 5 slots (as a decode step reads it), and a mask with a few keys off."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, S + 5, D, generator=g).to(dtype).narrow(2, 0, S)
    v = torch.randn(B, Hk, S + 5, D, generator=g).to(dtype).narrow(2, 0, S)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.8
    mask[..., 0] = True
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, Hq, Hk, S, D", [
    (8, 4, 1, 256, 256),  # the 270M's batch step
    (1, 4, 1, 1100, 256),  # one row over a long span: its keys split over the threads, then merged
    (3, 8, 2, 77, 36),  # D with a tail past whole vectors
    (2, 10, 2, 9, 16),  # 5 queries per KV head: a group of 4 and one of 1
    (1, 6, 2, 600, 512),  # 3 per KV head, a Gemma 4 global head's width
])
def test_the_kernel_is_softmax_attention_over_the_unmasked_keys(B, Hq, Hk, S, D, dtype):
    q, k, v, mask = _case(B, Hq, Hk, S, D, dtype)
    want = decode_plain(q.float(), k.float(), v.float(), mask, 0.3)
    got = gemv.attention(q, k, v, mask, 0.3)
    assert got.dtype == dtype and got.shape == (B, Hq, 1, D)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    else:  # the fp32 result rounded once to bf16
        torch.testing.assert_close(got.float(), want.bfloat16().float(), atol=1e-2, rtol=2**-7)


def test_masked_keys_are_not_read():
    """A masked slot may hold anything (a spare slot, another request's leftovers): NaN there changes nothing,
    and a row whose every key is masked gets zeros, not NaN."""
    q, k, v, mask = _case(2, 4, 1, 300, 64, torch.float32)
    want = gemv.attention(q, k, v, mask, 0.2)
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, 0, 0][:, None].expand_as(k2[..., 0])] = float("nan")
    v2[~mask[:, 0, 0][:, None].expand_as(v2[..., 0])] = float("nan")
    torch.testing.assert_close(gemv.attention(q, k2, v2, mask, 0.2), want, atol=0, rtol=0)
    mask[1] = False
    out = gemv.attention(q, k, v, mask, 0.2)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and not out.isnan().any()


def test_the_kernel_refuses_operands_it_cannot_read():
    q, k, v, mask = _case(1, 4, 1, 16, 32, torch.float32)
    with pytest.raises(RuntimeError, match="unit stride"):
        gemv.attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, mask, 1.0)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        gemv.attention(q, k.half(), v.half(), mask, 1.0)
    with pytest.raises(RuntimeError, match="bool"):
        gemv.attention(q, k, v, mask.float(), 1.0)
    with pytest.raises(RuntimeError, match="multiple"):
        gemv.attention(q[:, :3], k.expand(1, 2, 16, 32), v.expand(1, 2, 16, 32), mask, 1.0)


@pytest.mark.parametrize("rows, kv_heads, threads, want", [
    (1, 1, 2, "plain"), (2, 1, 2, "kernel"), (8, 1, 2, "kernel"), (1, 4, 8, "plain"), (2, 4, 8, "kernel")])
def test_fp32_steps_take_the_kernel_once_their_row_head_pairs_fill_the_threads(monkeypatch, rows, kv_heads, threads,
                                                                              want):
    """Where the kernels are built, fp32 steps with as many (row, KV head) pairs as threads go to the kernel and
    narrower ones to plain ops (which inductor fuses with the ops around them); bf16 steps all go to it."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    fp32, why = _attention_choice(torch.device("cpu"), half=False, kernels=True)
    assert f"gemmakit's kernel for steps of {threads}+" in why
    assert _attention_choice(torch.device("cpu"), half=True, kernels=True)[0] is gemv.attention
    called = []
    for name, real in (("attention", gemv.attention), ("decode_plain", gemv.decode_plain)):
        monkeypatch.setattr(gemv, name, lambda *a, real=real, name=name: called.append(name) or real(*a))
    q, k, v, mask = _case(rows, kv_heads * 4, kv_heads, 16, 32, torch.float32)
    attend(q, k, v, mask, 0.2, fp32)
    assert called == ["attention" if want == "kernel" else "decode_plain"]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_engines_decode_through_the_kernel_with_the_models_tokens(compile, tmp_path, monkeypatch):
    """The plan gives CPU decode steps the kernel, and a batch of rows at different positions decodes what
    plain attention ops decode."""
    hf_model(tiny("gemma3")).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    calls, kernel = [], gemv.attention
    if not compile:  # a compiled graph calls the op itself; eager steps call this function every step
        monkeypatch.setattr(gemv, "attention", lambda *a: calls.append(1) or kernel(*a))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 19, 40)]
    params = SamplingParams(max_tokens=30, logprobs=2)
    engine = Engine(model, max_batch=3, context=128, compile=compile)
    assert "decode attention: gemmakit's kernel" in engine.runtime.plan.describe()
    got = engine.generate(prompts, params)
    assert compile or len(calls) >= 29 * model.config.num_hidden_layers
    reference = Engine(model, max_batch=3, context=128)
    set_decode_attention(model, "plain")
    for a, b in zip(got, reference.generate(prompts, params), strict=True):
        assert_same_until_a_tie(a, b, 1e-4, prefix=8)


def test_float16_models_keep_sdpa(tmp_path):
    """The kernel reads fp32 and bf16 caches only: an Engine given a float16 model (the CLI refuses those, the
    Python API does not) keeps SDPA and decodes every token it was asked for."""
    hf_model(tiny("gemma3")).save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path).half(), max_batch=2, context=64)
    assert "decode attention: SDPA (half precision)" in engine.runtime.plan.describe()
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=5))[0]
    assert len(out.tokens) == 5 and out.finish_reason == "length"
