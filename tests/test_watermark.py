"""SynthID-style watermarking: the keyed bits, the tournament (a distribution that stays one and is unbiased over
keys), detection from the tokenizer and keys alone, and the engine generating marked text from the real 270M
that the detector tells apart from unmarked text, also after light edits.
Run: .venv/bin/python -m pytest tests/test_watermark.py
"""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch

from gemmakit.safety.watermark import (
    WatermarkConfig,
    WatermarkProcessor,
    context_hash,
    detect,
    g_values,
    repeats_context,
    tilt,
)
from gemmakit.sampling import Sampler, SamplingParams, make_generator

CONFIG = WatermarkConfig(keys=tuple(range(101, 131)), ngram_len=5)


def test_g_values_are_deterministic_balanced_and_keyed():
    tokens = torch.arange(20000)
    g = g_values(CONFIG, context_hash([5, 6, 7, 8]), tokens)
    assert g.shape == (20000, 30) and set(g.unique().tolist()) == {0, 1}
    assert torch.equal(g, g_values(CONFIG, context_hash([5, 6, 7, 8]), tokens))
    assert abs(g.float().mean().item() - 0.5) < 0.01
    other = g_values(WatermarkConfig(keys=tuple(range(201, 231))), context_hash([5, 6, 7, 8]), tokens)
    assert (g != other).float().mean().item() == pytest.approx(0.5, abs=0.02)  # other keys: unrelated bits
    assert (g != g_values(CONFIG, context_hash([5, 6, 7, 9]), tokens)).float().mean() > 0.45  # context matters


def test_the_tournament_keeps_a_distribution_and_is_unbiased_over_keys():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(50), 0)
    probs[40:] = 0  # a top-k cut: dropped tokens stay dropped
    probs /= probs.sum()
    history = [1, 2, 3, 4, 9]
    tilted = tilt(CONFIG, probs, history, prompt_len=4)
    assert tilted.sum().item() == pytest.approx(1.0, abs=1e-6) and (tilted[40:] == 0).all()
    assert not torch.allclose(tilted, probs)
    mean = torch.stack([tilt(WatermarkConfig(keys=tuple(random.Random(s).randrange(2**62) for _ in range(30))),
                             probs, history, 4) for s in range(300)]).mean(0)
    assert (mean - probs).abs().max() < 0.02  # E_keys[tilted] = p: the watermark does not change what is likely
    assert torch.equal(tilt(CONFIG, probs, history + [1, 2, 3, 4], prompt_len=4), probs)  # repeated context


def test_repeated_context_masking_agrees_between_generation_and_detection():
    """The sampler's vectorised n-gram check and the detector's hash window skip exactly the same steps: a text
    generated with a short window, scored token by token, is masked where the generator left it untilted."""
    config = WatermarkConfig(keys=(1, 2, 3), ngram_len=3, history=6)
    rng = random.Random(1)
    ids = [rng.randrange(4) for _ in range(300)]  # 4 symbols: contexts repeat often, in and out of the window
    start = 2
    untilted = [repeats_context(config, ids[:t], start) for t in range(start, len(ids))]
    hashes = [context_hash(ids[t - 2:t]) for t in range(start, len(ids))]
    by_hash = [h in hashes[max(0, i - 6):i] for i, h in enumerate(hashes)]  # the definition, spelled out
    assert untilted == by_hash and 20 < sum(untilted) < 280
    assert detect(config, ids).tokens == untilted.count(False)


def test_detection_on_synthetic_text():
    rng = random.Random(0)
    plain = [rng.randrange(1000, 30000) for _ in range(300)]
    found = detect(CONFIG, plain)
    assert found.p_value > 1e-3 and abs(found.score - 0.5) < 0.03 and found.tokens == 296
    marked, gen = [rng.randrange(1000, 30000) for _ in range(4)], torch.Generator().manual_seed(0)
    for _ in range(200):  # a toy LM: uniform over 64 tokens, sampled through the tournament
        probs = torch.zeros(30000)
        probs[torch.randint(1000, 30000, (64,), generator=gen)] = 1 / 64
        p = tilt(CONFIG, probs / probs.sum(), marked, prompt_len=4)
        marked.append(int(torch.multinomial(p, 1, generator=gen)))
    found = detect(CONFIG, marked[4:])
    assert found.score > 0.6 and found.p_value < 1e-12
    assert detect(CONFIG, [7, 8, 9, 10] * 50).tokens == 4  # a repeated context is scored once


