"""The batched sampler: processing order, truncation sets, penalties, seeds, logprobs, the loop guard, validation.
Run: .venv/bin/python -m pytest tests/test_sampling.py
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from gemmakit.sampling import Sampler, SamplingParams, _truncate, argmax_rows, find_loop, make_generator, warp

V = 8
PROBS = [0.5, 0.25, 0.15, 0.1]  # a small distribution whose truncation sets are easy to work out by hand


def step(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], history=None, prompt_lens=None,
         generators=None):
    """One sampler call with empty histories and unseeded generators unless given."""
    b = logits.shape[0]
    history = history if history is not None else [[] for _ in range(b)]
    prompt_lens = prompt_lens if prompt_lens is not None else [0] * b
    generators = generators if generators is not None else [None] * b
    return sampler.sample(logits, params, history, prompt_lens, generators)


def kept(row: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(row.tolist()) if v != -math.inf}


def test_greedy_is_argmax():
    """temperature 0 returns the argmax of every row."""
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    tokens, lps = step(Sampler(V), logits, [SamplingParams() for _ in range(5)])
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert lps == [None] * 5


def test_low_temperature_approaches_greedy():
    """As temperature goes to 0 every draw becomes the argmax; at temperature 1 it does not."""
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.9]]).expand(200, 4)
    gens = [make_generator(s, "cpu") for s in range(200)]
    cold, _ = step(Sampler(4), logits, [SamplingParams(temperature=0.01)] * 200, generators=gens)
    warm, _ = step(Sampler(4), logits, [SamplingParams(temperature=1.0)] * 200, generators=gens)
    assert set(cold.tolist()) == {1}
    assert len(set(warm.tolist())) == 4


def test_warp_keeps_exact_sets():
    """top-k, top-p (renormalised after top-k) and min-p keep exactly the hand-computed sets, per row."""
    x = torch.tensor(PROBS).log().expand(8, 4)
    cases = [  # (top_k, top_p, min_p) -> kept
        ((4, 1.0, 0.0), {0, 1, 2, 3}), ((2, 1.0, 0.0), {0, 1}), ((1, 1.0, 0.0), {0}),
        ((4, 0.7, 0.0), {0, 1}),  # mass before token 2 is 0.75 >= 0.7
        ((4, 0.8, 0.0), {0, 1, 2}), ((4, 0.52, 0.0), {0, 1}),
        ((2, 0.52, 0.0), {0}),  # after top-k the mass before token 1 is 0.5 / 0.75 = 0.67
        ((4, 1.0, 0.4), {0, 1}),  # p < 0.4 * 0.5 = 0.2 goes
    ]
    top_k, top_p, min_p = (torch.tensor(c) for c in zip(*[c for c, _ in cases], strict=True))
    out = warp(x, torch.ones(8), top_k, top_p.float(), min_p.float())
    assert [kept(r) for r in out] == [want for _, want in cases]
    assert torch.equal(out[0], x[0])  # nothing to drop: the logits come back untouched


def test_warp_head_only_path_equals_full_sort():
    """The top-k-candidates shortcut returns exactly what sorting the whole vocabulary returns, for settled
    rows (top-k, a reachable nucleus, min-p) and for rows that must fall back (top-p 0.999 on flat logits)."""
    g = torch.Generator().manual_seed(0)
    V = 50_000
    x = torch.cat([torch.randn(3, V, generator=g) * 4, torch.randn(1, V, generator=g) * 0.01])  # last: flat
    temperature = torch.tensor([0.7, 1.0, 1.3, 1.0])
    settings = [  # (top_k, top_p, min_p) per row, and whether the head settles every row
        ([40, V, V, 5], [1.0, 0.9, 1.0, 1.0], [0.0, 0.0, 0.05, 0.0], True),
        ([V, 7, V, V], [0.95, 0.5, 1.0, 0.999], [0.0, 0.0, 0.0, 0.0], False),  # flat row: nucleus past the head
        ([2000, V, 1, 3], [0.8, 0.5, 1.0, 1.0], [0.1, 0.0, 0.0, 0.01], True),
    ]
    for top_k, top_p, min_p, settled in settings:
        args = (temperature, torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p))
        fast, full = warp(x, *args, candidates=256), warp(x, *args, candidates=V)
        assert torch.equal(fast, full)
        z = x / temperature[:, None]
        head = z.topk(max(256, max(k for k in top_k if k < V) + 1), dim=-1).values
        assert (_truncate(head, *args[1:], torch.logsumexp(z, dim=-1)) is not None) == settled


def test_warp_applies_temperature_before_min_p():
    """min-p reads the tempered distribution (as HF and vLLM do), and top-k keeps ties with the k-th token."""
    x = torch.tensor([PROBS]).log()
    hot = warp(x, torch.tensor([4.0]), torch.tensor([4]), torch.tensor([1.0]), torch.tensor([0.4]))
    assert kept(hot[0]) == {0, 1, 2, 3}  # p ∝ PROBS ** 0.25: the smallest is 0.75 of the largest
    assert torch.allclose(hot[0], x[0] / 4)
    tied = warp(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), torch.ones(1), torch.tensor([2]), torch.ones(1), torch.zeros(1))
    assert kept(tied[0]) == {0, 1, 2}


@pytest.mark.parametrize("params, want", [
    (dict(top_k=2), {0, 1}), (dict(top_p=0.8), {0, 1, 2}), (dict(min_p=0.4), {0, 1}), (dict(), {0, 1, 2, 3}),
])
def test_draws_come_from_the_kept_set_in_proportion(params, want):
    """Over many seeded draws only kept tokens appear, at their renormalised probabilities."""
    n = 4000
    logits = torch.tensor(PROBS).log().expand(n, 4)
    gens = [make_generator(s, "cpu") for s in range(n)]
    tokens, _ = step(Sampler(4), logits, [SamplingParams(temperature=1.0, **params)] * n, generators=gens)
    counts = Counter(tokens.tolist())
    assert set(counts) == want
    total = sum(PROBS[t] for t in want)
    for t in want:
        assert abs(counts[t] / n - PROBS[t] / total) < 0.03, (t, counts[t] / n)


def penalised(params: SamplingParams, logits: list[float], prompt: list[int], generated: list[int]) -> list[float]:
    x = Sampler(len(logits)).process(torch.tensor([logits]), [params], [prompt + generated], [len(prompt)])
    return x[0].tolist()


LOGITS = [2.0, -1.0, 0.5, 3.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    """CTRL/HF: seen tokens (prompt + generated) are divided by the penalty if positive, multiplied if not."""
    out = penalised(SamplingParams(repetition_penalty=2.0), LOGITS, prompt=[0], generated=[1, 1, 3])
    assert out == [1.0, -2.0, 0.5, 1.5, 0.0]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """OpenAI: logit -= frequency * count + presence * (count > 0), over generated tokens; the prompt is ignored."""
    out = penalised(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), LOGITS, [0, 2], [1, 1, 3])
    assert out == pytest.approx([2.0, -2.0, 0.5, 2.25, 0.0])
    negative = penalised(SamplingParams(presence_penalty=-1.0), LOGITS, [], [4])
    assert negative == [2.0, -1.0, 0.5, 3.0, 1.0]


def test_penalties_compose_repetition_first_then_bias():
    """Repetition, then frequency/presence, then logit_bias, as vLLM orders them."""
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logit_bias={3: 0.25, 2: -0.5})
    out = penalised(params, LOGITS, prompt=[], generated=[3])
    assert out == [2.0, -1.0, 0.0, 3.0 / 2 - 1.0 + 0.25, 0.0]


def test_greedy_sees_penalties():
    """Greedy rows take the argmax of the penalised logits, not the raw ones."""
    params = SamplingParams(repetition_penalty=4.0)
    tokens, _ = step(Sampler(5), torch.tensor([LOGITS]), [params], history=[[3]], prompt_lens=[1])
    assert tokens.tolist() == [0]


def test_logit_bias_bans_and_forces_tokens():
    """A -inf bias makes a token impossible, +100 makes it (practically) certain, at any temperature."""
    n = 500
    logits = torch.tensor(PROBS).log().expand(n, 4)
    gens = [make_generator(s, "cpu") for s in range(n)]
    banned, _ = step(Sampler(4), logits, [SamplingParams(temperature=1.0, logit_bias={0: -math.inf})] * n,
                     generators=gens)
    assert 0 not in banned.tolist() and len(set(banned.tolist())) == 3
    forced, _ = step(Sampler(4), logits, [SamplingParams(temperature=1.0, logit_bias={3: 100.0})] * n,
                     generators=gens)
    assert set(forced.tolist()) == {3}
    greedy, _ = step(Sampler(4), logits[:1], [SamplingParams(logit_bias={0: -100.0})])
    assert greedy.tolist() == [1]


def test_a_row_that_bans_everything_falls_back_to_its_raw_logits():
    """Banning every token does not crash the batch: that row samples from its raw logits."""
    params = [SamplingParams(temperature=1.0, logit_bias=dict.fromkeys(range(4), -math.inf)), SamplingParams()]
    logits = torch.tensor([[0.0, 0.0, 50.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    tokens, _ = step(Sampler(4), logits, params, generators=[make_generator(0, "cpu"), None])
    assert tokens.tolist() == [2, 0]


def run_steps(params: list[SamplingParams], seeds: list[int | None], logits_per_step: list[torch.Tensor],
              rows: list[int]) -> list[list[int]]:
    """Sample len(logits_per_step) steps for the chosen rows; returns each row's token sequence."""
    sampler = Sampler(logits_per_step[0].shape[-1])
    gens = [make_generator(seeds[i], "cpu") for i in rows]
    history: list[list[int]] = [[] for _ in rows]
    for logits in logits_per_step:
        tokens, _ = step(sampler, logits[rows], [params[i] for i in rows], history, [0] * len(rows), gens)
        for h, t in zip(history, tokens.tolist(), strict=True):
            h.append(t)
    return history


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    """A seeded row yields the same tokens alone or in a batch of 4 with other parameters and seeds."""
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=123), SamplingParams(),
              SamplingParams(temperature=1.5, top_k=5, presence_penalty=1.0),
              SamplingParams(temperature=1.0, min_p=0.1, seed=7, repetition_penalty=1.3)]
    seeds = [p.seed for p in params]
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 50, generator=g) for _ in range(30)]
    alone = run_steps(params, seeds, logits, rows=[0])[0]
    batched = run_steps(params, seeds, logits, rows=[0, 1, 2, 3])
    assert batched[0] == alone == run_steps(params, seeds, logits, rows=[0])[0]
    assert batched[3] == run_steps(params, seeds, logits, rows=[3])[0]
    assert run_steps(params, [124, None, None, None], logits, rows=[0])[0] != alone


