"""The head screen (screen.py): its bounds hold, a certified pick is the full head's argmax, and an engine
that screens decodes the tokens of one that computes the full head, in float32 and bf16.
Run: .venv/bin/python -m pytest tests/test_screen.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.runtime import gemv
from gemmakit.runtime.compiled import compile_supported
from gemmakit.runtime.packing import pack_linears
from gemmakit.runtime.probe import fbgemm_fp16, onednn_packs, wide_vectors
from gemmakit.runtime.screen import (
    CANDIDATES,
    QUARTER_GROUP,
    HeadScreen,
    quarter_timings,
    screen_bytes,
    stand_in_codes,
    top_k,
)
from gemmakit.sampling import SamplingParams
from tests.helpers import WINDOW, hf_model, tiny

needs_compiler = pytest.mark.skipif(not compile_supported("cpu"), reason="torch.compile needs a C++ compiler")
# The packed copy of a float32 head is bf16 in oneDNN's layout; eager engines' screens read only that one.
needs_bf16_packing = pytest.mark.skipif(
    not onednn_packs(torch.bfloat16),
    reason="oneDNN cannot pack bf16 here (AVX2): no packed screen; the plan computes the full head "
           "(tests/test_runtime_probe.py checks that choice)")


# Where oneDNN packs no bf16 (AVX2) an x86 torch screens through fbgemm's fp16 copy instead, at every step.
needs_any_screen = pytest.mark.skipif(
    not (onednn_packs(torch.bfloat16) or fbgemm_fp16()),
    reason="neither a packed bf16 copy nor fbgemm's fp16 one: eager engines compute the full head")
needs_fbgemm = pytest.mark.skipif(not fbgemm_fp16(), reason="fbgemm's fp16 product is in x86 builds of torch only")
needs_gemv = pytest.mark.skipif(gemv.unavailable() is not None, reason=f"gemv kernels: {gemv.unavailable()}")


# The int4 copy of a float head is read by gemmakit's int4 kernel, which takes torch's AVX2 packing only.
needs_quarter = pytest.mark.skipif(gemv.unavailable() is not None or not gemv.int4_fits(1024, 64, QUARTER_GROUP),
                                   reason="gemmakit's int4 kernel, or torch's AVX2 int4 packing, is not here")


def screen_for(w: torch.Tensor, path: str) -> HeadScreen:
    """The screen of one path; the kernel's int8 copy (or, for one-row steps, int4 copy) with the default list's
    16 candidates, so a crowd of near-copies still outnumbers them."""
    if path in ("gemv", "quarter"):
        return HeadScreen(w, gemv_kernel=True, candidates=CANDIDATES, quarter=path == "quarter",
                          rows=(1, 1) if path == "quarter" else None)
    return HeadScreen(w, packed=path == "packed", half=path == "fp16")


def near_tied_head(vocab: int = 72 * 1024, width: int = 64, crowd: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 table whose rows include pairs a bf16 copy cannot tell apart and, for the first 8 states,
    a crowd of `crowd` near-copies of the best row (more than the screen's candidates), plus 64 states."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(vocab, width, generator=g)
    w[1::2][:200] = w[0::2][:200] + 1e-4 * torch.randn(200, width, generator=g)  # pairs within bf16 rounding
    x = 4 * torch.randn(64, width, generator=g)
    best = (x[:8].double() @ w.double().T).argmax(-1)
    for r, b in enumerate(best.tolist()):  # rows 3000+: near-copies of state r's best token
        block = slice(3000 + r * crowd, 3000 + (r + 1) * crowd)
        w[block] = w[b] + 1e-5 * torch.randn(crowd, width, generator=g)
    return w, x


@pytest.mark.parametrize("path", [pytest.param("packed", marks=needs_bf16_packing),
                                  pytest.param("compiled", marks=needs_compiler),
                                  pytest.param("fp16", marks=needs_fbgemm),
                                  pytest.param("gemv", marks=needs_gemv)])
def test_bounds_hold_and_a_certified_pick_is_the_exact_argmax(path):
    """Upper bounds are never below the float64 logit, every certified pick is the float64 argmax (up to
    float32 rounding of the top two), and a crowd of near-copies larger than the candidate list is reported
    as uncertified rather than guessed."""
    w, x = near_tied_head()
    screen = screen_for(w, path)
    exact = x.double() @ w.double().T
    if path in ("packed", "fp16", "gemv"):
        upper = screen._screen(x, x.norm(dim=-1, keepdim=True), "packed")
        assert (upper.double() >= exact - 1e-9).all()
        tokens, certified, upper, floor = screen(x)
    else:
        step = torch.compile(screen, dynamic=False)  # one-row steps: the compiled pass over the bf16 copy
        tokens, certified, upper, floor = (torch.cat(t) for t in zip(*(step(row[None], "plain") for row in x),
                                                                      strict=True))
    assert not certified[:8].all() and certified[8:].float().mean() > 0.9
    # An uncertified row settles from its bounds: the crowd is rescored exactly, and the pick is the argmax.
    for r in (~certified).nonzero()[:, 0].tolist():
        tokens[r] = screen.settle(x[r], upper[r], floor[r])
    assert screen.settled == int((~certified).sum()) > 0
    picked = exact.gather(1, tokens[:, None].long())[:, 0]
    gap = exact.max(dim=-1).values - picked
    assert (gap <= 1e-5 * exact.abs().max(dim=-1).values).all()


@needs_quarter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int4_copy_bounds_every_logit_and_each_row_settles_to_the_argmax(dtype):
    """One-row steps over a float head's int4 copy: upper bounds never below the float64 logits, a crowd of
    near-copies larger than the candidates left uncertified rather than guessed, and every row's pick, certified
    or settled, the argmax (for a bf16 head, of the logits rounded to bf16, lowest id first). A screen for
    one-row steps keeps no int8 copy, and holds what `screen_bytes` forecasts. Compiled (as the engine's one-row
    steps run it), a step's bounds hold as well and it picks as the eager step does."""
    w, x = near_tied_head()
    w = w.to(dtype)
    screen = screen_for(w, "quarter")
    assert screen.cheap is None and screen.nbytes == screen_bytes(w, False, False, False, True, (1, 1), None, True)
    exact = x.double() @ w.double().T
    want = (exact.float().to(torch.bfloat16) if dtype == torch.bfloat16 else exact).argmax(-1)
    for r, row in enumerate(x):
        tokens, certified, upper, floor = screen(row[None])
        assert (upper[0].double() >= exact[r] - 1e-9).all()
        assert r >= 8 or not bool(certified[0])  # the crowd outnumbers the candidates
        pick = int(tokens[0]) if bool(certified[0]) else screen.settle(row, upper[0], floor[0])
        if pick != int(want[r]):  # only within float32 summation of a tie
            assert exact[r, want[r]] - exact[r, pick] <= 1e-5 * exact[r].abs().max(), (r, pick, int(want[r]))
    assert screen.settled >= 8 and screen.fallbacks == 0
    if compile_supported("cpu"):
        step = torch.compile(screen, dynamic=False)
        for r in range(6, 10):
            got, eager = step(x[r:r + 1]), screen(x[r:r + 1])
            assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
            assert (got[2][0].double() >= exact[r] - 1e-9).all()  # inductor's own sums of the bound still hold


