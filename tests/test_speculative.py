"""Speculative decoding in the engine (speculative.py): whatever the drafter guesses, greedy output is exactly
plain greedy's and sampled output has exactly the target's distribution, batched, with every stop rule.
Run: .venv/bin/python -m pytest tests/test_speculative.py
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import pytest
import torch

from gemmakit import speculative
from gemmakit.bench import run_engine_bench
from gemmakit.checkpoints import load_model
from gemmakit.config import default_layer_types
from gemmakit.engine import Engine
from gemmakit.model import Gemma
from gemmakit.sampling import Sampler, SamplingParams, draw
from gemmakit.speculative import Drafter, ModelDrafter, TargetState, speculation_stats
from tests.helpers import WINDOW, hf_model, tiny

CONTEXT = 128
PROMPT_LENGTHS = (3, 17, 4 * WINDOW + 1, 6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster, and on a shared machine it spares the others'
    spin-waits (several times slower with two threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(tmp_path_factory, name: str, seed: int = 0, layers: int | None = None) -> Gemma:
    path = tmp_path_factory.mktemp(f"{name}-{seed}")
    config = tiny(name)
    if layers is not None:
        config = config.replace(num_hidden_layers=layers, layer_types=default_layer_types(layers, period=2))
    hf_model(config, seed=seed).save_pretrained(path)
    return load_model(path)


@pytest.fixture(scope="module", params=["gemma3", "e2b"])
def model(request, tmp_path_factory) -> Gemma:
    return _load(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Gemma:
    return _load(tmp_path_factory, "gemma3")


def _prompts(n: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 1000, (PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)],), generator=g).tolist()
            for i in range(n)]


def _plain(model: Gemma, prompts: list[list[int]], params, **kw) -> list:
    return Engine(model, max_batch=2, context=CONTEXT, **kw).generate(prompts, params)


class Scripted:
    """A drafter that guesses from the known plain continuation of each prompt, `size(k)` tokens at a time, every
    `wrong_every`-th guess off by one; it checks what the engine tells it against the contract."""

    def __init__(self, plain: dict[tuple[int, ...], list[int]], size: Callable[[int], int], wrong_every: int = 0):
        self.plain, self.size, self.wrong_every = plain, size, wrong_every
        self.ks: list[int] = []
        self.rows: dict[int, tuple[int, ...]] = {}  # row -> the prompt it holds

    def propose(self, sequences: list[list[int]], k: int, target: TargetState) -> list[list[int]]:
        assert k >= 1 and len(sequences) == len(target.rows) == len(target.positions) == target.hidden.shape[0]
        self.ks.append(k)
        out = []
        for seq, row, pos in zip(sequences, target.rows, target.positions, strict=True):
            assert pos == len(seq) - 2 and 0 <= int(target.cache.slot_pos["full_attention"][row].max()) == pos
            prompt = next(p for p in self.plain if tuple(seq[:len(p)]) == p)
            self.rows[row] = prompt
            start = len(seq) - len(prompt)
            guesses = self.plain[prompt][start:start + self.size(k)]
            if self.wrong_every:
                guesses = [(g + 1) % 1000 if (start + i) % self.wrong_every == 0 else g for i, g in enumerate(guesses)]
            out.append(guesses)
        return out

    def rollback(self, row: int, n: int) -> None:
        assert n > len(self.rows.get(row, ()))  # never past a prompt

    def release(self, row: int) -> None:
        self.rows.pop(row, None)


def test_model_drafters_are_drafters(gemma3):
    assert isinstance(ModelDrafter(gemma3, rows=2, context=64), Drafter)
    assert isinstance(Scripted({}, lambda k: k), Drafter)


def test_model_drafter_greedy_equals_plain_greedy(model, tmp_path_factory):
    """Prompts of different lengths (one past the sliding window), four through two rows: the target as its own
    drafter keeps every guess, a random drafter almost none; the tokens are plain greedy's either way."""
    prompts, params = _prompts(), SamplingParams(max_tokens=3 * WINDOW)
    plain = [r.tokens for r in _plain(model, prompts, params)]
    other = _load(tmp_path_factory, "gemma3" if model.config.family == "gemma3" else "e2b", seed=7)
    for drafter_model, least, most in ((model, 1.0, 1.0), (other, 0.0, 0.3)):
        engine = Engine(model, max_batch=2, context=CONTEXT, drafter=ModelDrafter(drafter_model, 2, CONTEXT),
                        draft_tokens=4)
        assert [r.tokens for r in engine.generate(prompts, params)] == plain
        stats = speculation_stats(engine)
        assert least <= stats.acceptance <= most and stats.drafted > 0
        if drafter_model is model:  # 4 drafts + the target's token per row-step, after each row's first step
            assert stats.tokens / stats.rounds > 3