def test_per_row_parameters_are_honoured_in_one_batch():
    """Each row gets its own temperature, truncation and bias in a mixed batch."""
    n = 300
    base = torch.tensor(PROBS).log()
    kinds = [SamplingParams(), SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, min_p=0.4),
             SamplingParams(temperature=1.0, logit_bias={2: 100.0}), SamplingParams(temperature=1.0)]
    params = kinds * n
    gens = [make_generator(s, "cpu") for s in range(len(params))]
    tokens, _ = step(Sampler(4), base.expand(len(params), 4), params, generators=gens)
    by_kind = [set(tokens[i::len(kinds)].tolist()) for i in range(len(kinds))]
    assert by_kind == [{0}, {0, 1}, {0, 1}, {2}, {0, 1, 2, 3}]


def test_logprobs_are_log_softmax_of_the_processed_logits():
    """Chosen logprob and sorted top-k alternatives equal log_softmax after penalties, before temperature."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(logprobs=3, temperature=2.0, repetition_penalty=1.5), SamplingParams(logprobs=0),
              SamplingParams()]
    history = [[int(logits[0].argmax())], [], []]
    tokens, lps = step(Sampler(V), logits, params, history, [1, 0, 0], [make_generator(0, "cpu"), None, None])
    processed = Sampler(V).process(logits, params, history, [1, 0, 0])
    ref = processed.log_softmax(-1)
    for row in (0, 1):
        assert lps[row].token == tokens[row].item()
        assert lps[row].logprob == pytest.approx(ref[row, tokens[row]].item(), abs=1e-6)
    values, ids = ref[0].topk(3)
    assert [t for t, _ in lps[0].top] == ids.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(values.tolist(), abs=1e-6)
    assert [v for _, v in lps[0].top] == sorted((v for _, v in lps[0].top), reverse=True)
    assert not torch.allclose(ref[0], logits[0].log_softmax(-1))  # the penalty shows in the logprobs
    assert lps[1].top == [] and lps[2] is None


def test_find_loop_detects_periods_1_3_7():
    """A tail of one block repeated min_repeats times is found, with its smallest period."""
    prefix = [100, 101, 102, 103, 104]
    for block in ([9], [1, 2, 3], [4, 5, 6, 7, 8, 9, 10]):
        tokens = prefix + block * 4
        assert find_loop(tokens, 1, 64, 4) == len(block)
        assert find_loop(tokens[:-1], 1, 64, 4) is None  # 3 repeats plus a partial one are not enough
    assert find_loop([1, 2] * 8, 1, 64, 4) == 2
    assert find_loop([5] * 10, 2, 64, 4) == 2  # a period-1 run is also periodic with period 2
    assert find_loop([1, 2, 3] * 4, 1, 2, 4) is None  # longer than max_period


def test_find_loop_ignores_text_that_does_not_repeat():
    """Non-repeating or only partly repeating sequences do not fire."""
    g = torch.Generator().manual_seed(0)
    assert find_loop(torch.randint(0, 1000, (500,), generator=g).tolist(), 1, 64, 4) is None
    assert find_loop(list(range(300)), 1, 64, 4) is None
    assert find_loop([1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2, 3], 1, 64, 2) is None
    assert find_loop([], 1, 64, 4) is None
    with pytest.raises(ValueError, match="min_repeats"):
        find_loop([1, 1], 1, 64, 1)


def test_find_loop_span_floor_spares_short_runs():
    """min_span asks short periods for more repeats: six "0" digits are not a loop at the default floor of 32."""
    digits = [1] + [0] * 6
    assert find_loop(digits, 1, 64, 4) == 1
    assert find_loop(digits, 1, 64, 4, min_span=32) is None
    assert find_loop([0] * 32, 1, 64, 4, min_span=32) == 1
    assert find_loop([1, 2, 3] * 10, 1, 64, 4, min_span=32) is None
    assert find_loop([1, 2, 3] * 11, 1, 64, 4, min_span=32) == 3


CYCLE = [5, 6, 7]


def scripted_logits(history: list[int]) -> torch.Tensor:
    """A model stuck in a loop: it strongly prefers the next token of CYCLE and knows nothing else."""
    x = torch.zeros(10)
    last = history[-1]
    x[CYCLE[(CYCLE.index(last) + 1) % 3] if last in CYCLE else CYCLE[0]] = 10.0
    return x


def scripted_run(params: SamplingParams, steps: int = 60) -> list[int]:
    sampler, history = Sampler(10), [1, 2]
    for _ in range(steps):
        tokens, _ = sampler.sample(scripted_logits(history)[None], [params], [history], [2], [None])
        history = history + tokens.tolist()
    return history[2:]


def test_penalize_mode_breaks_a_scripted_loop():
    """With loop_guard="penalize" the repeated tail never grows past the detection span; "off" loops forever."""
    guard = dict(loop_min_repeats=4, loop_min_span=12)
    looping = scripted_run(SamplingParams(**guard))
    assert looping == (CYCLE * 20)[:60]
    broken = scripted_run(SamplingParams(loop_guard="penalize", **guard))
    assert set(broken) - set(CYCLE)  # the guard forced other tokens in
    # a period-3 run stops at the 12-token detection span (the guard bans its 13th token)
    assert all(find_loop(broken[:t], 3, 3, 2, min_span=13) is None for t in range(len(broken) + 1))


def test_loop_detected_only_for_stop_rows():
    """Sampler.loop_detected tells the engine to finish a loop_guard="stop" row; other modes never stop."""
    tokens = CYCLE * 12
    assert Sampler.loop_detected(tokens, SamplingParams(loop_guard="stop"))
    assert not Sampler.loop_detected(tokens[:-1] + [0], SamplingParams(loop_guard="stop"))
    assert not Sampler.loop_detected(tokens, SamplingParams(loop_guard="penalize"))
    assert not Sampler.loop_detected(tokens, SamplingParams())


def test_make_generator_seeds_reproducibly():
    """The same seed gives the same stream; no seed means torch's default RNG (None)."""
    a, b = make_generator(3, "cpu"), make_generator(3, torch.device("cpu"))
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert make_generator(None, "cpu") is None


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -0.1), ("temperature", 101.0), ("top_k", 0), ("top_k", -1),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("logprobs", 21), ("logprobs", -1),
    ("loop_guard", "maybe"), ("logit_bias", {-1: 1.0}), ("logit_bias", {5: float("inf")}),
    ("loop_min_repeats", 1), ("logit_bias", {5: 1e39}), ("logit_bias", {5: 100.5}), ("logit_bias", {5: math.nan}),
    ("repetition_penalty", 1e-38), ("repetition_penalty", math.nan), ("repetition_penalty", 1e39),
])
def test_validate_rejects_each_bad_value(field, value):
    """Every out-of-range value raises a ValueError that names its field."""
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts_the_edges():
    """Boundary values are legal; vocab_size also bounds token ids."""
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, presence_penalty=-2.0, frequency_penalty=2.0,
                   logprobs=20, logit_bias={0: -math.inf, 7: 100.0}, seed=-1, stop=("\n",), loop_guard="stop",
                   loop_min_repeats=2).validate(vocab_size=8)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={8: 1.0}).validate(vocab_size=8)