def hidden_winner(width: int = 64, crowd: int = 24) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A head whose true best token looks worse than a crowd of others through bf16: its row is a bf16-exact
    row `a` plus less than half a bf16 step per value (so its bf16 copy is `a`) in the direction of x, while
    each of `crowd` rows is `a` with one value moved a full step (exact in bf16). Returns (table, x, best)."""
    g = torch.Generator().manual_seed(6)
    w = 0.1 * torch.randn(72 * 1024, width, generator=g)
    x = torch.randn(1, width, generator=g)
    a = (3 * x[0] / x.norm()).to(torch.bfloat16).float()
    step = 2.0 ** (torch.frexp(a).exponent - 8).float()  # one bf16 step at each value of a
    w[2000] = a + 0.4 * step * x[0].sign()
    for j in range(crowd):
        w[2001 + j] = a
        w[2001 + j, j] += step[j] * x[0, j].sign()
    assert (w[2000:2001 + crowd].to(torch.bfloat16).float()[0] == a).all()
    logits = x.double() @ w.double().T
    assert int(logits.argmax()) == 2000
    return w, x, 2000


@pytest.mark.parametrize("path", [pytest.param("packed", marks=needs_bf16_packing),
                                  pytest.param("compiled", marks=needs_compiler),
                                  pytest.param("fp16", marks=needs_fbgemm),
                                  pytest.param("gemv", marks=needs_gemv),
                                  pytest.param("quarter", marks=needs_quarter)])
def test_a_winner_that_bf16_hides_behind_more_than_k_others_is_found(path):
    """Without the error bound the crowd fills the candidates and one of them is certified (measured: token
    2010 on the compiled path). The packed path rounds x and its sums to bf16 too, and the kernel's int8 copy
    is coarser still, so their bounds cover the whole crowd: they must then decline to certify rather than
    guess."""
    w, x, best = hidden_winner()
    screen = screen_for(w, path)
    pick = screen if path != "compiled" else torch.compile(screen, dynamic=False)
    tokens, certified, upper, floor = pick(x, "packed" if path != "compiled" else "plain")
    if path in ("compiled", "fp16"):  # fp16 has three more mantissa bits than bf16: it sees the winner
        assert int(tokens[0]) == best and bool(certified[0])
    else:
        assert int(tokens[0]) == best or not bool(certified[0])
        assert bool(certified[0]) or screen.settle(x[0], upper[0], floor[0]) == best


@needs_compiler
def test_a_bf16_head_screens_in_int8_and_breaks_ties_as_argmax_does():
    """Two identical best rows tie exactly in bf16, and a third is better in float32 but rounds to the same
    bf16 logit: the pick is the lowest id, as the full head's argmax over bf16 logits (inductor dropped the
    rounding, which picked 1200); the int8 copy's bound covers the table (upper bounds never below the
    logits)."""
    g = torch.Generator().manual_seed(7)
    w = (0.1 * torch.randn(72 * 1024, 64, generator=g)).to(torch.bfloat16)
    x = torch.randn(1, 64, generator=g)
    w[900] = w[300] = (3 * x[0] / x.norm()).to(torch.bfloat16)
    j = int(x[0].abs().argmin())  # one bf16 step up in the direction of x, where x is smallest
    w[1200] = w[300]
    w[1200, j] = w[300, j] + 2.0 ** (int(torch.frexp(w[300, j].float()).exponent) - 8) * x[0, j].sign()
    full = x.float() @ w.float().T
    assert full[0, 1200] > full[0, 300] and full[0, 1200].to(torch.bfloat16) == full[0, 300].to(torch.bfloat16)
    assert int(full.to(torch.bfloat16).argmax()) == 300
    screen = HeadScreen(w)
    assert screen.cheap.dtype == torch.int8 and screen.packed is None and not screen.usable(2, compiled=True)
    tokens, certified, *_ = torch.compile(screen, dynamic=False)(x, "plain")
    assert int(tokens[0]) == 300 and bool(certified[0])
    logits = x.double() @ w.double().T
    upper = torch.compile(screen._screen, dynamic=False)(x, x.norm(dim=-1, keepdim=True), "plain")  # one row
    assert (upper.double() >= logits - 1e-9).all()


def test_block_top_k_is_torchs_top_k():
    """Wide rows take the block-maxima route, narrow ones torch's: the same values and indices either way."""
    x = torch.randn(3, 80 * 1024, generator=torch.Generator().manual_seed(5))
    x[1, 5000:5040] += 10  # the top values crowded into few blocks
    x[2, ::1024] += 10  # one in every block
    for width in (x.shape[1], 4096):
        for k in (17, 65):  # 65: the AVX2 screen's candidates and one, in smaller blocks
            values, indices = top_k(x[:, :width], k)
            want = x[:, :width].topk(k)
            assert torch.equal(values, want.values) and torch.equal(indices, want.indices)


