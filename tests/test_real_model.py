"""The real Gemma 3 270M (the embedded default GGUF): gemmakit against transformers loading the same file.

Slow (transformers needs about a minute to read a GGUF; tests.helpers keeps what it read for later runs), so
marked `slow`; skipped if the default model package is not installed.
Run: .venv/bin/python -m pytest tests/test_real_model.py
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.sampling import SamplingParams
from gemmakit.tokenizer import Tokenizer
from tests.helpers import transformers_from_gguf

pytestmark = pytest.mark.slow

PASSAGE = (
    "The history of astronomy is the story of how people came to understand the sky. Early farmers watched "
    "the rising of bright stars to know when to plant, sailors steered by the pole star, and priests kept "
    "calendars by the phases of the moon. In ancient Greece, thinkers proposed that the earth was a sphere and "
    "even estimated its size. Centuries later, Copernicus placed the sun at the centre, Kepler found that "
    "planets move on ellipses, and Galileo turned a telescope to Jupiter and saw its moons. Newton then "
    "explained all of it with one law of gravitation, and the modern age of physics began."
)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Water boils at a temperature of",
           "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gguf_path(default_model):
    return default_model


@pytest.fixture(scope="module")
def reference(gguf_path):
    return transformers_from_gguf(gguf_path, "model")


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_model(gguf_path), Tokenizer.from_gguf(gguf_path)


def test_logits_match_transformers_on_128_tokens(reference, ours):
    """fp32 logits on a 128-token real-text prompt agree with transformers to 1e-3 at every position."""
    model, tok = ours
    ids = torch.tensor([tok.encode(PASSAGE + "\n\n" + PASSAGE)[:128]])
    assert ids.shape[1] == 128
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().amax(dim=-1)
    assert diff.max() <= 1e-3, diff


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuations_equal_transformers(reference, ours, prompt):
    """32 greedy tokens from gemmakit's engine (prefill + cached decode) equal transformers' generate()."""
    model, tok = ours
    ids = tok.encode(prompt)
    got = list(Engine(model, max_batch=1, context=256).stream(ids, SamplingParams(max_tokens=32)))
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, min_new_tokens=32)
    assert got == out[0, len(ids):].tolist()
