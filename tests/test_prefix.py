"""Prefix caching and paced prefill: a later prompt that starts like an earlier one reuses its keys/values and
gets the same tokens; a long prompt goes in over several steps while other rows keep decoding; the cache
stays within its memory budget and accounts for every byte.
Run: .venv/bin/python -m pytest tests/test_prefix.py
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.model import Gemma
from gemmakit.prefix import PrefixCache
from gemmakit.sampling import SamplingParams
from tests.helpers import WINDOW, assert_same_until_a_tie, hf_model, tiny

BLOCK = 4  # smaller than the tiny models' window, so reuse crosses ring buffers


@pytest.fixture(scope="module", params=["gemma3", "e2b"])
def model(request, tmp_path_factory) -> Gemma:
    path = tmp_path_factory.mktemp(request.param)
    hf_model(tiny(request.param)).save_pretrained(path)
    return load_model(path)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model: Gemma, cache: PrefixCache | bool, **kw) -> Engine:
    return Engine(model, max_batch=kw.pop("max_batch", 2), context=256, prefix_cache=cache, **kw)


def test_a_conversation_reuses_its_earlier_turns_and_gets_the_same_tokens(model):
    """Each turn resends the conversation so far (prompt, reply, a new message): with the prefix cache all but
    the new part comes from the cache, and the greedy tokens equal those of an engine without it."""
    params = SamplingParams(max_tokens=2 * WINDOW + 3)
    cached, plain = _engine(model, PrefixCache(1 << 30, BLOCK)), _engine(model, False)
    conversation, previous = _tokens(6 * WINDOW + 1, seed=1), 0
    for turn in range(3):
        got = cached.generate([conversation], params)[0]
        want = plain.generate([conversation], params)[0]
        assert got.tokens == want.tokens
        if turn == 0:
            assert got.cached_tokens == 0
        else:  # everything but the newest message and the unfinished block before it
            assert got.cached_tokens >= previous - BLOCK, (turn, got.cached_tokens, previous)
        previous = len(conversation) + len(got.tokens) - 1
        conversation = conversation + got.tokens + _tokens(5, seed=10 + turn)
    assert plain.prefix is None


def test_restored_prefix_gives_the_logits_of_a_full_prefill(model):
    """Logits after a prompt whose first part came from the cache match a prefill of the whole prompt."""
    prompt = _tokens(5 * WINDOW + 2, seed=2)
    params = SamplingParams(max_tokens=1, logprobs=5)
    cache = PrefixCache(1 << 30, BLOCK)
    engine = _engine(model, cache)
    engine.generate([prompt[:3 * WINDOW]], params)  # leaves its blocks behind
    got = engine.generate([prompt], params)[0]
    assert got.cached_tokens == 3 * WINDOW  # every block of the first prompt
    want = _engine(model, False).generate([prompt], params)[0]
    assert got.tokens == want.tokens
    a = torch.tensor([x for _, x in got.logprobs[0].top])
    b = torch.tensor([x for _, x in want.logprobs[0].top])
    assert torch.allclose(a, b, atol=1e-5)


def test_a_wrong_restore_is_caught(model):
    """The check above can fail: blocks stored under one prompt, handed to a different one, change the logits."""
    prompt = _tokens(4 * WINDOW, seed=3)
    cache = PrefixCache(1 << 30, BLOCK)
    engine = _engine(model, cache)
    engine.generate([prompt], SamplingParams(max_tokens=1))
    other = _tokens(4 * WINDOW, seed=4)
    for b in cache.blocks.values():  # poison: every stored block now claims to be `other`'s
        b.k = [torch.randn_like(k) for k in b.k]
    got = engine.generate([prompt], SamplingParams(max_tokens=1, logprobs=3))[0]
    want = _engine(model, False).generate([prompt], SamplingParams(max_tokens=1, logprobs=3))[0]
    assert got.cached_tokens > 0 and other != prompt
    assert got.logprobs[0].top != want.logprobs[0].top


def test_adapters_and_media_do_not_share_prefixes(model):
    cache = PrefixCache(1 << 30, BLOCK)
    prompt = _tokens(4 * WINDOW, seed=5)
    assert cache.match(prompt, namespace=0) == []
    engine = _engine(model, cache)
    engine.generate([prompt], SamplingParams(max_tokens=1))
    assert len(cache.match(prompt, namespace=-1)) == (len(prompt) // BLOCK)
    assert cache.match(prompt, namespace=0) == []  # another adapter's keys/values differ


def test_a_long_prompt_goes_in_while_a_stream_keeps_decoding(model):
    """A stream that is decoding gets a token at every step while a long prompt is prefilled over several of
    them, and both get the tokens they get alone."""
    params = SamplingParams(max_tokens=30, logprobs=2)
    short, long = _tokens(5, seed=6), _tokens(100, seed=7)
    # prefill_chunk caps what one step may prefill, so the pacing is seen whatever this machine's speed; the
    # E2B run paces without a prefix cache (no blocks to round chunks to)
    cache = PrefixCache(1 << 30, BLOCK) if model.config.hidden_size_per_layer_input == 0 else False
    engine = _engine(model, cache, prefill_chunk=8)
    # outlasts the long prompt's prefill; logprobs tell a tie to rounding (rows batched at other steps than
    # alone) from a wrong token
    first = engine.submit(short, SamplingParams(max_tokens=120, logprobs=2))
    engine.step()  # `first` is in and decoding
    second = engine.submit(long, params)
    steps_while_prefilling = 0
    while not second.tokens:
        before = len(first.tokens)
        engine.step()
        assert len(first.tokens) == before + 1  # never stalled
        steps_while_prefilling += 1
    assert steps_while_prefilling > 3  # the prompt went in over several steps
    while engine.has_work:
        engine.step()
    for req, prompt in ((first, short), (second, long)):
        alone = _engine(model, False, max_batch=1).generate([prompt], replace(req.params, logprobs=2))[0]
        assert_same_until_a_tie(req, alone, tol=1e-3, prefix=30)  # chunked otherwise: fp32 sums reordered


def test_budget_holds_under_a_long_random_workload():
    """Random prompts that share prefixes: the cache never exceeds its budget, its byte count is exactly its
    blocks' bytes, every block's parent is still stored, and clearing leaves nothing."""
    rng = random.Random(0)
    layers, kv = 3, (2, 8)
    per_block = layers * 2 * kv[0] * BLOCK * kv[1] * 4
    cache = PrefixCache(40 * per_block, BLOCK)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 60))] for _ in range(8)]
    for _ in range(400):
        tokens = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(0, 40))]
        namespace = rng.randrange(2)
        have = len(cache.match(tokens, namespace)) * BLOCK
        kvs = [(torch.randn(kv[0], len(tokens) - have, kv[1]),) * 2 for _ in range(layers)]
        cache.store(tokens, namespace, have, kvs)
        assert cache.nbytes <= cache.budget
        assert cache.nbytes == sum(b.nbytes for b in cache.blocks.values())
        ids = {b.id for b in cache.blocks.values()}
        assert all(b.parent is None or b.parent.id in ids for b in cache.blocks.values())
        children = {}
        for b in cache.blocks.values():
            if b.parent is not None:
                children[b.parent.id] = children.get(b.parent.id, 0) + 1
        assert all(b.children == children.get(b.id, 0) for b in cache.blocks.values())
    assert cache.stats.evicted_blocks > 0 and cache.stats.hit_tokens > 0
    cache.clear()
    assert cache.nbytes == 0 and not cache.blocks
