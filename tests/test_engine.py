"""The engine: batched equals unbatched, continuous batching, per-row sampling, stops, memory (speculation:
tests/test_speculative.py).
Run: .venv/bin/python -m pytest tests/test_engine.py
"""

from __future__ import annotations

import pytest
import torch

import gemmakit.model as model_module
from gemmakit.checkpoints import load_model, load_model_and_tokenizer
from gemmakit.config import FULL
from gemmakit.engine import Engine, StopText
from gemmakit.model import Gemma
from gemmakit.sampling import SamplingParams
from tests.helpers import WINDOW, greedy_without_cache, hf_model, tiny

PROMPT_LENGTHS = (3, 17, 4 * WINDOW + 1)


@pytest.fixture(scope="module", params=["gemma3", "e2b"])
def model(request, tmp_path_factory) -> Gemma:
    path = tmp_path_factory.mktemp(request.param)
    hf_model(tiny(request.param)).save_pretrained(path)
    return load_model(path)


def _prompts(n: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 1000, (PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)],), generator=g).tolist()
            for i in range(n)]


def test_batched_equals_unbatched_equals_uncached(model):
    """Prompts of different lengths decoded together give the tokens each gets alone and without a cache."""
    params = SamplingParams(max_tokens=3 * WINDOW)  # runs far past the sliding window
    batched = Engine(model, max_batch=4, context=128).generate(_prompts(), params)
    for prompt, req in zip(_prompts(), batched, strict=True):
        alone = Engine(model, max_batch=1, context=128).generate([prompt], params)[0]
        assert req.tokens == alone.tokens == greedy_without_cache(model, prompt, params.max_tokens)
        assert req.finish_reason == "length"


def test_eager_steps_attend_over_the_used_slots_only(model, monkeypatch):
    """In a long context, an eager decode step attends over the slots its rows' positions can reach, rounded
    up to the span granule, not over every slot of the context (empty ones included; those past the last span
    hold NaN here), and decodes what it decodes without a cache: two rows of different lengths, across span
    boundaries and far past the sliding window."""
    seen = []
    attend = model_module.attend
    monkeypatch.setattr(model_module, "attend",
                        lambda q, k, *rest, **kw: seen.append(k.shape[2]) or attend(q, k, *rest, **kw))
    long_prompt = torch.randint(0, 1000, (34,), generator=torch.Generator().manual_seed(9)).tolist()
    prompts, params = [_prompts(1)[0], long_prompt], SamplingParams(max_tokens=36)  # positions up to 69
    engine = Engine(model, max_batch=2, context=256)
    for v in engine.runtime.cache.v.values():
        v[:, :, 96:] = float("nan")
    reqs = engine.generate(prompts, params)
    for prompt, req in zip(prompts, reqs, strict=True):
        assert req.tokens == greedy_without_cache(model, prompt, params.max_tokens)
    # No step attended over more than its span: at most 96 slots (positions up to 69), of the context's 256.
    assert engine.runtime.cache.slots[FULL] == 256 and max(seen) == 96
    assert {64, 96} <= set(seen)  # the span grew with the long row's positions


@pytest.mark.parametrize("chunk", [3, WINDOW + 5, 64])
def test_chunked_prefill_equals_one_shot(model, chunk):
    """A prompt prefilled in chunks (shorter than, longer than, and as long as the sliding window's ring)
    continues exactly as without a cache, next to a row decoding in the same batch."""
    long_prompt = torch.randint(0, 1000, (5 * WINDOW + 3,), generator=torch.Generator().manual_seed(8)).tolist()
    params = SamplingParams(max_tokens=2 * WINDOW)
    engine = Engine(model, max_batch=2, context=128, prefill_chunk=chunk)
    reqs = engine.generate([_prompts(1)[0], long_prompt], params)
    assert reqs[1].tokens == greedy_without_cache(model, long_prompt, params.max_tokens)
    assert reqs[0].tokens == greedy_without_cache(model, _prompts(1)[0], params.max_tokens)


def test_continuous_batching_reuses_rows(model):
    """Seven requests through two rows all finish with the same tokens they get alone."""
    params = [SamplingParams(max_tokens=4 + i) for i in range(7)]
    engine = Engine(model, max_batch=2, context=128)
    reqs = engine.generate(_prompts(7), params)
    assert [len(r.tokens) for r in reqs] == [4 + i for i in range(7)]
    assert sorted(engine.free_rows) == [0, 1] and not engine.running
    for prompt, p, req in zip(_prompts(7), params, reqs, strict=True):
        assert req.tokens == Engine(model, max_batch=1, context=128).generate([prompt], p)[0].tokens


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    """A seeded sampled row gives the same tokens alone and next to other rows with other parameters."""
    mine = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    others = [SamplingParams(max_tokens=6, temperature=0.7, top_k=5, seed=9), SamplingParams(max_tokens=8)]
    prompts = _prompts()
    together = Engine(model, max_batch=3, context=128).generate(prompts, [mine, *others])[0]
    alone = Engine(model, max_batch=1, context=128).generate(prompts[:1], mine)[0]
    again = Engine(model, max_batch=1, context=128).generate(prompts[:1], mine)[0]
    assert together.tokens == alone.tokens == again.tokens