def greedy_engines(tmp_path, **kw):
    hf_model(tiny("gemma3")).save_pretrained(tmp_path)
    model = pack_linears(load_model(tmp_path), keep_plain=kw.get("compile", False))
    return Engine(model, max_batch=4, context=128, **kw), Engine(model, max_batch=4, context=128, screen=False, **kw)


def prompts_and_params(n: int = 3) -> tuple[list[list[int]], list[SamplingParams]]:
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1000, (k,), generator=g).tolist() for k in (5, WINDOW + 3, 2)[:n]]
    return prompts, [SamplingParams(max_tokens=k) for k in (2 * WINDOW, WINDOW, 3 * WINDOW)[:n]]


def spy(screen: HeadScreen, certify: bool = True, settle: bool = False) -> list[int]:
    """Count the screen's calls; with certify=False it returns wrong tokens, uncertified, with a floor no bound
    reaches (so no row settles), or with `settle` its own floor (so each row settles from its bounds)."""
    calls, forward = [], screen.forward

    def counted(x, layout="packed"):
        calls.append(x.shape[0])
        tokens, certified, upper, floor = forward(x, layout)
        if certify:
            return tokens, certified, upper, floor
        return tokens * 0 + 7, certified & False, upper, floor + (0 if settle else float("inf"))
    screen.forward = counted
    return calls