def test_sample_rejects_mismatched_inputs():
    """Wrong logits width, row counts or out-of-vocabulary ids are refused with a message."""
    sampler = Sampler(V)
    with pytest.raises(ValueError, match="logits"):
        step(sampler, torch.zeros(1, V + 1), [SamplingParams()])
    with pytest.raises(ValueError, match="one entry per row"):
        sampler.sample(torch.zeros(2, V), [SamplingParams()] * 2, [[]], [0, 0], [None, None])
    with pytest.raises(ValueError, match="logit_bias"):
        step(sampler, torch.zeros(1, V), [SamplingParams(logit_bias={V: 1.0})])
    with pytest.raises(ValueError, match="history"):
        step(sampler, torch.zeros(1, V), [SamplingParams(repetition_penalty=1.2)], history=[[V]], prompt_lens=[1])


def test_sampling_never_writes_into_the_callers_logits():
    """The sampler reads the model's logits in place (no up-front copy); penalties, bias and the loop ban must
    leave them as they were, since a compiled step may hand out its own output buffer."""
    history = [1, 2] + CYCLE * 6
    for params in (SamplingParams(loop_guard="penalize", loop_min_repeats=4, loop_min_span=12),
                   SamplingParams(repetition_penalty=20.0, presence_penalty=0.5, frequency_penalty=0.5),
                   SamplingParams(logit_bias={5: -100.0})):
        logits = scripted_logits(history)[None]
        before = logits.clone()
        tokens, _ = Sampler(10).sample(logits, [params], [history], [2], [None])
        assert torch.equal(logits, before), params
        assert tokens.item() != before.argmax().item(), params  # each one did act, on its own copy


