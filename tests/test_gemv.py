"""gemmakit's decode-step int4 / int8 kernels for AVX2 CPUs (runtime/gemv.py): the dequantized product in fp32,
whatever the shape's tails and row count, and the engine's plan sends decode steps' products there on CPUs
without AVX-512.
Skipped where the kernels cannot be used (not x86, or ATen held below AVX2), which the plan then says.
Run: .venv/bin/python -m pytest tests/test_gemv.py
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.engine import Engine
from gemmakit.model import Gemma
from gemmakit.quantize import Int4Linear, Int8Linear, quantize_model
from gemmakit.quantize_codes import (
    COMPUTE_DTYPE,
    dequantize_int4,
    quantize_int4,
    quantize_int4_packed,
    quantize_int8,
)
from gemmakit.runtime import gemv
from gemmakit.runtime.probe import wide_vectors
from gemmakit.sampling import SamplingParams
from tests.helpers import greedy_without_cache, tiny

pytestmark = pytest.mark.skipif(gemv.unavailable() is not None, reason=f"gemv kernels: {gemv.unavailable()}")


@pytest.mark.parametrize("n, k, group", [(32, 64, 32), (96, 640, 32), (64, 256, 64), (640, 1024, 128),
                                         (32, 512, 256)])
def test_int4_kernel_is_the_dequantized_product(n, k, group):
    """Against W dequantized in fp32: agreement to fp32 rounding, where torch's kernel (bf16 activations) is
    ~100x further off."""
    if not gemv.int4_fits(n, k, group):
        pytest.skip(f"this machine's int4 packing of {k} inputs is not the AVX2 layout")
    g = torch.Generator().manual_seed(n + k)
    # 11 rows: a chunk of 8 (the many-row path), then 2, then 1 (the one-row path)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(11, k, generator=g) * 4
    packed, sz, _ = quantize_int4_packed(w, group)
    want = x @ dequantize_int4(*quantize_int4(w, group)).T
    got = gemv.int4(x, packed, sz, group)
    assert got.dtype == torch.float32 and got.shape == (11, n)
    err = (got - want).abs().max().item()
    torch_err = (torch._weight_int4pack_mm_for_cpu(x.to(COMPUTE_DTYPE), packed, group, sz).float() - want).abs().max()
    assert err < 1e-4 * want.abs().max().item() and err < torch_err.item() / 20


@pytest.mark.parametrize("n, k", [(4, 8), (7, 13), (256, 640), (61, 2048), (1030, 100)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_is_the_dequantized_product(n, k, scale_dtype):
    """Weight rows not a multiple of eight and inputs not a multiple of eight take the kernel's scalar tails;
    11 rows of x: a chunk of 8 and one of 3 (each code widened once per chunk), and one row on its own path."""
    g = torch.Generator().manual_seed(n * k)
    w, x = torch.randn(n, k, generator=g), torch.randn(11, k, generator=g)
    q, s = quantize_int8(w, scale_dtype)
    want = x @ (q.float() * s.float()[:, None]).T
    got = torch.cat([gemv.int8(x, q, s), gemv.int8(x[:1], q, s)])
    want = torch.cat([want, want[:1]])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


def test_kernels_refuse_operands_they_cannot_read():
    q, s = quantize_int8(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="int8"):
        gemv.int8(torch.randn(1, 12), q, s)  # K mismatch
    packed, sz, _ = quantize_int4_packed(torch.randn(32, 64), 32)
    with pytest.raises(RuntimeError, match="int4 shapes"):
        torch.ops.gemmakit_avx2.int4_gemv(torch.randn(1, 64), packed[:16], sz, 32)
    with pytest.raises(RuntimeError, match="int4 shapes"):
        torch.ops.gemmakit_avx2.int4_gemv(torch.randn(1, 64), packed, sz, 0)  # a group of 0 would divide by 0


def _int4_gemma() -> Gemma:
    torch.manual_seed(0)
    # hidden 64 / intermediate 128: every linear (and the 1024-row tied head) fits the int4 kernel's layout
    model = Gemma(tiny("gemma3").replace(vocab_size=1024, intermediate_size=128)).eval()
    return quantize_model(model, "int4")


def test_linears_send_decode_rows_there_and_keep_prompts_on_torch(monkeypatch):
    model = _int4_gemma()
    linear, values = model.model.layers[0].mlp.gate_proj, model.model.layers[0].self_attn.v_proj
    assert isinstance(linear, Int4Linear) and isinstance(values, Int8Linear)
    calls, int4, int8 = [], gemv.int4, gemv.int8
    monkeypatch.setattr(gemv, "int4", lambda *a: calls.append(("int4", *a[0].shape)) or int4(*a))
    monkeypatch.setattr(gemv, "int8", lambda *a: calls.append(("int8", *a[0].shape)) or int8(*a))
    x = torch.randn(8, 1, 64)
    before = linear(x), values(x[:1])
    linear.gemv_rows, values.gemv_rows = 8, 1
    after = linear(x), values(x[:1])
    linear(torch.randn(1, 9, 64)), values(x[:2])  # a 9-token prompt, two int8 rows: torch's kernels
    assert calls == [("int4", 8, 64), ("int8", 1, 64)]
    for got, want in zip(after, before, strict=True):
        assert torch.allclose(got, want, rtol=0.02, atol=0.02)


def test_the_engine_plan_takes_the_kernels_and_tokens_keep():
    """On a CPU without AVX-512 the plan names the kernels and decode steps run on them, eager and compiled,
    one row and two (int4), with the tokens of the model on torch's kernels."""
    if wide_vectors():
        pytest.skip("AVX-512 here: the plan keeps torch's kernels (tests/test_avx2.py holds a run to AVX2)")
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=8)
    want = [greedy_without_cache(_int4_gemma(), p, 8) for p in prompts]  # the model alone: torch's kernels
    for compile in (False, True):
        model = _int4_gemma()
        engine = Engine(model, max_batch=2, context=64, compile=compile)
        assert "int4/int8 decode products: gemmakit's AVX2 kernels" in engine.plan.describe()
        linears = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
        want_rows = [gemv.INT8_ROWS if isinstance(m, Int8Linear) else gemv.INT4_ROWS
                     if gemv.int4_fits(m.out_features, m.in_features, m.group_size) else 0 for m in linears]
        assert [m.gemv_rows for m in linears] == want_rows
        assert model.lm_head.gemv_rows and 0 in want_rows  # k_proj's 16 rows are not a whole block of 32
        got = [r.tokens for r in engine.generate(prompts, params)]
        assert got == want, f"compile={compile}"