@needs_any_screen
def test_greedy_rows_take_the_screen_and_decode_the_full_heads_tokens(tmp_path):
    """Greedy batches of rows at different positions: the screened engine's tokens are the full head's; a
    step with a row that needs logits (logprobs here) computes the full head for all its rows."""
    screened, full = greedy_engines(tmp_path)
    assert screened.runtime.screen is not None and full.runtime.screen is None
    calls = spy(screened.runtime.screen)
    prompts, params = prompts_and_params()
    want = [r.tokens for r in full.generate(prompts, params)]
    assert [r.tokens for r in screened.generate(prompts, params)] == want
    assert len(calls) > 2 * WINDOW and 3 in calls  # prompts and every step (3 rows, then 2, then 1)
    calls.clear()
    mixed = params[:2] + [SamplingParams(max_tokens=3 * WINDOW, logprobs=0)]
    assert [r.tokens for r in screened.generate(prompts, mixed)] == want
    assert calls == [1, 1]  # the greedy prompts' first tokens; every decode step holds the logprobs row


@needs_any_screen
def test_an_uncertified_step_falls_back_to_the_full_head(tmp_path):
    screened, full = greedy_engines(tmp_path)
    calls = spy(screened.runtime.screen, certify=False)
    prompts, params = prompts_and_params()
    assert [r.tokens for r in screened.generate(prompts, params)] == [r.tokens for r in full.generate(prompts, params)]
    assert calls and screened.runtime.screen.fallbacks == len(calls)


@needs_any_screen
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compiler)], ids=["eager", "compiled"])
def test_uncertified_rows_settle_from_their_bounds_without_the_full_head(tmp_path, compile):
    """Every row left uncertified (forced here) rescores the tokens whose bounds reach its floor: the tokens are
    still the full head's, and no step computes the full head; compiled, a partly filled batch's steps (3, 2,
    then 1 of 4 rows) keep every slot's bounds and each row reads its own."""
    screened, full = greedy_engines(tmp_path, compile=compile)
    calls = spy(screened.runtime.screen, certify=False, settle=True)
    prompts, params = prompts_and_params()
    assert [r.tokens for r in screened.generate(prompts, params)] == [r.tokens for r in full.generate(prompts, params)]
    settled = screened.runtime.screen.settled  # compiled graphs call `forward` only while tracing
    assert screened.runtime.screen.fallbacks == 0 and settled > 0 and (compile or settled == sum(calls))


@needs_compiler
def test_compiled_screened_steps_decode_the_eager_full_heads_tokens(tmp_path):
    """One-row steps (the compiled pass over the plain bf16 copy) and padded full-batch steps (the packed
    copy inside the compiled graph) give the tokens of the eager engine without a screen."""
    screened, _ = greedy_engines(tmp_path, compile=True)
    full = Engine(screened.model, max_batch=4, context=128, screen=False)
    calls = spy(screened.runtime.screen)
    prompts, params = prompts_and_params()
    assert [r.tokens for r in screened.generate(prompts, params)] == [r.tokens for r in full.generate(prompts, params)]
    assert screened.runtime.screen.fallbacks == 0 and calls  # the compiled graph calls `forward` while tracing


@needs_compiler
@pytest.mark.skipif(not wide_vectors(), reason="the plan screens bf16 heads only with AVX-512 code "
                    "(tests/test_runtime_probe.py checks that choice)")
def test_compiled_bf16_engines_screen_one_row_steps_only(tmp_path, monkeypatch):
    """A bf16 model: one-row compiled steps take the int8 screen and decode the full head's tokens; a full
    batch's steps take the full head; a soft-capped bf16 head (Gemma 4) gets no screen. (Where gemmakit's AVX2
    kernels build they screen every step of up to 8 rows instead, tests/test_gemv.py: held off here.)"""
    from gemmakit.runtime import plan as plan_module

    monkeypatch.setattr(plan_module, "_gemv_choice", lambda: (False, "torch's kernels (GEMMAKIT_GEMV=off)"))
    hf_model(tiny("gemma3")).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    screened = Engine(model, max_batch=2, context=128, compile=True)
    assert screened.runtime.screen is not None and screened.memory["head_screen"] == screened.runtime.screen.nbytes
    steps, greedy_step = [], screened.runtime._greedy_step

    def counted(ids, *args):
        steps.append(ids.shape[0])
        return greedy_step(ids, *args)
    screened.runtime._greedy_step = counted
    full = Engine(model, max_batch=2, context=128, compile=True, screen=False)
    prompts, params = prompts_and_params(2)
    for p, sp in zip(prompts, params, strict=True):
        same_until_a_bf16_tie(model, p, screened.generate([p], sp)[0].tokens, full.generate([p], sp)[0].tokens)
    assert len(steps) == sum(sp.max_tokens - 1 for sp in params) and set(steps) == {1}
    assert screened.runtime.screen.fallbacks == 0
    steps.clear()
    screened.generate(prompts, params)  # together for WINDOW - 1 steps, then the longer one alone
    assert steps == [1] * WINDOW
    hf_model(tiny("e2b")).save_pretrained(tmp_path / "e2b")
    assert Engine(load_model(tmp_path / "e2b", dtype=torch.bfloat16), max_batch=1, context=64,
                  compile=True).runtime.screen is None