def test_blockwise_argmax_matches_torch_argmax_ties_and_nans_included():
    """argmax_rows (block maxima, then one block) gives torch's answer: first maximum, NaN counts as maximum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16 * 64, generator=g)
    x[1, 100] = x[1, 900] = 50.0  # a tie across blocks: the first one wins
    x[2, 70] = x[2, 71] = 50.0  # a tie inside a block
    x[3, 600] = float("nan")
    x[4, 5], x[4, 1000] = float("nan"), float("nan")
    x[5] = 0.0
    assert argmax_rows(x, chunk=64).tolist() == x.argmax(-1).tolist()
    assert argmax_rows(x[:, :1000], 64).tolist() == x[:, :1000].argmax(-1).tolist()  # 1000 % 64: plain argmax
    assert argmax_rows(x, chunk=64).tolist()[:5] == [int(x[0].argmax()), 100, 70, 600, 5]
    assert argmax_rows(x[:, ::2], chunk=64).tolist() == x[:, ::2].argmax(-1).tolist()  # not contiguous


def test_one_rule_for_fitting_the_context():
    """fit_context: prompt + max_tokens must fit; without max_tokens, all the room left; one message."""
    from gemmakit.sampling import ContextOverflow, fit_context

    assert fit_context(10, 54, 64) == 54 and fit_context(10, None, 64) == 54
    with pytest.raises(ContextOverflow, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) exceeds the context of "
                                              r"64 tokens; shorten the prompt or lower max_tokens"):
        fit_context(60, 10, 64)
    with pytest.raises(ValueError, match="leaves no room to generate in the context of 64 tokens"):
        fit_context(64, None, 64)


def test_draws_never_come_from_nans():
    """Whatever reaches the draw, the token is a real choice: a processor's +inf logit is a certainty, a row a
    processor turned to NaN falls back to the argmax of the processed logits, and a temperature so small that
    dividing by it overflows float32 samples at 0.01 instead (vLLM's floor) rather than drawing from NaNs."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]])

    def inf_at_5(z, tokens, prompt_len):
        return torch.where(torch.arange(V) == 5, math.inf, z)

    def all_nan(z, tokens, prompt_len):
        return torch.full_like(z, math.nan)

    for processor, want in ((inf_at_5, 5), (all_nan, 1)):
        params = SamplingParams(temperature=1.0, logits_processors=(processor,))
        for seed in range(5):
            tokens, _ = step(Sampler(V), logits, [params], generators=[make_generator(seed, "cpu")])
            assert tokens.tolist() == [want], processor.__name__
    big = torch.tensor([[0.0, 30.0, 29.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    for seed in range(5):
        tokens, lps = step(Sampler(V), big, [SamplingParams(temperature=1e-38, logprobs=2)],
                           generators=[make_generator(seed, "cpu")])
        assert tokens.tolist() == [1] and all(math.isfinite(lp) for _, lp in lps[0].top)