@pytest.mark.parametrize("size,wrong_every", [(lambda k: k, 0), (lambda k: 1, 0), (lambda k: 0, 0),
                                              (lambda k: k + 5, 0), (lambda k: k, 3)],
                         ids=["k", "one", "none", "too-many", "wrong"])
def test_any_drafter_gives_plain_greedy(gemma3, size, wrong_every):
    prompts, params = _prompts(), SamplingParams(max_tokens=15)
    plain = {tuple(p): r.tokens for p, r in zip(prompts, _plain(gemma3, prompts, params), strict=True)}
    drafter = Scripted(plain, size, wrong_every)
    engine = Engine(gemma3, max_batch=3, context=CONTEXT, drafter=drafter, draft_tokens=3)
    reqs = engine.generate(prompts, params)
    assert [r.tokens for r in reqs] == list(plain.values())
    assert drafter.ks and max(drafter.ks) <= 3 and not drafter.rows  # every row released
    stats = speculation_stats(engine)
    assert stats.accepted == (0 if size(3) == 0 else stats.accepted) and stats.tokens > 0
    if wrong_every == 0 and size(3) > 0:
        assert stats.accepted == stats.drafted


class Pieces:
    """A tokenizer stand-in: token t reads "<t>", so a stop string can end inside any token."""

    class Decoder:
        def step(self, token: int) -> str:
            return f"<{token}>"

    def decode_stream(self) -> Pieces.Decoder:
        return Pieces.Decoder()


def test_stop_rules_are_honoured(gemma3):
    """Stop tokens, stop strings and max_tokens end each row where plain decoding ends it, mid-round included,
    with a drafter that guesses right (so a stop lands inside a run of accepted drafts)."""
    prompts = _prompts(3)
    free = [r.tokens for r in _plain(gemma3, prompts, SamplingParams(max_tokens=20))]
    params = [SamplingParams(max_tokens=20, stop_token_ids=(free[0][9],)),
              SamplingParams(max_tokens=20, stop=(f"{free[1][7]}><{free[1][8]}",)),
              SamplingParams(max_tokens=7)]
    plain = Engine(gemma3, Pieces(), max_batch=3, context=CONTEXT).generate(prompts, params)
    drafter = ModelDrafter(gemma3, 3, CONTEXT)
    spec = Engine(gemma3, Pieces(), max_batch=3, context=CONTEXT, drafter=drafter).generate(prompts, params)
    assert [(r.tokens, r.text, r.finish_reason) for r in spec] == [(r.tokens, r.text, r.finish_reason)
                                                                    for r in plain]
    assert [r.finish_reason for r in spec] == ["stop", "stop", "length"]
    assert len(spec[0].tokens) == free[0].index(free[0][9])


def test_rows_the_rule_cannot_serve_decode_normally(gemma3):
    """A logprobs row next to speculated ones gets its logprobs and plain greedy's tokens."""
    prompts = _prompts(2)
    params = [SamplingParams(max_tokens=10, logprobs=2), SamplingParams(max_tokens=10)]
    plain = _plain(gemma3, prompts, params)
    spec = Engine(gemma3, max_batch=2, context=CONTEXT, drafter=ModelDrafter(gemma3, 2, CONTEXT)).generate(
        prompts, params)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert [(lp.token, round(lp.logprob, 4)) for lp in spec[0].logprobs] == [
        (lp.token, round(lp.logprob, 4)) for lp in plain[0].logprobs]


def test_draft_tokens_beyond_the_cache_slack_are_refused(gemma3):
    """Refused when the engine is built, with the fix, rather than failing requests later."""
    with pytest.raises(ValueError, match="slack >= 4"):
        Engine(gemma3, max_batch=1, context=CONTEXT, slack=2, drafter=ModelDrafter(gemma3, 1, CONTEXT),
               draft_tokens=4)


class RunnerUp:
    """A deliberately poor drafter: always the target's second most likely token (by an uncached forward of the
    target), so under top_k=2 a guess is kept with probability p2 < 1/2 and rejected otherwise."""

    def __init__(self, target: Gemma):
        self.second = cache(lambda seq: int(target(torch.tensor([seq]))[0, -1].topk(2).indices[1]))

    def propose(self, sequences: list[list[int]], k: int, target: TargetState) -> list[list[int]]:
        out = []
        for seq in sequences:
            guesses: list[int] = []
            for _ in range(k):
                guesses.append(self.second(tuple(seq + guesses)))
            out.append(guesses)
        return out

    def rollback(self, row: int, n: int) -> None: ...

    def release(self, row: int) -> None: ...