def same_until_a_bf16_tie(model, prompt: list[int], got: list[int], want: list[int]) -> None:
    """Equal tokens, or equal until two whose bf16 logits tie after the common prefix. Compiled bf16 steps
    keep some intermediates in float32 (measured here: the full head's compiled step parted from eager
    decoding at two logits that both round to 2.21875, while the screened step kept eager's token)."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + got[:i]]))[0, -1].float()
            step = 2.0 ** (torch.frexp(logits[a]).exponent - 8)
            assert abs(logits[a] - logits[b]) <= step, (i, a, b, logits[a], logits[b])
            return


@needs_bf16_packing
def test_the_screen_is_in_the_memory_forecast_and_only_where_it_applies(tmp_path, monkeypatch):
    from gemmakit.runtime import plan as plan_module

    screened, full = greedy_engines(tmp_path)
    assert screened.memory["head_screen"] == screened.runtime.screen.nbytes > 0
    assert "head_screen" not in full.memory
    assert screened.memory["total"] - full.memory["total"] == screened.runtime.screen.nbytes
    bf16 = Engine(load_model(tmp_path, dtype=torch.bfloat16), max_batch=2, context=64)
    unpacked = Engine(load_model(tmp_path), max_batch=2, context=64)
    if plan_module._gemv_choice()[0]:  # gemmakit's AVX2 kernel reads an int8 copy at every step, in any layout
        for engine in (bf16, unpacked):
            assert engine.runtime.screen.gemv_kernel and engine.memory["head_screen"] == engine.runtime.screen.nbytes
    else:  # eager bf16: torch's int8 kernel does not pay; eager and unpacked fp32: no bf16 copy could
        assert bf16.runtime.screen is None and "head_screen" not in bf16.memory
        assert unpacked.runtime.screen is None
    monkeypatch.setenv("GEMMAKIT_SCREEN", "off")  # engines the CLI and the server build
    assert Engine(screened.model, max_batch=2, context=64).runtime.screen is None
    monkeypatch.setenv("GEMMAKIT_SCREEN", "maybe")
    with pytest.raises(ValueError, match="GEMMAKIT_SCREEN must be on or off"):
        Engine(screened.model, max_batch=2, context=64)


@needs_quarter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_steps_read_an_int4_copy_where_its_pass_timed_faster(tmp_path, monkeypatch, dtype):
    """The plan times the int4 copy's pass against the int8 copy's (the machine decides; here the timing is set
    both ways): where it won, one-row greedy steps read the int4 copy and decode the full head's tokens, steps
    of several rows read the int8 copy, and a one-row engine keeps no int8 copy; the forecast counts what it
    keeps. Where it lost, the screen is the int8 copy alone."""
    from gemmakit.runtime import plan as plan_module

    hf_model(dataclasses.replace(tiny("gemma3"), vocab_size=1024)).save_pretrained(tmp_path)  # 1000: not packable
    model = load_model(tmp_path, dtype=dtype)
    prompts, params = prompts_and_params()
    monkeypatch.setattr(plan_module, "quarter_timings", lambda head: (1.0, 0.5))
    for batch in (1, 4):
        screened = Engine(model, max_batch=batch, context=128)
        screen = screened.runtime.screen
        assert screen.quarter_codes is not None and (screen.cheap is None) == (batch == 1)
        assert screened.plan.why["head screen"].startswith("int4 copy for one-row steps")
        assert screened.memory["head_screen"] == screen.nbytes
        calls = spy(screen)
        full = Engine(model, max_batch=batch, context=128, screen=False)
        assert [r.tokens for r in screened.generate(prompts, params)] == \
            [r.tokens for r in full.generate(prompts, params)]
        assert screen.fallbacks == 0 and 1 in calls and (batch == 1 or 3 in calls)
    monkeypatch.setattr(plan_module, "quarter_timings", lambda head: (1.0, 1.0))
    screen = Engine(model, max_batch=1, context=128).runtime.screen
    assert screen.quarter_codes is None and screen.cheap is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_timing_the_int4_copy_reads_the_heads_own_bytes(dtype):
    """The start-up timing of the int4 copy against the int8 one reads its codes from two disjoint spans of the
    float head's own bytes, so no engine's start-up holds copies of the head beside it (a contiguous head holds
    both); a head that is not one block gets codes of its own. The head is left as it was."""
    head = torch.randn(1024, 64).to(dtype)
    kept = head.clone()
    eight, four = stand_in_codes(head)
    assert eight.shape == (1024, 64) and eight.dtype == torch.int8
    assert four.shape == (1024, 32) and four.dtype == torch.uint8
    start, end = head.data_ptr(), head.data_ptr() + head.numel() * head.element_size()
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel()) for t in (eight, four))
    assert start <= spans[0][0] and spans[0][1] <= spans[1][0] and spans[1][1] <= end
    apart = stand_in_codes(head.t())  # a transposed view [64, 1024]: not one row-major block
    assert [t.shape for t in apart] == [(64, 1024), (64, 512)]
    assert all(not (start <= t.data_ptr() < end) for t in apart)
    if gemv.unavailable() is None and gemv.int4_fits(1024, 64, QUARTER_GROUP):
        timed = quarter_timings(head, repeats=1)
        assert all(math.isfinite(t) and t > 0 for t in timed)  # seconds, whatever this machine's speed
    assert torch.equal(head, kept)


@pytest.mark.slow
def test_the_real_model_decodes_the_same_greedy_tokens(default_model):
    """The 270M in float32, 4 prompts of 64 greedy tokens at once: screened tokens equal the full head's,
    with no fallback."""
    model = pack_linears(load_model(default_model))
    prompts = [[2, *range(1000 + 97 * i, 1000 + 97 * i + 12)] for i in range(4)]
    params = SamplingParams(max_tokens=64)
    screened = Engine(model, max_batch=4, context=128)
    if screened.runtime.screen is None:  # e.g. an AVX2-only CPU: the plan says why, and there is nothing to check
        pytest.skip(f"no head screen on this machine: {screened.plan.why['head screen']}")
    got = [r.tokens for r in screened.generate(prompts, params)]
    want = [r.tokens for r in Engine(model, max_batch=4, context=128, screen=False).generate(prompts, params)]
    assert got == want and screened.runtime.screen.fallbacks == 0


@needs_fbgemm
def test_without_bf16_packing_an_fp32_head_screens_through_fp16_at_every_step(tmp_path, monkeypatch):
    """Where oneDNN packs no bf16 (AVX2) the plan gives an fp32 head fbgemm's fp16 copy, which eager and batched
    steps read too; the forecast counts it, and the engine decodes the full head's tokens."""
    from gemmakit.runtime import plan as plan_module

    monkeypatch.setattr(plan_module, "onednn_packs", lambda dtype: dtype != torch.bfloat16)
    # Where gemmakit's AVX2 kernels build, they screen instead (tests/test_gemv.py): held off, as without a compiler.
    monkeypatch.setattr(plan_module, "_gemv_choice", lambda: (False, "torch's kernels (GEMMAKIT_GEMV=off)"))
    hf_model(tiny("gemma3")).save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path), max_batch=4, context=128)
    assert engine.runtime.screen.fp16 is not None
    assert "head screen: fp16 copy (fbgemm, every step)" in engine.plan.describe()
    assert engine.memory["head_screen"] == engine.runtime.screen.nbytes > 0
    calls = spy(engine.runtime.screen)
    prompts, params = prompts_and_params()
    full = Engine(engine.model, max_batch=4, context=128, screen=False)
    assert [r.tokens for r in engine.generate(prompts, params)] == [r.tokens for r in full.generate(prompts, params)]
    assert 3 in calls and engine.runtime.screen.fallbacks == 0