def test_stop_token_and_logprobs(model):
    """A stop id ends the sequence without being emitted; logprobs come with top alternatives."""
    prompt = _prompts(1)[0]
    free = Engine(model, max_batch=1, context=128).generate([prompt], SamplingParams(max_tokens=6))[0]
    stop_at = free.tokens[3]
    p = SamplingParams(max_tokens=6, stop_token_ids=(stop_at,), logprobs=3)
    req = Engine(model, max_batch=1, context=128).generate([prompt], p)[0]
    assert req.tokens == free.tokens[: free.tokens.index(stop_at)] and req.finish_reason == "stop"
    assert [lp.token for lp in req.logprobs] == req.tokens
    assert all(len(lp.top) == 3 and lp.top[0][1] >= lp.top[-1][1] for lp in req.logprobs)


def test_cancel_frees_the_row(model):
    """A cancelled request (a client that went away) leaves its row at once."""
    engine = Engine(model, max_batch=1, context=128)
    req = engine.submit(_prompts(1)[0], SamplingParams(max_tokens=50))
    engine.step()
    engine.cancel(req)
    assert engine.free_rows == [0] and not engine.has_work and req.finish_reason == "cancelled"


class CountingConstraint:
    """A grammar of its own: only token ids in `allowed_ids`, and complete after `length` tokens."""

    def __init__(self, vocab: int, allowed_ids: list[int], length: int):
        self.mask = torch.zeros(vocab, dtype=torch.bool)
        self.mask[allowed_ids] = True
        self.length, self.seen = length, []

    def allowed(self) -> torch.Tensor:
        return self.mask

    def advance(self, token: int) -> None:
        assert self.mask[token], "the engine sampled a token the constraint had masked out"
        self.seen.append(token)

    @property
    def done(self) -> bool:
        return len(self.seen) >= self.length


def test_a_constraint_masks_sampling_and_ends_the_request(model):
    """Constrained rows only ever draw allowed tokens and stop when their grammar is complete; an unconstrained
    row in the same batch is untouched."""
    vocab = model.config.vocab_size
    engine = Engine(model, max_batch=2, context=128)
    free = greedy_without_cache(model, _prompts(1)[0], 8)
    rule = CountingConstraint(vocab, [7, 11, 13], length=5)
    constrained, plain = engine.generate(_prompts(1) * 2, [
        SamplingParams(max_tokens=50, temperature=1.0, seed=3, constraint=rule), SamplingParams(max_tokens=8)])
    assert constrained.tokens == rule.seen and len(rule.seen) == 5 and set(rule.seen) <= {7, 11, 13}
    assert constrained.finish_reason == "stop" and plain.tokens == free


def test_bad_requests_are_refused(model):
    """Too long for the context, empty prompt, bad parameters: clear ValueErrors before any work."""
    engine = Engine(model, max_batch=1, context=64)
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) exceeds the context of 64"):
        engine.submit([1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1, 2], SamplingParams(top_p=2.0))


def test_memory_is_estimated_before_allocation(model):
    """The KV cache allocated is exactly the estimate, and a context that cannot fit is refused up front."""
    engine = Engine(model, max_batch=3, context=100)
    assert engine.runtime.cache.nbytes() == engine.memory["kv_cache"]
    huge = Gemma.__new__(Gemma)
    torch.nn.Module.__init__(huge)
    huge.config = model.config.replace(max_position_embeddings=2**40)
    huge.model = model.model
    with pytest.raises(MemoryError, match=r"GiB more .* KV cache.*lower --context"):
        Engine(huge, max_batch=8, context=2**38)


@pytest.fixture(scope="module")
def real(default_model):
    return load_model_and_tokenizer(default_model)


def test_stop_strings_on_the_real_model(real):
    """A stop string that spans tokens ends the text right before it."""
    model, tok = real
    engine = Engine(model, tok, max_batch=2, context=256)
    prompt = tok.encode("The capital of France is Paris. The capital of Italy is")
    free = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
    text = tok.decode(free.tokens)
    assert " capital" in text[1:]
    req = engine.generate([prompt], SamplingParams(max_tokens=12, stop=(" capital",)))[0]
    assert req.finish_reason == "stop" and req.text == text[: text.index(" capital", 1)]


def test_loop_guard_stops_a_repetition_collapse(real):
    """The 270M collapses into '1000000...' on this prompt; the loop guard ends it with reason 'loop'."""
    model, tok = real
    prompt = tok.encode("User: Count from 1 to 200, separated by commas.\nAssistant: 1")
    engine = Engine(model, tok, max_batch=1, context=512)
    loose = engine.generate([prompt], SamplingParams(max_tokens=80))[0]
    assert loose.finish_reason == "length" and len(set(loose.tokens[-30:])) <= 2
    guarded = engine.generate([prompt], SamplingParams(max_tokens=80, loop_guard="stop"))[0]
    assert guarded.finish_reason == "loop" and len(guarded.tokens) < 80


