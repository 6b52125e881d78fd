"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them all in one forward pass.

Round by round, with the target's cache holding the context up to the last token it produced:
1. the drafter proposes d1..dk after `last`;
2. the target runs once over [last, d1..dk] (positions p..p+k), giving its own greedy choice after each;
3. the longest prefix of drafts the target agrees with is kept, plus the target's own next token, so every
   round yields at least one token and the output is exactly what plain greedy decoding of the target gives;
4. keys/values of rejected drafts are rolled back (the cache forgets positions past the kept ones; the
   sliding-window rings have `slack` spare slots so writing a rejected chunk never overwrote a needed key).

The drafter contract is `Drafter` below, defined here once: `propose(tokens, k)` and `rollback(n)`.
`ModelDrafter` (a small model of the same tokenizer with its own cache) is one; Gemma 4's MTP heads can be
another by implementing the same two methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from gemmakit.cache import Append, KVCache, Prefill
from gemmakit.model import Gemma
from gemmakit.runtime.plan import model_dtype_device


@runtime_checkable
class Drafter(Protocol):
    """What `speculative_generate` needs from a drafter: cheap guesses at the target's next tokens.

    A drafter may keep state (a KV cache) about the tokens it has seen. It is told the whole sequence at every
    round rather than only the new tokens, so it can catch up on what it has not seen (the target's own token
    after a rejected draft, or several accepted ones), and is told how much of what it has seen still stands.
    Its guesses affect only speed: the target checks every one, and greedy output is exactly the target's.
    """

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` (k >= 1) guesses of the tokens that follow `tokens`, in order.

        `tokens` is the whole sequence so far (prompt and generated); it extends, by at least one token, what
        the drafter kept at the last `rollback`. Fewer than k guesses (even none) is allowed: the round then
        verifies fewer; guesses past the k-th are ignored."""
        ...

    def rollback(self, n: int) -> None:
        """Forget everything after the first `n` tokens of the sequence: the drafts the target rejected.

        `n` may exceed what the drafter has seen (every draft accepted, plus the target's next token): then
        nothing is forgotten, and the next `propose` catches up."""
        ...


class CachedRunner:
    """One sequence on one model with its own cache: prefill once, then append chunks and roll back."""

    def __init__(self, model: Gemma, context: int, slack: int):
        self.model = model
        dtype, self.device = model_dtype_device(model)
        self.cache = KVCache(model.config, 1, context, dtype, self.device, slack)
        self.fed: list[int] = []
        self.row = torch.tensor([0], device=self.device)

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Run `tokens` after what was fed before; logits [len(tokens), V]."""
        ids = torch.tensor([list(tokens)], device=self.device)
        pos = torch.arange(len(self.fed), len(self.fed) + len(tokens), device=self.device)[None]
        step = (Prefill if not self.fed else Append)(pos, self.cache, self.row)
        self.fed += tokens
        return self.model(ids, step=step)[0]

    def rollback(self, n: int) -> None:
        self.cache.rollback(0, n - 1)
        del self.fed[n:]


class ModelDrafter:
    """A `Drafter`: a small model of the same tokenizer, drafting greedily (exactly k guesses), with its own
    cache of the tokens it has been fed."""

    def __init__(self, model: Gemma, context: int, slack: int = 16):
        self.runner = CachedRunner(model, context, slack)

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        logits = self.runner.feed(list(tokens[len(self.runner.fed):]))
        drafts = [int(logits[-1].argmax())]
        while len(drafts) < k:
            drafts.append(int(self.runner.feed([drafts[-1]])[-1].argmax()))
        return drafts

    def rollback(self, n: int) -> None:
        self.runner.rollback(min(n, len(self.runner.fed)))


@torch.inference_mode()
def speculative_generate(target: Gemma, drafter: Drafter, prompt: Sequence[int], max_tokens: int, k: int = 4,
                         stop_ids: Sequence[int] = (), stats: dict | None = None) -> Iterator[int]:
    """Greedy tokens of `target` after `prompt`, identical to plain greedy decoding, drafted `k` at a time."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    context = len(prompt) + max_tokens + k + 1
    runner = CachedRunner(target, context, slack=k + 1)
    last = int(runner.feed(list(prompt))[-1].argmax())
    tokens, produced, rounds = list(prompt), 0, 0
    while True:
        if last in stop_ids:
            return
        yield last
        tokens.append(last)
        produced += 1
        if produced >= max_tokens:
            break
        want = min(k, max_tokens - produced)
        drafts = [int(d) for d in drafter.propose(tokens, want)][:want]  # Drafter: at most `want` guesses
        choice = runner.feed([last, *drafts]).argmax(-1).tolist()  # target's pick after last, d1, ..., dk
        n = next((i for i, (d, c) in enumerate(zip(drafts, choice, strict=False)) if d != c), len(drafts))
        rounds += 1
        for d in drafts[:n]:
            if d in stop_ids or produced >= max_tokens:
                break
            yield d
            tokens.append(d)
            produced += 1
        runner.rollback(len(tokens))
        drafter.rollback(len(tokens))
        last = choice[n] if produced < max_tokens and not set(drafts[:n]) & set(stop_ids) else None
        if last is None:
            break
    if stats is not None:
        stats.update(rounds=rounds, produced=produced)
