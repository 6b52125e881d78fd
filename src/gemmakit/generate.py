"""Single-sequence generation: prefill the prompt into a preallocated KV cache, then decode one token at a time.

This is the small, obviously-correct loop that `gemmakit generate` runs on; the batched engine with rolling
caches, the full set of samplers and speculative decoding builds on the same `Gemma.forward(ids, input_pos)`.
Greedy unless a temperature is given; a seed makes sampling reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gemmakit.model import Gemma


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from the logits of one position, [V]."""
    if s.temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None and s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token if the mass before it is still short of top_p: the most likely token always stays
        drop = sorted_probs.cumsum(0) - sorted_probs >= s.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def check_fits(model: Gemma, n_prompt: int, max_tokens: int) -> None:
    """Refuse, with the numbers, a request that cannot fit the model's context."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty; give at least one token")
    limit = model.config.max_position_embeddings
    if n_prompt + max_tokens > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                         f"context of {limit} tokens; shorten the prompt or lower --max-tokens")


@torch.inference_mode()
def generate(model: Gemma, prompt: Sequence[int], s: Sampling, stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded) or `s.max_tokens`."""
    s.validate()
    check_fits(model, len(prompt), s.max_tokens)
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    model.setup_cache(1, len(prompt) + s.max_tokens)
    try:
        ids = torch.tensor([list(prompt)], device=device)
        logits = model(ids, torch.arange(len(prompt), device=device), logits_to_keep=1)
        for pos in range(len(prompt), len(prompt) + s.max_tokens):
            token = sample(logits[0, -1], s, generator)
            if token in stop_ids:
                return
            yield token
            if pos + 1 < len(prompt) + s.max_tokens:
                logits = model(torch.tensor([[token]], device=device), torch.tensor([pos], device=device))
    finally:
        model.clear_cache()


class StopText:
    """Cuts streamed text at the first stop string, holding back any tail that could still become one.

    Stop strings may span tokens ("\nUser:" arrives as "\n", "User", ":"), so a piece is only released
    once no stop string can start inside it.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
