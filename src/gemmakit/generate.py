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
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from the logits of one position, [V]."""
    if s.temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


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