def test_turned_off_the_plan_says_so(monkeypatch):
    monkeypatch.setenv("GEMMAKIT_GEMV", "off")
    gemv.unavailable.cache_clear()
    try:
        engine = Engine(_int4_gemma(), max_batch=1, context=64)
        assert "GEMMAKIT_GEMV=off" in engine.plan.describe() or wide_vectors()
        assert not engine.plan.gemv_kernels
    finally:
        monkeypatch.delenv("GEMMAKIT_GEMV")
        gemv.unavailable.cache_clear()


def test_a_kernel_that_disagrees_with_the_reference_is_not_used(monkeypatch):
    """The probe runs both kernels' paths against the fp32 product: one that computes something else leaves
    torch's kernels in place, with the reason in the plan's line."""
    right = gemv.int8
    monkeypatch.setattr(gemv, "int8", lambda x, q, s: right(x, q, s) + (x.shape[0] > 1))  # off on many rows
    gemv.unavailable.cache_clear()
    try:
        assert gemv.unavailable() == "gemmakit's AVX2 kernels disagree with the reference here"
        engine = Engine(_int4_gemma(), max_batch=1, context=64)
        assert not engine.plan.gemv_kernels
        assert "disagree" in engine.plan.describe() or wide_vectors()  # AVX-512: not asked in the first place
    finally:
        monkeypatch.setattr(gemv, "int8", right)
        gemv.unavailable.cache_clear()
    assert gemv.unavailable() is None