def _exact(model: Gemma, prompt: list[int], params: SamplingParams, n: int) -> dict[tuple[int, ...], float]:
    """The exact distribution of the first `n` sampled tokens: each step's distribution (Sampler.distributions,
    the engine's own rules) of an uncached forward, over every branch with mass."""
    sampler, out = Sampler(model.config.vocab_size), {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, mass in out.items():
            logits = model(torch.tensor([prompt + list(seq)]))[0, -1:]
            p = sampler.distributions(logits, [params], [prompt + list(seq)], [len(prompt)])[0]
            for t in p.nonzero()[:, 0].tolist():
                nxt[seq + (t,)] = mass * float(p[t])
        out = nxt
    return out


def _chi_square_p(counts: dict, exact: dict, n: int) -> float:
    """p-value of Pearson's chi-square test, cells with fewer than 5 expected draws pooled."""
    from scipy.stats import chi2

    big = [s for s, q in exact.items() if q * n >= 5]
    observed = [counts.get(s, 0) for s in big] + [n - sum(counts.get(s, 0) for s in big)]
    expected = [exact[s] * n for s in big] + [n * (1 - sum(exact[s] for s in big))]
    cells = [(o, e) for o, e in zip(observed, expected, strict=True) if e > 1e-9]
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return float(chi2.sf(stat, len(cells) - 1))


def _sampled(model: Gemma, prompt: list[int], params: SamplingParams, draws: int) -> tuple[dict, float]:
    engine = Engine(model, max_batch=16, context=64, drafter=RunnerUp(model), draft_tokens=2)
    seeds = [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(draws)]
    counts: dict[tuple[int, ...], int] = {}
    for req in engine.generate([prompt] * draws, seeds):
        counts[tuple(req.tokens)] = counts.get(tuple(req.tokens), 0) + 1
    return counts, speculation_stats(engine).acceptance


STAT_PARAMS = SamplingParams(max_tokens=5, temperature=1.0, top_k=2, repetition_penalty=1.3)


def test_sampled_output_has_the_targets_distribution(tmp_path_factory, monkeypatch):
    """800 seeded 5-token samples (the last three speculated, under a repetition penalty that makes each
    position's distribution depend on the drafts before it) match the exact distribution (chi-square); the
    same test with an acceptance rule that keeps every guess fails it."""
    model = _load(tmp_path_factory, "gemma3", layers=2)  # a sliding and a full layer: many draws, quickly
    prompt = _prompts(1)[0]
    exact = _exact(model, prompt, STAT_PARAMS, STAT_PARAMS.max_tokens)
    counts, acceptance = _sampled(model, prompt, STAT_PARAMS, 800)
    assert 0.05 < acceptance < 0.95  # rejections and acceptances both happened
    assert set(counts) <= set(exact) and _chi_square_p(counts, exact, 800) > 1e-3

    def keep_all(probs, drafts, generator):
        return drafts + [draw(probs[len(drafts)], generator)], len(drafts)

    monkeypatch.setattr(speculative, "accept_drafts", keep_all)
    counts, _ = _sampled(model, prompt, STAT_PARAMS, 300)
    assert _chi_square_p(counts, exact, 300) < 1e-6


def test_seeded_sampling_is_reproducible(gemma3):
    """A seeded sampled row gives the same tokens again, whatever shares its batch."""
    prompts = _prompts(3)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    runs = []
    for others in (1, 3):
        engine = Engine(gemma3, max_batch=3, context=CONTEXT, drafter=ModelDrafter(gemma3, 3, CONTEXT))
        runs.append(engine.generate(prompts[:others], [params, SamplingParams(max_tokens=12, temperature=1.0),
                                                       SamplingParams(max_tokens=12)][:others])[0].tokens)
    assert runs[0] == runs[1] and len(runs[0]) == 12 and not math.isnan(speculation_stats(engine).acceptance)


def test_bench_reports_acceptance(gemma3):
    """`run_engine_bench` with a drafter counts the tokens speculative steps make and reports the acceptance."""
    r = run_engine_bench(gemma3, batch=2, prompt_len=5, new_tokens=12, drafter=ModelDrafter(gemma3, 2, 32),
                         draft_tokens=3, context=32)
    assert r.acceptance == 1.0 and r.tokens_per_round > 2 and r.row()["accept"] == 1.0
    assert run_engine_bench(gemma3, batch=2, prompt_len=5, new_tokens=12).acceptance is None