def _int4_model(dtype: torch.dtype, on_gemv: bool = True) -> torch.nn.Module:
    """A tiny tied Gemma 3 quantized to int4, its head in the layout gemmakit's AVX2 int4 kernel reads; with
    `on_gemv` False, in torch's AVX-512 packing instead, which keeps it on torch's kernel (each skips where
    this CPU's torch packs the other way)."""
    from gemmakit.model import Gemma
    from gemmakit.quantize import quantize_model

    torch.manual_seed(0)
    model = quantize_model(Gemma(tiny("gemma3").replace(vocab_size=1024, intermediate_size=128)).eval().to(dtype),
                           "int4")
    head = model.lm_head
    if gemv.unavailable():
        pytest.skip(f"gemmakit's kernels are off here: {gemv.unavailable()}")
    if gemv.int4_fits(head.out_features, head.in_features, head.group_size) != on_gemv:
        pytest.skip("the int4 head is on " + ("torch's kernel" if on_gemv else "gemmakit's AVX2 kernel") +
                    " here (torch's int4 packing for this CPU)")
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int4_heads_on_the_avx2_kernel_take_the_copy_at_the_step_sizes_it_was_timed_faster(dtype, monkeypatch):
    """Where the int4 head is on gemmakit's AVX2 int4 kernel, whether the int8 copy's pass beats it depends on
    the CPU, so the plan times both: the copy serves exactly the step sizes where it won (one row, a batch's,
    both or neither), with the tokens of the same engine with the screen off, and the forecast counts it."""
    from gemmakit.runtime.screen import Int4Head

    model = _int4_model(dtype)
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=8)
    want = [r.tokens for r in Engine(model, max_batch=2, context=64, screen=False).generate(prompts, params)]
    passes, screen_int8 = [], gemv.screen_int8
    monkeypatch.setattr(gemv, "screen_int8", lambda x, *a: passes.append(x.shape[0]) or screen_int8(x, *a))
    # (full head, copy) seconds at one row and at two; the copy wins where its number is lower.
    cases = {"both": ({1: (2.0, 1.0), 2: (2.0, 1.0)}, "steps of 1-8 rows", {1, 2}),
             "batch only": ({1: (1.0, 2.0), 2: (2.0, 1.0)}, "steps of 2-8 rows", {2}),
             "one row only": ({1: (2.0, 1.0), 2: (1.0, 2.0)}, "one-row steps", {1}),
             "neither": ({1: (1.0, 2.0), 2: (1.0, 2.0)}, None, set())}
    for timings, steps, screened in cases.values():
        monkeypatch.setattr(Int4Head, "timings", lambda self, rows, t=timings: t[rows])
        engine, passes[:] = Engine(model, max_batch=2, context=64), []
        line = engine.plan.describe()
        if steps is None:
            assert "head screen: off (an int4 head on gemmakit's AVX2 kernel: the copy's pass timed no faster, " \
                   "1 row 2000.0 vs 1000.0 ms, 2 rows 2000.0 vs 1000.0 ms)" in line
            assert engine.runtime.screen is None and "head_screen" not in engine.memory
        else:
            assert (f"head screen: int8 copy of the int4 head for {steps} (gemmakit's AVX2 kernel, timed here as "
                    "copy vs head: ") in line
            vocab, width = model.config.vocab_size, model.config.hidden_size
            assert engine.memory["head_screen"] == engine.runtime.screen.nbytes == vocab * width + 3 * vocab * 4
        assert [engine.generate([p], params)[0].tokens for p in prompts] == want  # one-row steps
        assert [r.tokens for r in engine.generate(prompts, params)] == want  # two-row steps, then one
        assert set(passes) == screened


