"""The drafter contract (speculative.Drafter): ModelDrafter keeps it, and speculative_generate accepts any
drafter that keeps it, including ones that guess fewer than k tokens, none, or wrong ones."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.model import Gemma
from gemmakit.sampling import SamplingParams
from gemmakit.speculative import Drafter, ModelDrafter, speculative_generate
from tests.helpers import hf_model, tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Gemma:
    path = tmp_path_factory.mktemp("gemma3")
    hf_model(tiny("gemma3")).save_pretrained(path)
    return load_model(path)


class Scripted:
    """A drafter that guesses from a fixed continuation, `size(k)` tokens at a time, and records its calls."""

    def __init__(self, prompt_len: int, continuation: list[int], size, wrong_every: int = 0):
        self.prompt_len, self.continuation, self.size, self.wrong_every = prompt_len, continuation, size, wrong_every
        self.calls: list[tuple[int, int]] = []
        self.kept: list[int] = []

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        assert k >= 1 and len(tokens) > len(self.kept)  # the contract: at least one new token each round
        self.calls.append((len(tokens), k))
        start = len(tokens) - self.prompt_len
        guesses = self.continuation[start:start + self.size(k)]
        if self.wrong_every:
            guesses = [(g + 1) % 1000 if (start + i) % self.wrong_every == 0 else g for i, g in enumerate(guesses)]
        self.kept = list(tokens)
        return guesses

    def rollback(self, n: int) -> None:
        assert n >= 1
        del self.kept[n:]


@pytest.mark.parametrize("size,wrong_every", [(lambda k: k, 0), (lambda k: 1, 0), (lambda k: 0, 0),
                                              (lambda k: k + 5, 0), (lambda k: k, 3)])
def test_any_drafter_that_keeps_the_contract_gives_plain_greedy(model, size, wrong_every):
    prompt = torch.randint(0, 1000, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    plain = Engine(model, max_batch=1, context=128).generate([prompt], SamplingParams(max_tokens=15))[0].tokens
    drafter = Scripted(len(prompt), plain, size, wrong_every)
    assert isinstance(drafter, Drafter)
    stats: dict = {}
    assert list(speculative_generate(model, drafter, prompt, max_tokens=15, k=4, stats=stats)) == plain
    assert stats["produced"] == 15 and all(k <= 4 for _, k in drafter.calls)


def test_model_drafter_is_a_drafter(model):
    assert isinstance(ModelDrafter(model, context=64), Drafter)