def test_greedy_rows_cannot_be_watermarked():
    with pytest.raises(ValueError, match="a watermark needs sampling"):
        SamplingParams(temperature=0.0, logits_processors=(WatermarkProcessor(CONFIG),)).validate()


def test_the_sampler_draws_from_the_tilted_distribution_it_is_handed():
    """The watermark reaches the sampler only as a logits processor: a marked row draws what a race over
    tilt(softmax(tempered, truncated logits)) draws with the same seed; an unmarked row in the same batch is
    untouched."""
    torch.manual_seed(0)
    logits = torch.randn(2, 300)
    history = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10]]
    marked = SamplingParams(temperature=0.8, top_k=40, seed=3, logits_processors=(WatermarkProcessor(CONFIG),))
    plain = SamplingParams(temperature=0.8, top_k=40, seed=3)
    sampler = Sampler(300)
    for _ in range(20):  # several steps: the history grows as the sampler's caller would grow it
        gens = [make_generator(3, "cpu"), make_generator(3, "cpu")]
        tokens, _ = sampler.sample(logits, [marked, plain], history, [4, 4], gens)
        z = logits / 0.8
        z = z.masked_fill(z < z.topk(40).values[:, -1:], -math.inf)
        expected = Sampler._race(tilt(CONFIG, z[0].softmax(-1), history[0], 4), make_generator(3, "cpu"))
        assert int(tokens[0]) == int(expected)
        assert int(tokens[1]) == int(Sampler._race(z[1].softmax(-1), make_generator(3, "cpu")))
        history = [h + [int(t)] for h, t in zip(history, tokens, strict=True)]


def test_the_front_ends_hand_the_watermark_in(tmp_path):
    """`gemmakit generate --watermark KEYS` and the API's `watermark=` (keys or a key file) become the
    sampler's logits processor; nothing else turns a watermark on."""
    import json
    from types import SimpleNamespace

    from gemmakit.api import LLM
    from gemmakit.cli import build_parser, sampling_of

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": list(CONFIG.keys), "ngram_len": 5}))
    args = build_parser().parse_args(["generate", "x", "--temperature", "1", "--watermark", str(keys)])
    assert sampling_of(args)["logits_processors"] == (WatermarkProcessor(CONFIG),)
    fake = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vocab_size=300)))
    for given in (CONFIG, str(keys)):
        p = LLM.params(fake, [1], watermark=given, temperature=1.0)
        assert p.logits_processors == (WatermarkProcessor(CONFIG),) and p.stop_token_ids == (1,)
    assert LLM.params(fake, [1], temperature=1.0).logits_processors == ()


@pytest.fixture(scope="module")
def llm(default_model):
    import gemmakit

    return gemmakit.load(default_model, context=512)


@pytest.mark.slow
def test_the_270m_writes_text_the_detector_finds_even_after_edits(llm):
    from gemmakit.engine import Engine

    engine = Engine(llm.model, llm.tokenizer, max_batch=4, context=512)
    prompts = [llm.tokenizer.encode(p) for p in ("The history of the city", "My favourite recipe is",
                                                  "Scientists have discovered", "Once upon a time")]
    out = {}
    for marked in (False, True):
        params = [SamplingParams(max_tokens=80, temperature=1.0, top_k=64, seed=i, stop_token_ids=(1,),
                                 logits_processors=(WatermarkProcessor(CONFIG),) if marked else ()) for i in range(4)]
        out[marked] = [llm.tokenizer.decode(r.tokens) for r in engine.generate(prompts, params)]
    score = lambda text: detect(CONFIG, llm.tokenizer.encode(text, add_bos=False), skip=(1,))  # noqa: E731
    assert all(score(t).p_value > 1e-4 for t in out[False])
    assert all(score(t).p_value < 1e-6 for t in out[True])
    rng = random.Random(0)
    for text in out[True]:  # one word in ten replaced
        words = text.split(" ")
        for i in rng.sample(range(len(words)), len(words) // 10):
            words[i] = rng.choice(["house", "blue", "quickly", "seven", "river"])
        assert score(" ".join(words)).p_value < 1e-3


def test_the_watermark_command(tmp_path):
    keys = tmp_path / "keys.json"
    made = subprocess.run([sys.executable, "-m", "gemmakit.cli", "watermark", "keys", str(keys)],
                          capture_output=True, text=True)
    assert made.returncode == 0 and keys.is_file()
    assert keys.stat().st_mode & 0o777 == 0o600  # a secret: not published with the umask's read bits
    again = subprocess.run([sys.executable, "-m", "gemmakit.cli", "watermark", "keys", str(keys)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "never overwritten" in again.stderr