def test_int4_head_timings_run_both_picks_on_the_real_kernels():
    """The plan's timing is real: both picks run on the head's own kernel and the pass (a stand-in copy of the
    head's shape), each a positive time; and an engine planned on it decodes the unscreened tokens."""
    from gemmakit.runtime.screen import int4_head

    model = _int4_model(torch.float32)
    full, copy = int4_head(model, torch.float32).timings(rows=2, repeats=3)
    assert 0 < full < 1 and 0 < copy < 1
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=6)
    engine = Engine(model, max_batch=2, context=64)
    assert "timed" in engine.plan.why["head screen"]
    want = [r.tokens for r in Engine(model, max_batch=2, context=64, screen=False).generate(prompts, params)]
    assert [r.tokens for r in engine.generate(prompts, params)] == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int4_heads_on_torchs_kernel_take_the_copy_at_batch_steps_only_where_timed_faster(dtype, monkeypatch):
    """Where torch packs the int4 head for AVX-512 (it stays on torch's kernel) and the pass has no AMX, the plan
    times the head against the copy's pass at the batch's rows only: one-row steps always read the int4 head.
    The copy serves steps of several rows where it won, nothing where it lost or tied, and the tokens are those
    of the same engine with the screen off."""
    from gemmakit.runtime.screen import Int4Head

    model = _int4_model(dtype, on_gemv=False)
    if gemv.screen_amx():
        pytest.skip("on AMX the copy is taken untimed (test_gemv.py)")
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=8)
    want = [r.tokens for r in Engine(model, max_batch=2, context=64, screen=False).generate(prompts, params)]
    assert "head screen: int8 copy" not in Engine(model, max_batch=1, context=64).plan.describe()
    passes, screen_int8 = [], gemv.screen_int8
    monkeypatch.setattr(gemv, "screen_int8", lambda x, *a: passes.append(x.shape[0]) or screen_int8(x, *a))
    timed = []
    for seconds, screened in (((2.0, 1.0), {2}), ((1.0, 0.97), set())):  # a win; a tie within the noise
        monkeypatch.setattr(Int4Head, "timings", lambda self, rows, t=seconds: timed.append(rows) or t)
        timed[:] = []
        engine, passes[:] = Engine(model, max_batch=2, context=64), []
        line = engine.plan.describe()
        if screened:
            assert "head screen: int8 copy of the int4 head for steps of 2-8 rows" in line
            assert "copy vs head: 2 rows 1000.0 vs 2000.0 ms" in line
        else:
            assert ("head screen: off (an int4 head on torch's kernel: the copy's pass timed no faster, "
                    "2 rows 970.0 vs 1000.0 ms)") in line and engine.runtime.screen is None
        assert timed == [2]  # one row was not timed
        assert [engine.generate([p], params)[0].tokens for p in prompts] == want  # one-row steps
        assert [r.tokens for r in engine.generate(prompts, params)] == want  # two-row steps, then one
        assert set(passes) == screened


