"""Speculative decoding inside the engine: a cheap drafter guesses a few tokens per row, the target checks them
all in one batched forward pass, and the output keeps the target's distribution exactly.

One engine step (`speculative_step`, which `Engine._decode_rows` calls when the engine has a drafter):
1. each running row may draft up to `draft_tokens`, fewer near its max_tokens; the drafter (`Drafter`, defined
   here once) proposes for every such row at once, told the target's state (`TargetState`);
2. the target runs ONE forward over [last, d1..dn] of every row through the cache's `Append` step. Rows with
   fewer drafts are padded by repeating their last token at its own position, so a pad writes the very
   key/value the real token wrote (same token, same position, same context) and never reaches past the row's
   real positions, let alone past the context (a full layer's slot is position % context);
3. per row, left to right: the distribution p_j the engine's own sampler would draw from after the accepted
   prefix (`Sampler.distributions`: penalties, bias, loop ban, temperature, truncation, processors, over the
   history including the earlier drafts) decides. A draft d_j is kept with probability p_j(d_j); on the first
   rejection a token is drawn from p_j with d_j removed and renormalised, and the row stops; if every draft is
   kept one more token is drawn from the next position. Drafts are deterministic (q is one-hot), for which this
   is the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023): every output token is distributed
   exactly as plain sampling's. Greedy rows are its one-hot case: the longest prefix the target agrees with,
   plus the target's own next token, exactly plain greedy's output. Plain greedy rows skip the sampler;
4. every token goes through the engine's `_accept` (stop tokens, stop strings, max_tokens, the loop guard), and
   a row that finishes takes no more; the target's cache and the drafter forget what was not kept.

What is not served speculatively (those rows decode one token, the engine's normal way, in the same forward):
a grammar constraint (its state advances only on accepted tokens, and p_j for j > 1 needs it advanced through
the drafts) and logprobs (reported per sampled position; not worth a second path). Penalties, logit bias, the
loop guard (its ban reads the history, drafts included; "stop" acts in `_accept`) and logits processors (pure
functions of logits and history, as their contract says) are served exactly. A row's first step after
its prefill also decodes one token, because the target's hidden state at the row's last position, which the
drafter contract hands over, comes only from a decode step (`Runtime.prefill` keeps none).

Randomness: seeded rows stay reproducible (the same seed and drafter give the same tokens), but they draw from
their generator in another order than plain sampling does, so the tokens differ from a plain run with that
seed; the distribution does not. The verification pass runs eagerly, outside the runtime's compiled steps and
head screen.

Counters (rounds, drafted, accepted: the acceptance rate) are per engine, read with `speculation_stats`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from gemmakit.cache import Append, Extend, KVCache, Prefill, span_for
from gemmakit.config import SLIDING
from gemmakit.model import Gemma
from gemmakit.runtime.plan import model_dtype_device
from gemmakit.sampling import argmax_rows, draw


@dataclass
class TargetState:
    """What the target tells a drafter each round, for the rows being drafted (in the order of `rows`).

    `hidden[i]` is the target's final-normed hidden state (what `Gemma.hidden` returns, the head's input) at
    `positions[i]`, the last position of row i that the target has fed; the token to draft after is the
    sequence's last token, not yet fed, at `positions[i] + 1`. `cache` is the target's KV cache, whose row
    `rows[i]` holds positions 0..positions[i] (a drafter that reads the target's keys, as Gemma 4's MTP
    drafter does, reads them there and must not write to it)."""

    rows: list[int]
    positions: list[int]
    hidden: torch.Tensor
    cache: KVCache


@runtime_checkable
class Drafter(Protocol):
    """What the engine needs from a drafter: cheap guesses at the target's next tokens, for several rows.

    A drafter may keep state per engine row (its own KV cache). It is given each row's whole sequence every
    round rather than only the new tokens, so it can catch up on what it has not seen (the target's own token
    after a rejected draft, several accepted ones). Guesses affect only speed: the target checks every one,
    and the output keeps the target's distribution exactly (greedy: exactly the target's tokens).
    """

    def propose(self, sequences: list[list[int]], k: int, target: TargetState) -> list[list[int]]:
        """Up to `k` (k >= 1) guesses for each row of `target.rows` of the tokens that follow sequences[i]
        (prompt and generated, the last one not yet fed to the target). Fewer guesses (even none) for a row is
        allowed; guesses past the k-th are ignored. Guesses are deterministic given the state (the acceptance
        rule treats each as a draft with probability one)."""
        ...

    def rollback(self, row: int, n: int) -> None:
        """Forget everything of `row` after its first `n` tokens: the drafts the target rejected. `n` may exceed
        what the drafter has seen; then nothing is forgotten."""
        ...

    def release(self, row: int) -> None:
        """The sequence in `row` finished; the row will hold an unrelated sequence next."""
        ...


@dataclass
class DraftStats:
    """What speculation did on one engine: `rounds` verification passes, `drafted` guesses checked, `accepted`
    of them kept, `tokens` produced by speculative steps (accepted drafts plus the target's own)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted / drafted (NaN before anything was drafted)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "acceptance": self.acceptance}


@dataclass
class _Speculation:
    """Per-engine state: the counters, and each row's target hidden state at its last kept position, tagged
    with the request id and that position (a row that changed hands or moved on does not match)."""

    stats: DraftStats = field(default_factory=DraftStats)
    hidden: dict[int, tuple[int, int, Tensor]] = field(default_factory=dict)


_STATE: weakref.WeakKeyDictionary[Any, _Speculation] = weakref.WeakKeyDictionary()


def _state(engine: Any) -> _Speculation:
    if engine not in _STATE:
        _STATE[engine] = _Speculation()
    return _STATE[engine]


def speculation_stats(engine: Any) -> DraftStats:
    """The speculation counters of `engine` (all zero for an engine that has not speculated)."""
    return _state(engine).stats


def check_draft_tokens(engine: Any) -> int:
    """The engine's `draft_tokens`, refused with the reason where the target's cache cannot verify that many:
    a chunk of k + 1 tokens per row needs k spare slots in every sliding-window ring (cache.py)."""
    k = engine.draft_tokens
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {k!r}")
    cache = engine.runtime.cache
    ring = cache.slots[SLIDING]
    if ring < cache.context and k > ring - cache.window:
        raise ValueError(f"draft_tokens={k} needs {k} spare slots in the KV cache's sliding-window rings, but the "
                         f"engine was built with slack={ring - cache.window}: build it with slack >= {k}, or "
                         "lower draft_tokens")
    vocab = getattr(engine.drafter, "vocab_size", None)
    if vocab is not None and vocab != engine.model.config.vocab_size:
        raise ValueError(f"the drafter's vocabulary ({vocab} tokens) is not the target's "
                         f"({engine.model.config.vocab_size}): a drafter must share the target's tokenizer")
    return k


def speculative_step(engine: Any, reqs: list[Any]) -> list[tuple[Any, int]]:
    """One decode step of `engine` over the running requests `reqs` (sorted by row) with its drafter: events as
    `Engine._take` returns them, one (request, token) per accepted token in order, (request, -1) for a failure."""
    k = engine.draft_tokens  # checked when the engine was built (check_draft_tokens)
    state = _state(engine)
    drafts = _propose(engine, state, reqs, k)
    hidden, logits = _verify(engine, reqs, drafts)
    state.stats.rounds += 1
    events: list[tuple[Any, int]] = []
    for i, req in enumerate(reqs):
        events += engine._guarded([req], lambda i=i, req=req: _settle(engine, state, req, drafts[i], hidden[i],
                                                                       logits[i]), "sampling failed")
    return events


def _budget(req: Any, k: int) -> int:
    """How many drafts `req` may have checked this step: none for rows the rule cannot serve exactly (see the
    module docstring), and never more than its max_tokens leaves (each step also yields the target's token)."""
    p = req.params
    if p.constraint is not None or p.logprobs is not None:
        return 0
    return max(0, min(k, p.max_tokens - len(req.tokens) - 1))


def _propose(engine: Any, state: _Speculation, reqs: list[Any], k: int) -> list[list[int]]:
    want = [_budget(r, k) for r in reqs]
    known = [state.hidden.get(r.row) for r in reqs]
    ask = [i for i, r in enumerate(reqs)
           if want[i] and known[i] is not None and known[i][:2] == (r.id, r.position - 1)]
    drafts: list[list[int]] = [[] for _ in reqs]
    if not ask:
        return drafts
    target = TargetState(rows=[reqs[i].row for i in ask], positions=[reqs[i].position - 1 for i in ask],
                         hidden=torch.stack([known[i][2] for i in ask]), cache=engine.runtime.cache)
    got = engine.drafter.propose([reqs[i].prompt + reqs[i].tokens for i in ask], max(want[i] for i in ask), target)
    if len(got) != len(ask):
        raise ValueError(f"the drafter returned guesses for {len(got)} rows, asked for {len(ask)}")
    vocab = engine.model.config.vocab_size
    for i, guesses in zip(ask, got, strict=True):
        guesses = [int(t) for t in list(guesses)[:want[i]]]
        if not all(0 <= t < vocab for t in guesses):
            raise ValueError(f"the drafter guessed token ids outside the target's vocabulary [0, {vocab}): "
                             f"{guesses}")
        drafts[i] = guesses
    return drafts


def _verify(engine: Any, reqs: list[Any], drafts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """The target over [last, d1..dn] of every row in one Append pass: hidden states [b, W, H], logits [b, W, V]."""
    width = 1 + max(len(d) for d in drafts)
    ids, pos = [], []
    for req, guesses in zip(reqs, drafts, strict=True):
        row_ids = [req.tokens[-1], *guesses]
        last = req.position + len(guesses)
        pad = width - len(row_ids)  # the last token again, at its own position: see the module docstring
        ids.append(row_ids + [row_ids[-1]] * pad)
        pos.append(list(range(req.position, last + 1)) + [last] * pad)
    dev = engine.device
    engine.runtime.select_adapters([r.adapter for r in reqs])
    rows = torch.tensor([r.row for r in reqs], device=dev)
    step = Append(torch.tensor(pos, device=dev), engine.runtime.cache, rows, len(reqs) == engine.max_batch,
                  span_for(pos))
    hidden = engine.model.hidden(torch.tensor(ids, device=dev), step=step)
    return hidden, engine.model.head(hidden)


def _settle(engine: Any, state: _Speculation, req: Any, drafts: list[int], hidden: Tensor, logits: Tensor
            ) -> list[tuple[Any, int]]:
    """Decide one row's tokens from its verified positions, accept them, and forget what was not kept."""
    top = logits[: len(drafts) + 1].amax(dim=-1).tolist()
    bad = next((j for j, t in enumerate(top) if not t > -math.inf), None)
    if bad is not None:  # a position with NaN logits: its tokens cannot be drawn, nor any after it
        drafts = drafts[: max(bad - 1, 0)]
    if not drafts:  # a normal decode step: the engine's own sampling (grammar, logprobs, NaN errors)
        events, kept = engine._sample([req], logits[:1]), 0
        tokens: list[int] = []
    else:
        tokens, kept = _choose(engine, req, drafts, logits[: len(drafts) + 1])
        events = []
        for token in tokens:
            events += engine._accept_all([req], [token], [None])
            if req.finished:
                break
    stats = state.stats
    stats.drafted, stats.accepted = stats.drafted + len(drafts), stats.accepted + kept
    stats.tokens += sum(1 for _, t in events if t >= 0)
    if req.finished:
        state.hidden.pop(req.row, None)
        return events
    keep = req.position - 1  # the last position whose key/value the target keeps
    engine.runtime.cache.rollback(req.row, keep)
    engine.drafter.rollback(req.row, keep + 1)
    state.hidden[req.row] = (req.id, keep, hidden[kept].clone())
    return events


def _choose(engine: Any, req: Any, drafts: list[int], logits: Tensor) -> tuple[list[int], int]:
    """The row's tokens this step and how many drafts they keep; logits [n + 1, V] after last, d1..dn."""
    if req.params.plain_greedy:
        choice = argmax_rows(logits.float()).tolist()
        kept = next((j for j, (d, c) in enumerate(zip(drafts, choice, strict=False)) if d != c), len(drafts))
        return drafts[:kept] + [choice[kept]], kept
    n, history = len(drafts), req.prompt + req.tokens
    probs = engine.sampler.distributions(logits, [req.params] * (n + 1),
                                         [history + drafts[:j] for j in range(n + 1)], [len(req.prompt)] * (n + 1))
    return accept_drafts(probs, drafts, req.generator)


def accept_drafts(probs: Tensor, drafts: list[int], generator: torch.Generator | None) -> tuple[list[int], int]:
    """The rejection rule for deterministic drafts: `probs` [n + 1, V] are the target's distributions after each
    accepted prefix (row j: after d1..dj). Keep d_j with probability probs[j - 1, d_j]; at the first rejection
    draw from probs[j - 1] without d_j; with all kept, draw one more from probs[n]. Returns (tokens, drafts kept);
    every token is distributed exactly as a draw from the target's distribution at its position."""
    for j, d in enumerate(drafts):
        p = probs[j]
        u = float(torch.rand((), generator=generator, device=p.device))
        if u < float(p[d]):
            continue
        residual = p.clone()
        residual[d] = 0.0
        token = draw(residual, generator)
        return drafts[:j] + [d if token is None else token], j  # None: no mass besides d, so d stands
    token = draw(probs[len(drafts)], generator)
    return drafts + [int(probs[len(drafts)].argmax()) if token is None else token], len(drafts)


class ModelDrafter:
    """A `Drafter`: a smaller Gemma of the same tokenizer drafting greedily for every row at once, with its own
    KV cache of `rows` rows (the engine's `max_batch`) and `context` positions (at least the engine's).

    It remembers, per row, the tokens it has fed, and each round feeds only what the sequence adds to them
    (what it fed that the sequence no longer holds is rolled back first, so a row that changed hands without a
    `release` starts over). New rows are prefilled alone; the few tokens other rows add go in one batched
    `Append` with the first guess. Guessing k tokens costs k batched forwards of the drafter."""

    def __init__(self, model: Gemma, rows: int, context: int, slack: int = 8, prefill_chunk: int = 512):
        dtype, self.device = model_dtype_device(model)
        self.model, self.slack, self.prefill_chunk = model, slack, prefill_chunk
        self.cache = KVCache(model.config, rows, context, dtype, self.device, slack)
        self.fed: list[list[int]] = [[] for _ in range(rows)]

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.inference_mode()
    def propose(self, sequences: list[list[int]], k: int, target: TargetState) -> list[list[int]]:
        if not 1 <= k <= self.slack:
            raise ValueError(f"a ModelDrafter built with slack={self.slack} drafts 1..{self.slack} tokens, "
                             f"asked for {k}")
        rows = list(target.rows)
        if max(len(seq) for seq in sequences) + k - 1 > self.cache.context:
            raise ValueError(f"drafting {k} tokens after {max(len(seq) for seq in sequences)} passes this drafter's "
                             f"context of {self.cache.context}: build it with the engine's context")
        if any(not 0 <= r < len(self.fed) for r in rows):
            raise ValueError(f"rows {rows} outside this drafter's {len(self.fed)} rows: build it with the "
                             "engine's max_batch")
        pending = [self._catch_up(row, seq) for row, seq in zip(rows, sequences, strict=True)]
        drafts: list[list[int]] = [[] for _ in rows]
        for _ in range(k):
            logits = self._feed(rows, pending)
            pending = [[t] for t in argmax_rows(logits.float()).tolist()]
            for d, (t,) in zip(drafts, pending, strict=True):
                d.append(t)
        return drafts  # the last guess is never fed: the next round feeds what the target kept

    def rollback(self, row: int, n: int) -> None:
        if n < len(self.fed[row]):
            del self.fed[row][n:]
            self.cache.rollback(row, n - 1)

    def release(self, row: int) -> None:
        self.fed[row] = []
        self.cache.clear([row])

    def _catch_up(self, row: int, seq: list[int]) -> list[int]:
        """Roll `row` back to what it shares with `seq`, feed alone what a batched Append cannot take, and
        return the tokens still to feed (at least the last)."""
        fed, same = self.fed[row], 0
        limit = min(len(fed), len(seq) - 1)
        while same < limit and fed[same] == seq[same]:
            same += 1
        self.rollback(row, same)
        if same == 0 or len(seq) - same > self.slack + 1:
            rows = torch.tensor([row], device=self.device)
            for start in range(same, len(seq) - 1, self.prefill_chunk):
                chunk = seq[start:min(start + self.prefill_chunk, len(seq) - 1)]
                pos = torch.arange(start, start + len(chunk), device=self.device)[None]
                step = (Prefill if start == 0 else Extend)(pos, self.cache, rows)
                self.model.hidden(torch.tensor([chunk], device=self.device), step=step, logits_to_keep=1)
            self.fed[row] = list(seq[:-1])
        return list(seq[len(self.fed[row]):])

    def _feed(self, rows: list[int], pending: list[list[int]]) -> Tensor:
        """Feed each row's pending tokens in one Append (padded as speculative_step pads); logits [b, V] after
        each row's last one."""
        width = max(len(p) for p in pending)
        ids, pos = [], []
        for row, tokens in zip(rows, pending, strict=True):
            start, pad = len(self.fed[row]), width - len(tokens)
            ids.append(tokens + [tokens[-1]] * pad)
            pos.append(list(range(start, start + len(tokens))) + [start + len(tokens) - 1] * pad)
            self.fed[row] += tokens
        step = Append(torch.tensor(pos, device=self.device), self.cache, torch.tensor(rows, device=self.device),
                      span=span_for(pos))
        hidden = self.model.hidden(torch.tensor(ids, device=self.device), step=step)
        last = torch.tensor([len(p) - 1 for p in pending], device=self.device)
        return self.model.head(hidden[torch.arange(len(rows), device=self.device), last])
