"""gemmakit's decode-step AVX2 kernels (runtime/gemv.py): the dequantized product in fp32, whatever the shape's
tails and row count, and the engine's plan sends decode steps' products there on x86 CPUs (AVX-512 ones too).
Skipped where the kernels cannot be used (not x86, or ATen held below AVX2), which the plan then says.
Run: .venv/bin/python -m pytest tests/test_gemv.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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
from gemmakit.sampling import SamplingParams
from tests.helpers import greedy_without_cache, tiny

pytestmark = pytest.mark.skipif(gemv.unavailable() is not None, reason=f"gemv kernels: {gemv.unavailable()}")


# Rows of x: the one-row path, and chunks of every height the many-row paths take (up to 4 rows a pass: 2;
# 4 + 1; 4 + 4 + 3; the AVX-512 build's 8 a pass: 2; 5; 8 + 3).
ROWS = [1, 2, 5, 11]
# The several-row builds this CPU runs: AVX2 everywhere, AVX-512 (VNNI) and the screen's AMX pass where the plan
# takes them (gemv.vector_width, gemv.screen_amx), each checked against the same reference.
WIDE = [False, *([True] * (gemv.vector_width() == 512))]
SCREEN_ISAS = [0, *([1] * (gemv.vector_width() == 512)), *([2] * gemv.screen_amx())]
# The screen's grids on those passes: 14-bit x on each, 8-bit (the byte pass) where AVX-512 VNNI is.
GRIDS = [(isa, 14) for isa in SCREEN_ISAS] + [(1, 8)] * (gemv.vector_width() == 512)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n, k, group", [(32, 64, 32), (96, 640, 32), (64, 256, 64), (640, 1024, 128),
                                         (32, 512, 256)])
def test_int4_kernel_is_the_dequantized_product_of_x_on_the_grid(n, k, group, rows):
    """x rounded onto the 14-bit grid (gemv.on_grid) times W dequantized: agreement to fp32 rounding, in float64.
    Against x itself the kernel is off by no more than rounding x moved (|x - x~| |w| per row), where torch's
    kernel (bf16 activations) is further off."""
    if not gemv.int4_fits(n, k, group):
        pytest.skip(f"this machine's int4 packing of {k} inputs is not the AVX2 layout")
    g = torch.Generator().manual_seed(n + k)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(rows, k, generator=g) * 4
    packed, sz, _ = quantize_int4_packed(w, group)
    decoded = dequantize_int4(*quantize_int4(w, group)).double()
    on_grid = gemv.on_grid(x).double()
    got = gemv.int4(x, packed, sz, group)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    want = on_grid @ decoded.T
    assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item()
    moved = (x.double() - on_grid).norm(dim=-1, keepdim=True) * decoded.norm(dim=-1)  # [rows, n]
    off = (got - x.double() @ decoded.T).abs()
    assert bool((off <= moved + 1e-6 * want.abs().max()).all())
    torch_err = (torch._weight_int4pack_mm_for_cpu(x.to(COMPUTE_DTYPE), packed, group, sz).double() - x.double()
                 @ decoded.T).abs().max()
    assert off.max().item() < torch_err.item() / 4


@pytest.mark.parametrize("n, k, group", [(64, 256, 32), (96, 512, 256), (640, 1024, 128)])
def test_int4_rows_get_the_same_bits_alone_or_beside_others(n, k, group):
    """One row takes the 16-bit multiply-adds, several the fp32 tiles; both sum x~'s integer products exactly
    (chunks of 128 inputs keep a group of 256 exact) and fold them alike, so a row's logits do not depend on
    which rows share its step."""
    if not gemv.int4_fits(n, k, group):
        pytest.skip(f"this machine's int4 packing of {k} inputs is not the AVX2 layout")
    g = torch.Generator().manual_seed(k)
    packed, sz, _ = quantize_int4_packed(torch.randn(n, k, generator=g) * 0.05, group)
    x = torch.randn(8, k, generator=g) * 3
    alone = torch.cat([gemv.int4(x[i : i + 1], packed, sz, group) for i in range(8)])
    for rows in (2, 3, 5, 8):  # a tile of 2, of 3, 4 + 1, two of 4
        assert torch.equal(gemv.int4(x[:rows], packed, sz, group), alone[:rows])


@pytest.mark.parametrize("wide", WIDE, ids=lambda w: "avx512" if w else "avx2")
@pytest.mark.parametrize("rows", [*ROWS, 8])
@pytest.mark.parametrize("n, k", [(4, 8), (8, 16), (7, 13), (256, 640), (61, 2048), (1030, 100)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_is_the_dequantized_product(n, k, scale_dtype, rows, wide):
    """Weight rows not a multiple of eight (one row of x) or three (tiles of several) and inputs not a multiple
    of eight (sixteen in the AVX-512 build) take the kernel's tails."""
    g = torch.Generator().manual_seed(n * k)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    x[:, 3 % k], x[-1, 5 % k] = 50.0, -80.0  # outliers of either sign
    q, s = quantize_int8(w, scale_dtype)
    want = x @ (q.float() * s.float()[:, None]).T
    assert torch.allclose(gemv.int8(x, q, s, wide), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("isa", SCREEN_ISAS, ids=lambda i: ["avx2", "avx512", "amx"][i])
@pytest.mark.parametrize("rows", [*ROWS, 8])
@pytest.mark.parametrize("n, k", [(7, 13), (256, 640), (61, 2048), (1030, 128)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_round_x_onto_the_screens_grid_and_sum_exactly(n, k, scale_dtype, rows, isa):
    """The int8 layers' decode rows (gemv.int8_grid): x rounded in the kernel onto the screen's grid gives the
    screen's pass bit for bit (the same x~, the same exact sums), on every pass this CPU has; so the product is
    off the fp32 one by no more than what rounding x moved, |x - x~| |w|, with an outlier 1000x the rest."""
    g = torch.Generator().manual_seed(n * k + rows)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    x[:, 3 % k], x[-1, 5 % k] = 1000.0, -700.0
    q, s = quantize_int8(w, scale_dtype)
    got = gemv.int8_grid(x, q, s, isa)
    sums, rounding, _ = gemv.screen_int8(x, q, s.float(), isa, bits=14)
    assert got.dtype == torch.float32 and torch.equal(got, sums)
    decoded = q.double() * s.double()[:, None]
    err = (got.double() - x.double() @ decoded.T).abs()
    assert (err <= rounding.double() * decoded.norm(dim=-1) * (1 + 1e-5) + 1e-4).all()


def test_int8_layers_take_the_grid_only_where_it_keeps_its_14_bits():
    """Past K = GRID_FULL_K the grid would be coarser (int32 sums must stay exact), so a wide int8 layer (a large
    model's down_proj) keeps fp32 x, as does the head; the layers up to it take the grid."""
    from gemmakit.quantize import use_gemv_kernels

    model = quantize_model(Gemma(tiny("gemma3").replace(vocab_size=1024, intermediate_size=gemv.GRID_FULL_K + 16))
                           .eval(), "int8")
    use_gemv_kernels(model)
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.in_features <= gemv.GRID_FULL_K < mlp.down_proj.in_features
    assert mlp.up_proj.x_grid and not mlp.down_proj.x_grid and not model.lm_head.x_grid
    assert gemv.GRID_FULL_K == 2064 and all(m.gemv_rows == gemv.INT8_ROWS for m in (mlp.up_proj, mlp.down_proj))


def test_a_rows_int8_layer_products_do_not_depend_on_the_rows_beside_it():
    """Exact integer sums: an int8 layer gives a row the same bits in a batch step of 8 rows, of 3 and alone (and
    on every pass this CPU has), where fp32 tiles and the one-row path sum in different orders; a row of NaN
    stays in its row."""
    q, s = quantize_int8(torch.randn(2048, 640), COMPUTE_DTYPE)
    layer = Int8Linear(q, s)
    layer.gemv_rows, layer.x_grid = gemv.INT8_ROWS, True
    x = torch.randn(8, 1, 640) * 3
    batch = layer(x)
    assert all(torch.equal(batch[r], layer(x[r:r + 1])[0]) for r in range(8))
    assert torch.equal(batch[:3], layer(x[:3]))
    assert all(torch.equal(batch[:, 0], gemv.int8_grid(x[:, 0], q, s, isa)) for isa in SCREEN_ISAS)
    x[2, 0, 17] = float("nan")
    assert layer(x).isnan().any(-1)[:, 0].tolist() == [r == 2 for r in range(8)]


def test_kernels_refuse_operands_they_cannot_read():
    q, s = quantize_int8(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="int8"):
        gemv.int8(torch.randn(1, 12), q, s)  # K mismatch
    packed, sz, _ = quantize_int4_packed(torch.randn(32, 64), 32)
    with pytest.raises(RuntimeError, match="int4 shapes"):
        torch.ops.gemmakit_avx2.int4_gemv(torch.randn(1, 64), packed[:16], sz, 32)
    with pytest.raises(RuntimeError, match="int4 shapes"):
        torch.ops.gemmakit_avx2.int4_gemv(torch.randn(1, 64), packed, sz, 0)  # a group of 0 would divide by 0
    with pytest.raises(RuntimeError, match="isa is 0"):  # no such pass
        torch.ops.gemmakit_avx2.int8_screen(torch.ones(1, 16, dtype=torch.int16), torch.ones(1), q, s.float(), 3,
                                            torch.empty(0), torch.empty(0))
    with pytest.raises(RuntimeError, match="norms: contiguous fp32"):  # a bound's norms for 7 rows of q, not 8
        torch.ops.gemmakit_avx2.int8_screen(torch.ones(1, 16, dtype=torch.int16), torch.ones(1), q, s.float(), 0,
                                            torch.ones(1, 2), torch.ones(2, 7))


def _int4_gemma() -> Gemma:
    torch.manual_seed(0)
    # hidden 64 / intermediate 128: every linear (and the 1024-row tied head) fits the int4 kernel's layout
    model = Gemma(tiny("gemma3").replace(vocab_size=1024, intermediate_size=128)).eval()
    return quantize_model(model, "int4")


def test_linears_send_decode_rows_there_and_keep_prompts_on_torch(monkeypatch):
    model = _int4_gemma()
    linear, values = model.model.layers[0].mlp.gate_proj, model.model.layers[0].self_attn.v_proj
    assert isinstance(linear, Int4Linear) and isinstance(values, Int8Linear)
    if not gemv.int4_fits(linear.out_features, linear.in_features, linear.group_size):
        pytest.skip("this machine's int4 packing is not the AVX2 layout (the plan never sends it there)")
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
    """The plan names the kernels and decode steps run on them, eager and compiled, one row and two (int4),
    with the tokens of the model on torch's kernels. Where torch packs int4 for AVX-512 only the int8 linears
    take them (the int4 kernel reads the AVX2 packing)."""
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=8)
    want = [greedy_without_cache(_int4_gemma(), p, 8) for p in prompts]  # the model alone: torch's kernels
    for compile in (False, True):
        model = _int4_gemma()
        engine = Engine(model, max_batch=2, context=64, compile=compile)
        assert "decode products: gemmakit's AVX2 kernels" in engine.plan.describe()
        linears = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
        want_rows = [gemv.INT8_ROWS if isinstance(m, Int8Linear) else gemv.INT4_ROWS
                     if gemv.int4_fits(m.out_features, m.in_features, m.group_size) else 0 for m in linears]
        assert [m.gemv_rows for m in linears] == want_rows
        stays = "int4 weights stay on torch's kernel, in its packing for this CPU"
        if gemv.int4_fits(model.lm_head.out_features, model.lm_head.in_features, model.lm_head.group_size):
            assert model.lm_head.gemv_rows and 0 in want_rows  # k_proj's 16 rows are not a whole block of 32
            assert stays not in engine.plan.describe()
        else:  # torch's AVX-512 packing: no int4 weight fits, and the plan's line says so
            assert not any(m.gemv_rows for m in linears if isinstance(m, Int4Linear))
            assert stays in engine.plan.describe()
        assert any(want_rows)  # v_proj stays int8 in an int4 model
        got = [r.tokens for r in engine.generate(prompts, params)]
        assert got == want, f"compile={compile}"


def _int8_gemma() -> Gemma:
    torch.manual_seed(0)
    return quantize_model(Gemma(tiny("gemma3").replace(vocab_size=1024, intermediate_size=128)).eval(), "int8")


def test_compiled_one_row_int8_products_go_where_they_were_timed_faster(monkeypatch):
    """Where inductor writes AVX-512 code, the plan times a compiled graph of one-row int8 products on gemmakit's
    kernel against inductor's fused reductions: the kernel serves one-row steps only where it won by a margin
    (a tie goes to the reductions, which fuse their neighbours in a step), steps of several rows stay on it
    either way, and the tokens are the same."""
    from gemmakit.runtime import plan as plan_module
    from gemmakit.runtime.compiled import compile_supported
    from gemmakit.runtime.probe import wide_vectors

    if gemv.unavailable() or not wide_vectors() or not compile_supported("cpu"):
        pytest.skip("timed only where gemmakit's kernels build and inductor writes AVX-512 code")
    # Prompts past gemv.INT8_ROWS tokens stay on torch's kernel, so every call counted below is a decode step's.
    prompts, params = [list(range(2, 12)), list(range(3, 15))], SamplingParams(max_tokens=6)
    want = [greedy_without_cache(_int8_gemma(), p, 6) for p in prompts]
    calls, int8, grid = [], gemv.int8, gemv.int8_grid  # the head's products, and the layers' (on the grid)
    monkeypatch.setattr(gemv, "int8", lambda *a: calls.append(a[0].shape[0]) or int8(*a))
    monkeypatch.setattr(gemv, "int8_grid", lambda *a: calls.append(a[0].shape[0]) or grid(*a))
    for seconds, rows, said in (((1.0, 2.0), 0, "int8 decode: gemmakit's AVX2 kernel (timed here as kernel vs "
                                                "reductions: 1000.00 vs 2000.00 ms)"),
                                ((1.0, 1.05), 1, "int8 decode: inductor's fused reductions for one row, gemmakit's "
                                                 "AVX2 kernel for more (timed here as kernel vs reductions: "
                                                 "1000.00 vs 1050.00 ms)")):
        monkeypatch.setattr(plan_module, "_int8_one_row_timings", lambda t=seconds: t)
        engine = Engine(_int8_gemma(), max_batch=2, context=64, compile=True)
        assert engine.plan.int8_reduce_rows == rows and said in engine.plan.describe()
        calls[:] = []
        assert [engine.generate([p], params)[0].tokens for p in prompts] == want  # one-row steps
        assert (1 in calls) == (rows == 0)  # compiled one-row steps called the kernel only where it won
        calls[:] = []
        assert [r.tokens for r in engine.generate(prompts, params)] == want  # two-row steps on the kernel
        assert 2 in calls


def test_a_failed_int8_timing_keeps_the_kernel(monkeypatch):
    """A timing that cannot run (a compiler error, say) costs speed only: the plan keeps gemmakit's kernel, says
    why, and the compiled engine decodes the model's tokens."""
    from gemmakit.runtime import plan as plan_module
    from gemmakit.runtime.compiled import compile_supported
    from gemmakit.runtime.probe import wide_vectors

    if gemv.unavailable() or not wide_vectors() or not compile_supported("cpu"):
        pytest.skip("timed only where gemmakit's kernels build and inductor writes AVX-512 code")

    def fails() -> tuple[float, float]:
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(plan_module, "_int8_one_row_timings", fails)
    prompt = list(range(2, 12))
    engine = Engine(_int8_gemma(), max_batch=1, context=64, compile=True)
    assert engine.plan.int8_reduce_rows == 0
    assert ("int8 decode: gemmakit's AVX2 kernel (timing against inductor's reductions failed: RuntimeError)"
            in engine.plan.describe())
    want = greedy_without_cache(_int8_gemma(), prompt, 4)
    assert engine.generate([prompt], SamplingParams(max_tokens=4))[0].tokens == want


def test_the_int8_timing_runs_both_compiled_graphs():
    """The timing behind that choice is real: both compiled graphs run, each a positive time, once a process."""
    from gemmakit.runtime.compiled import compile_supported
    from gemmakit.runtime.plan import _int8_one_row_timings
    from gemmakit.runtime.probe import wide_vectors

    if gemv.unavailable() or not wide_vectors() or not compile_supported("cpu"):
        pytest.skip("timed only where gemmakit's kernels build and inductor writes AVX-512 code")
    kernel, reduced = _int8_one_row_timings()
    assert 0 < kernel < 1 and 0 < reduced < 1
    assert _int8_one_row_timings() == (kernel, reduced)  # cached: the CPU does not change


def test_turned_off_the_plan_says_so(monkeypatch):
    """GEMMAKIT_GEMV=off: quantized products stay on torch's kernels, and an fp32 model is packed for oneDNN
    as where the kernels do not build (no GemvLinear, no screen through them)."""
    from gemmakit.runtime.plan import prepare_weights

    monkeypatch.setenv("GEMMAKIT_GEMV", "off")
    gemv.unavailable.cache_clear()
    try:
        engine = Engine(_int4_gemma(), max_batch=1, context=64)
        assert "GEMMAKIT_GEMV=off" in engine.plan.describe()
        assert not engine.plan.gemv_kernels
        model = _float_gemma(torch.float32)
        assert "gemmakit" not in prepare_weights(model, None, False)
        assert not any(isinstance(m, gemv.GemvLinear) for m in model.modules())
        fp32 = Engine(model, max_batch=1, context=64)
        assert fp32.runtime.screen is None or not fp32.runtime.screen.gemv_kernel
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
        assert "disagree" in engine.plan.describe()
    finally:
        monkeypatch.setattr(gemv, "int8", right)
        gemv.unavailable.cache_clear()
    assert gemv.unavailable() is None


@pytest.mark.parametrize("wide", WIDE, ids=lambda w: "avx512" if w else "avx2")
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n, k", [(8, 16), (7, 13), (61, 2048), (1030, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_kernel_is_the_fp32_product(n, k, dtype, rows, wide):
    """fp32 and bf16 weights read in place: the fp32 product over the row and K tails; bf16 activations give a
    bf16 out, the fp32 sum rounded once."""
    g = torch.Generator().manual_seed(n + k)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(rows, k, generator=g)
    want = x @ w.float().T
    got = gemv.floats(x, w, wide)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    xb = x.bfloat16()
    got16, want16 = gemv.floats(xb, w, wide), xb.float() @ w.float().T
    assert got16.dtype == torch.bfloat16
    one_step = torch.ldexp(torch.ones_like(want16), torch.frexp(want16).exponent - 8)  # a bf16 step at each value
    assert ((got16.float() - want16).abs() <= one_step + 1e-6 * want16.abs().max()).all()


def test_kernels_take_zero_rows():
    """An empty batch (zero rows of x) gives an empty product, and writes nothing outside it."""
    w = torch.randn(24, 16)
    q, s = quantize_int8(w)
    for out in (gemv.floats(torch.randn(0, 16), w), gemv.floats(torch.randn(0, 16).bfloat16(), w.bfloat16()),
                gemv.int8(torch.randn(0, 16), q, s), gemv.screen_int8(torch.randn(0, 16), q, s.float())[0],
                gemv.int8_grid(torch.randn(0, 16), q, s)):
        assert out.shape == (0, 24)


def test_float_kernel_refuses_operands_it_cannot_read():
    for x, w in [(torch.randn(1, 12), torch.randn(8, 16)),  # K mismatch
                 (torch.randn(1, 16), torch.randn(8, 16).half()),  # not fp32 / bf16
                 (torch.randn(1, 16), torch.randn(16, 8).T)]:  # not contiguous
        with pytest.raises(RuntimeError, match="w: contiguous fp32 or bf16"):
            gemv.floats(x, w)


def test_gemv_linears_send_decode_rows_there_and_keep_prompts_names_and_gradients(monkeypatch):
    torch.manual_seed(0)
    model = Gemma(tiny("gemma3")).eval()
    names = set(model.state_dict())
    assert gemv.gemv_linears(model) == 7 * model.config.num_hidden_layers + 1  # and the tied head
    assert set(model.state_dict()) == names  # checkpoint names kept; the tied table is not saved twice
    linear = model.model.layers[0].mlp.gate_proj
    assert isinstance(linear, gemv.GemvLinear) and isinstance(model.lm_head, gemv.GemvLinear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    calls, floats = [], gemv.floats
    monkeypatch.setattr(gemv, "floats", lambda x, w: calls.append(tuple(x.shape)) or floats(x, w))
    x = torch.randn(8, 1, 64)
    with torch.no_grad():
        got = linear(x)
        linear(torch.randn(1, 9, 64))  # a 9-token prompt: torch's product
    assert calls == [(8, 64)]
    assert torch.allclose(got, torch.nn.functional.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
    linear(torch.randn(2, 64)).sum().backward()  # training: torch's product, with gradients
    assert linear.weight.grad is not None and calls == [(8, 64)]


def _float_gemma(dtype: torch.dtype) -> Gemma:
    torch.manual_seed(0)
    return Gemma(tiny("gemma3").replace(vocab_size=1024, intermediate_size=128)).eval().to(dtype)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fp32_engines_decode_and_screen_on_the_kernels_with_the_models_tokens(compile):
    """The loaded layout (prepare_weights) gives fp32 linears the kernel; the plan screens greedy steps through
    an int8 copy of the head on the int8 kernel (one-row steps an int4 copy, where its pass timed faster); one
    row and two decode the plain model's tokens."""
    from gemmakit.runtime.compiled import compile_supported
    from gemmakit.runtime.plan import prepare_weights

    if compile and not compile_supported("cpu"):
        pytest.skip("torch.compile needs a C++ compiler")
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=8)
    want = [greedy_without_cache(_float_gemma(torch.float32), p, 8) for p in prompts]
    model = _float_gemma(torch.float32)
    assert "gemmakit's AVX2 kernel" in prepare_weights(model, None, compile)
    engine = Engine(model, max_batch=2, context=64, compile=compile)
    line = engine.plan.describe()
    assert "decode products: gemmakit's AVX2 kernels" in line
    assert engine.runtime.screen.gemv_kernel and ("head screen: int8 copy (gemmakit's AVX2 kernel" in line or
                                                  "head screen: int4 copy for one-row steps, int8 copy" in line)
    assert engine.memory["head_screen"] == engine.runtime.screen.nbytes
    assert [r.tokens for r in engine.generate(prompts, params)] == want
    assert [engine.generate([p], params)[0].tokens for p in prompts] == want


# Compiled once, in fp32: what compiling changes (the graph around the pass) is the same in either dtype, and the
# bf16 certificate is the eager bf16 case's. Each compiled case builds two compiled engines, the suite's slowest.
@pytest.mark.parametrize("dtype,compile", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32-eager", "bf16-eager", "fp32-compiled"])
def test_int8_heads_are_screened_through_their_own_codes(dtype, compile, monkeypatch):
    """An int8 model's greedy steps screen its head's own codes (no copy: the forecast holds only the norms and
    fp32 scales) and pick the tokens of the same engine with the screen off, one row and two at once: where the
    screen's pass has its AVX-512 build, always; with the AVX2 pass, which may only tie the int8 kernel, where
    the plan timed it faster (here made so; tests/test_screen.py has it slower)."""
    from gemmakit.runtime.compiled import compile_supported
    from gemmakit.runtime.screen import Int8Head

    if compile and not compile_supported("cpu"):
        pytest.skip("torch.compile needs a C++ compiler")
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=8)
    model = quantize_model(_float_gemma(dtype), "int8")
    monkeypatch.setattr(Int8Head, "timings", lambda self, rows: (2.0, 1.0))  # taken only by the AVX2 pass
    engine = Engine(model, max_batch=2, context=64, compile=compile)
    plain = Engine(model, max_batch=2, context=64, compile=compile, screen=False)
    want = [r.tokens for r in plain.generate(prompts, params)]
    said = ("for steps of 1-8 rows (gemmakit's AVX2 kernel, timed here as screen vs head: 1 row 1000.0 vs 2000.0 ms"
            if gemv.vector_width() < 512 else "(gemmakit's AVX2 kernel")
    assert f"head screen: the int8 head's own codes {said}" in engine.plan.describe()
    screen = engine.runtime.screen
    assert screen.cheap.data_ptr() == model.lm_head.weight.data_ptr()  # read in place, not copied
    # The layers' decode rows on the screen's grid; the head keeps fp32 x, the product its picks are certified on.
    assert not model.lm_head.x_grid and model.model.layers[0].mlp.up_proj.x_grid
    vocab = model.config.vocab_size
    fp32_scales_copy = model.lm_head.scales.dtype != torch.float32
    assert engine.memory["head_screen"] == screen.nbytes == vocab * 4 * (2 + fp32_scales_copy)
    passes, screen_int8 = [], gemv.screen_int8
    monkeypatch.setattr(gemv, "screen_int8", lambda x, *a: passes.append(x.shape[0]) or screen_int8(x, *a))
    assert [r.tokens for r in engine.generate(prompts, params)] == want
    assert [engine.generate([p], params)[0].tokens for p in prompts] == want
    assert 2 in passes and 1 in passes and screen.fallbacks < len(passes)


def test_bf16_engines_send_decode_rows_past_fbgemm(monkeypatch):
    """A bf16 model's fbgemm linears (prompts) send decode rows to the kernel, which reads the bf16 weight in
    place: a step's logits are the plain model's to bf16 rounding (the kernel's own exactness: above)."""
    from gemmakit.runtime.packing import HalfLinear
    from gemmakit.runtime.plan import prepare_weights
    from gemmakit.runtime.probe import fbgemm_fp16, onednn_packs

    if onednn_packs(torch.bfloat16) or not fbgemm_fp16():
        pytest.skip("the plan takes fbgemm's fp16 products where oneDNN packs no bf16, on x86 torch builds")
    plain, model = _float_gemma(torch.bfloat16), _float_gemma(torch.bfloat16)
    prepare_weights(model, None, False)
    engine = Engine(model, max_batch=2, context=64)
    halves = [m for m in model.modules() if isinstance(m, HalfLinear)]
    assert halves and all(m.gemv_rows == gemv.FLOAT_ROWS for m in halves)
    calls, floats = [], gemv.floats
    monkeypatch.setattr(gemv, "floats", lambda x, w: calls.append(x.shape[0]) or floats(x, w))
    prompt = [2, 5, 9, 14, 3, 8, 1, 6, 2, 11]
    with torch.inference_mode():  # as the engine runs
        engine.runtime.prefill(prompt[:-1], 0, greedy=False)
        assert calls == [1]  # the 9-token prompt went to fbgemm, its last position's head product here
        got = engine.runtime.decode(prompt[-1:], [len(prompt) - 1], [0], greedy=False).logits
        assert calls == [1] * (1 + len(halves))  # every linear of the step, the head's too
        want = plain(torch.tensor([prompt]))[0, -1]
    # bf16 products rounded at each of the 8 layers by different kernels: a few bf16 steps apart at most
    assert (got.float()[0] - want.float()).abs().max() < 0.03 * want.float().abs().max()


def test_packed_bf16_engines_send_batch_rows_to_the_bf16_pair_tiles(monkeypatch):
    """Where the kernels' AVX512_BF16 tiles run, a oneDNN-packed bf16 model that keeps its plain weights sends a
    batch step's rows (2-8) there, reading the plain weight: logits are the plain model's to bf16 rounding.
    One-row products keep the plain layout's own path, prompts oneDNN's packed one."""
    from gemmakit.runtime.packing import PackedLinear, pack_linears

    if not gemv.bf16_pairs():
        pytest.skip("the AVX512_BF16 tiles run on CPUs with AVX-512 bf16 where ATen runs AVX-512")
    plain, model = _float_gemma(torch.bfloat16), _float_gemma(torch.bfloat16)
    pack_linears(model, keep_plain=True)
    engine = Engine(model, max_batch=2, context=64, screen=False)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.gemv_rows == gemv.FLOAT_ROWS for m in packed)
    assert "AVX512_BF16" in engine.plan.describe()
    calls, floats = [], gemv.floats
    monkeypatch.setattr(gemv, "floats", lambda x, w: calls.append(x.shape[0]) or floats(x, w))
    prompts = [[2, 5, 9, 14, 3, 8, 1, 6, 2, 11, 4, 7], [2, 7, 1, 6, 2, 11, 9, 9, 3, 5, 8, 1]]
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            engine.runtime.prefill(prompt[:-1], row, greedy=False)
        assert calls == []  # prompts (11 rows) took oneDNN's packed product, their last position the plain one
        got = engine.runtime.decode([p[-1] for p in prompts], [len(p) - 1 for p in prompts], [0, 1],
                                    greedy=False).logits
        assert calls == [2] * len(packed)  # every linear of the step, the head's too
        want = plain(torch.tensor(prompts))[:, -1]
    # bf16 products rounded at each layer by different kernels: a few bf16 steps apart at most
    assert (got.float() - want.float()).abs().max() < 0.03 * want.float().abs().max()


def grid_id(grid: tuple[int, int]) -> str:
    return f"{['avx2', 'avx512', 'amx'][grid[0]]}-{grid[1]}bit"


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9])
@pytest.mark.parametrize("k", [100, 640, 3000, 4096])
def test_screen_pass_sums_exactly_for_the_rounded_x_it_reports(k, rows, grid):
    """The screen's pass: x rounded to an integer grid (14 bits, coarser past K = 2064, so int32 sums cannot
    overflow even with an outlier 1000x the rest; or 8 bits, [-127, 127], for the byte pass), summed exactly:
    the float64 product of the x~ it reports, to fp32's last bits; |x - x~| and |x~| as reported. On every pass
    this CPU has: AMX takes 16 weight rows a block where K is a multiple of 64 and 2..8 rows of x (the rest go
    to the AVX-512 tiles), its x split in two signed bytes, with a negative outlier too; the AVX2 pass takes tiles
    up to 3 rows of x and one weight row at a time from 4, and blocks of 8 weight rows (folded as a tree) from
    6; the AVX-512 pass takes those blocks from 2 rows, two weight rows a step of 32 inputs (K = 100 and 3000
    leave a step of 32 and a tail past it); the byte pass the same blocks, 64 inputs a step less each row's
    product with the offset 128 (K = 100 and 3000 leave tails of 36 and 56); the row tail (301) takes the tiles,
    or on the byte pass one sum at a time."""
    isa, bits = grid
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(301, k, generator=g), torch.randn(rows, k, generator=g)  # 301: tails of 8, 3 and 16
    x[:, 7] = 1000.0  # every row's largest value sets its grid: the rest keep few bits
    x[:, 9] = -700.0
    q, s = quantize_int8(w, torch.float32)
    got, rounding, rounded_norm = gemv.screen_int8(x, q, s, isa, bits=bits)
    top = 127 if bits == 8 else min(8191, (2**31 - 1) // (127 * k))
    scale = x.abs().amax(dim=-1, keepdim=True) / top
    rounded = (x / scale).round() * scale
    want = rounded.double() @ (q.double() * s.double()[:, None]).T
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert torch.allclose(rounding[:, 0], (x - rounded).norm(dim=-1), rtol=1e-4)
    assert torch.allclose(rounded_norm[:, 0], rounded.norm(dim=-1), rtol=1e-6)


@pytest.mark.skipif(gemv.vector_width() != 512, reason="the byte pass needs AVX-512 VNNI")
def test_the_byte_pass_sums_the_codes_against_signed_bytes_exactly():
    """The byte pass's own sums, with no rounding in the way: x already on the grid's integers (every value
    from -127 to 127, the extremes included) against codes at -127 and 127, summed against torch's integer
    product; where the offset's share were not taken off, every sum would be 128 times its row's codes
    higher."""
    g = torch.Generator().manual_seed(3)
    for rows, n, k in ((8, 64, 640), (3, 19, 200), (2, 8, 64)):
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        q[0], q[1] = 127, -127
        xq = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=g)
        xq[0], xq[-1, : k // 2] = -127, 127
        ones, empty = torch.ones(rows), torch.empty(0)
        got = torch.ops.gemmakit_avx2.int8_screen(xq, ones, q, torch.ones(n), 1, empty, empty)
        assert torch.equal(got.double(), (xq.double() @ q.double().T))
    with pytest.raises(RuntimeError, match="byte pass"):
        torch.ops.gemmakit_avx2.int8_screen(xq, ones, q, torch.ones(n), 0, empty, empty)


def test_the_screen_takes_bytes_for_a_batch_only_on_the_vnni_pass():
    """The byte pass serves 4 rows and more on the AVX-512 VNNI pass alone: fewer rows and the AVX2 and AMX passes
    keep 14 bits; what this CPU runs follows from its pass."""
    assert [gemv.screen_bits(rows, 1) for rows in (1, 3, 4, 8)] == [14, 14, 8, 8]
    assert gemv.screen_bits(8, 0) == gemv.screen_bits(8, 2) == 14
    assert gemv.screen_bits(8) == (8 if gemv.vector_width() == 512 and not gemv.screen_amx() else 14)
    from gemmakit.runtime.plan import _screen_kernel  # the plan's line says which grid a batch takes

    assert ("x on 8 bits from 4 rows" in _screen_kernel(8)) == (gemv.screen_bits(8) == 8)
    assert "x on 8 bits" not in _screen_kernel(1)
    with pytest.raises(ValueError, match="8 or 14 bits"):
        gemv.screen_int8(torch.randn(2, 16), *quantize_int8(torch.randn(4, 16), torch.float32), bits=4)


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_the_pass_adds_the_screens_bound_as_it_writes(rows, grid):
    """With the screen's norms, the pass returns its upper bounds: the sums plus |x| |w - b| + (|x - x~| +
    gamma |x~|) |b|, times (1 + 2 gamma), as the screen wrote them in torch ops before (to fp32 rounding) on
    every pass and grid, the AMX blocks and the row tails (301 rows) included."""
    isa, bits = grid
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(301, 640, generator=g), torch.randn(rows, 640, generator=g)
    q, s = quantize_int8(w, torch.float32)
    norms, gamma = torch.rand(2, 301, generator=g), 4e-5
    x_norm = x.norm(dim=-1, keepdim=True)
    got = gemv.screen_int8(x, q, s, isa, (x_norm, norms, gamma), bits)[0]
    sums, rounding, rounded_norm = gemv.screen_int8(x, q, s, isa, bits=bits)
    want = sums + (x_norm * norms[0] + (rounding + gamma * rounded_norm) * norms[1]) * (1 + 2 * gamma)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert (got - sums).min() > 0  # the bound is there in every row and column


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int4_heads_of_batch_engines_are_screened_through_an_int8_copy(dtype, monkeypatch):
    """Where the screen's pass runs on AMX, a batch engine of an int4 model screens steps of several rows
    through an int8 copy of the head (counted in the forecast) and picks the tokens of the same engine with
    the screen off; one-row steps and one-row engines read the int4 head itself."""
    if not gemv.screen_amx():
        pytest.skip("the int4 head's copy is taken where the screen's pass runs on AMX tiles")
    prompts, params = [[2, 5, 9, 14], [2, 7], [3, 3, 8]], SamplingParams(max_tokens=8)
    model = quantize_model(_float_gemma(dtype), "int4")
    plain = Engine(model, max_batch=3, context=64, screen=False)
    want = [r.tokens for r in plain.generate(prompts, params)]
    assert "head screen: int8 copy" not in Engine(model, max_batch=1, context=64).plan.describe()
    engine = Engine(model, max_batch=3, context=64)
    assert "head screen: int8 copy of the int4 head" in engine.plan.describe()
    screen = engine.runtime.screen
    vocab, width = model.config.vocab_size, model.config.hidden_size
    assert engine.memory["head_screen"] == screen.nbytes == vocab * width + 3 * vocab * 4
    passes, screen_int8 = [], gemv.screen_int8
    monkeypatch.setattr(gemv, "screen_int8", lambda x, *a: passes.append(x.shape[0]) or screen_int8(x, *a))
    assert [r.tokens for r in engine.generate(prompts, params)] == want
    assert [engine.generate([p], params)[0].tokens for p in prompts] == want
    assert passes and 1 not in passes and screen.fallbacks < len(passes)


def test_a_build_killed_midway_does_not_hang_the_next_process(tmp_path):
    """torch's builder leaves its `lock` file behind when the builder is killed, and every later process waited
    on it for ever. Here a fresh cache holds this machine's build plus such a file: a new process must still get
    the kernels, and take the file away."""
    where = tmp_path / gemv.build_dir().relative_to(gemv.build_dir().parents[1])
    shutil.copytree(gemv.build_dir(), where, ignore=shutil.ignore_patterns("*lock"))
    (where / "lock").touch()
    probe = "from gemmakit.runtime import gemv; print('unavailable:', gemv.unavailable())"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240,
                              env={**os.environ, "GEMMAKIT_CACHE_DIR": str(tmp_path)})
    except subprocess.TimeoutExpired:
        pytest.fail("a process waited on the lock file of a build that no longer runs")
    assert done.returncode == 0, done.stderr
    assert "unavailable: None" in done.stdout and "left by a kernel build that did not finish" in done.stderr
    assert not (where / "lock").exists()