class RefusingConstraint(CountingConstraint):
    """A grammar that allows its ids, then refuses the token it is given at step `refuse_at` (as llguidance does
    when a sampler picks a token the mask forbade)."""

    def __init__(self, vocab: int, allowed_ids: list[int], refuse_at: int):
        super().__init__(vocab, allowed_ids, length=10**6)
        self.refuse_at = refuse_at

    def advance(self, token: int) -> None:
        if len(self.seen) == self.refuse_at:
            raise RuntimeError(f"token {token} was outside the grammar")
        super().advance(token)


def _raises(z, tokens, prompt_len):
    raise ValueError("a broken logits processor")


def test_a_failing_request_ends_alone(model):
    """A grammar that refuses a token, a grammar that allows nothing and a processor that raises each end their
    own request with "error" and a reason; the plain request batched with them gets exactly its tokens."""
    vocab, prompt = model.config.vocab_size, _prompts(1)[0]
    engine = Engine(model, max_batch=4, context=128)
    want = greedy_without_cache(model, prompt, 8)
    refused, empty, broken, plain = engine.generate([prompt] * 4, [
        SamplingParams(max_tokens=20, constraint=RefusingConstraint(vocab, [7, 11], refuse_at=2)),
        SamplingParams(max_tokens=20, constraint=CountingConstraint(vocab, [], length=5)),
        SamplingParams(max_tokens=20, temperature=1.0, logits_processors=(_raises,)),
        SamplingParams(max_tokens=8)])
    assert plain.tokens == want and plain.finish_reason == "length" and plain.error is None
    assert [r.finish_reason for r in (refused, empty, broken)] == ["error"] * 3
    assert "outside the grammar" in refused.error and len(refused.tokens) == 2
    assert "no token is allowed" in empty.error and "broken logits processor" in broken.error
    assert sorted(engine.free_rows) == [0, 1, 2, 3] and not engine.has_work


def test_a_decode_step_that_fails_is_pinned_on_its_row(model, monkeypatch):
    """When the batched decode raises, each row is stepped alone: only the row that fails by itself ends, with
    the error; the others continue to exactly their tokens. abort() then frees every row."""
    prompts = _prompts(3)
    engine = Engine(model, max_batch=3, context=128)
    decode = engine.runtime.decode

    def fails_for_row_1(tokens, positions, rows, greedy, **kw):
        if 1 in rows and positions[rows.index(1)] >= len(prompts[1]) + 2:
            raise RuntimeError("row 1 is cursed")
        return decode(tokens, positions, rows, greedy=greedy, **kw)

    monkeypatch.setattr(engine.runtime, "decode", fails_for_row_1)
    reqs = engine.generate(prompts, SamplingParams(max_tokens=6))
    assert [r.finish_reason for r in reqs] == ["length", "error", "length"]
    assert "row 1 is cursed" in reqs[1].error and len(reqs[1].tokens) == 3
    assert [reqs[0].tokens, reqs[2].tokens] == [greedy_without_cache(model, prompts[i], 6) for i in (0, 2)]
    running = engine.submit(prompts[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.abort("the step failed") == [running] and running.error == "the step failed"
    assert sorted(engine.free_rows) == [0, 1, 2] and not engine.has_work
    assert engine.generate([prompts[2]], SamplingParams(max_tokens=6))[0].tokens == reqs[2].tokens


class SearchStopText:
    """The reference: search the held text for every stop string, and for every prefix of one at its end."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, out, self.pending = True, self.pending[:min(hits)], ""
            return out
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out


def test_stop_text_cuts_like_a_search_of_the_held_text():
    """Fed the same random pieces, StopText releases exactly what searching the held text does (the earliest
    stop string, nothing past it), and holds back less than the longest stop string."""
    g = torch.Generator().manual_seed(0)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (), generator=g))

    def word(n: int) -> str:
        return "".join("ab\n"[rand(0, 3)] for _ in range(n))

    for _ in range(1000):
        stops = [word(rand(1, 6)) for _ in range(rand(1, 5))]
        text, at, cuts = word(rand(0, 40)), 0, []
        while at < len(text):
            cuts.append(text[at:at + (n := rand(1, 5))])
            at += n
        ours, reference = StopText(stops), SearchStopText(stops)
        for piece in cuts:
            assert ours.feed(piece) == reference.feed(piece), (stops, cuts)
            assert len(ours.pending) < max(map(len, stops))
        assert ours.finish() == ("" if reference.stopped else reference.pending)


def test_a_long_stop_string_costs_no_more_per_token():
    """The matcher is linear: with four 64k-character stop strings that the text keeps almost matching, a token
    costs microseconds (the old prefix search took ~50 ms per token, for every request on the server)."""
    import time

    stops = ["a" * 65535 + c for c in "bcde"]
    cut = StopText(stops)
    t0 = time.perf_counter()
    released = "".join(cut.feed("aaaa") for _ in range(200))
    per_token = (time.perf_counter() - t0) / 200
    assert released == "" and per_token < 2e-3, per_token
    assert cut.feed("a" * 70000) == "a" * (800 + 70000 - 65535) and len(cut.pending) == 65535