def test_int4_head_timings_on_torchs_kernel_run_both_picks():
    """The timing behind that choice runs torch's int4 kernel on the head itself and the pass, each a positive
    time, with no copy left behind."""
    from gemmakit.runtime.screen import int4_head

    model = _int4_model(torch.float32, on_gemv=False)
    full, copy = int4_head(model, torch.float32).timings(rows=2, repeats=3)
    assert 0 < full < 1 and 0 < copy < 1


def test_with_the_avx2_pass_an_int8_head_is_screened_only_where_timed_faster(monkeypatch):
    """With the AVX2 pass, the plan times it against the int8 kernel on the head's own codes (no stand-in, no
    copy) and says the times; where the pass lost or tied at both sizes the engine keeps the head, and where it
    won at one row only, only one-row steps are screened (tests/test_gemv.py has it winning at both)."""
    from gemmakit.model import Gemma
    from gemmakit.quantize import quantize_model
    from gemmakit.runtime.screen import Int8Head, head_codes

    if gemv.unavailable() or gemv.vector_width() == 512:
        pytest.skip("the AVX-512 pass is taken untimed (CI's second pass holds this CPU to AVX2)")
    torch.manual_seed(0)
    model = quantize_model(Gemma(tiny("gemma3").replace(vocab_size=1024, intermediate_size=128)).eval(), "int8")
    full, screened = head_codes(model, torch.float32).timings(rows=2, repeats=3)
    assert 0 < full < 1 and 0 < screened < 1
    line = Engine(model, max_batch=2, context=64).plan.describe()
    assert "timed here as screen vs head: 1 row" in line or "the screen's pass timed no faster, 1 row" in line
    monkeypatch.setattr(Int8Head, "timings", lambda self, rows: (1.0, 2.0))
    engine = Engine(model, max_batch=2, context=64)
    assert "head screen: off (an int8 head on gemmakit's AVX2 kernel: the screen's pass timed no faster, 1 row " \
           "2000.0 vs 1000.0 ms, 2 rows 2000.0 vs 1000.0 ms)" in engine.plan.describe()
    assert engine.runtime.screen is None
    monkeypatch.setattr(Int8Head, "timings", lambda self, rows: (1.0, 0.97))  # within the timing's noise: a tie
    assert Engine(model, max_batch=2, context=64).runtime.screen is None
    monkeypatch.setattr(Int8Head, "timings", lambda self, rows: (2.0, 1.0) if rows == 1 else (1.0, 2.0))
    engine = Engine(model, max_batch=2, context=64)
    assert "head screen: the int8 head's own codes for one-row steps" in engine.plan.describe()
    prompts, params = [[2, 5, 9, 14], [2, 7]], SamplingParams(max_tokens=8)
    want = [r.tokens for r in Engine(model, max_batch=2, context=64, screen=False).generate(prompts, params)]
    passes, screen_int8 = [], gemv.screen_int8
    monkeypatch.setattr(gemv, "screen_int8", lambda x, *a: passes.append(x.shape[0]) or screen_int8(x, *a))
    assert [r.tokens for r in engine.generate(prompts, params)] == want and 2 not in passes  # two rows: the head
    assert [engine.generate([p], params)[0].tokens for p in prompts] == want and set(passes) == {1}
