"""Batched sampling for the generation engine: one call per decode step, each row with its own parameters.

The engine hands over the last-position logits of B sequences, [B, V], and gets back B token ids (plus logprobs
where asked). Everything here supersedes `generate.Sampling` / `generate.sample`; the shared field names
(max_tokens, temperature, top_k, top_p, seed) mean the same, so callers can switch by renaming the class.

Order of processing, per row, in float32 (HF and vLLM use the same order):
1. penalties: repetition (CTRL/HF: a seen logit is divided by the penalty when positive, multiplied when not;
   "seen" = prompt + generated), then frequency and presence (OpenAI: over generated tokens only);
2. logit_bias, added to the logits (-inf bans a token; +100 all but forces one);
3. loop guard "penalize": if the generated tail is a loop, ban the one token that would extend it;
   -> these are the "processed logits": greedy rows (temperature 0) take their argmax, and logprobs are read
   from their log_softmax (so reported logprobs reflect penalties and bias but not temperature or truncation,
   and mean the same thing at every temperature, greedy included);
4. temperature, then top-k, top-p, min-p on the tempered distribution;
5. the row's logits processors (`SamplingParams.logits_processors`, e.g. safety/watermark.py's watermark),
   in order, on those tempered and truncated logits; then a draw from their softmax.

Notable choices:
- top-k keeps every token tied with the k-th (value threshold, as `generate.sample` does); top-p keeps a token
  while the mass before it is still short of top_p, so the most likely token always stays; top-p sees the
  distribution renormalised after top-k; min-p drops p < min_p * p_max.
- The draw is an exponential race, argmax(p / q) with q ~ Exp(1) (as gpt-fast does), run over the tokens
  the row keeps: each row's noise comes from its own generator, one draw per kept token in id order, so a
  seeded row gives the same tokens whatever else is in the batch. Rows without a generator draw from torch's
  default RNG.
- A row whose processing bans every token falls back to its raw logits rather than failing the whole batch.
- Numbers stay finite in float32: bias and repetition penalty are bounded (MAX_BIAS, MIN/MAX_PENALTY),
  temperatures below 0.01 sample at 0.01, and a row whose draw logits are still no distribution (+inf from a
  processor, NaN) falls back to `_last_resort` instead of drawing from NaNs. NaN in the model's own logits
  is the caller's to catch: the engine ends that request with an error.
- Loop detection (`find_loop`) looks at generated tokens only, so a repetitive prompt never trips it.

What this file does not do: know about any particular processor (the front end that enables one hands it
in; the sampler only calls it), stop strings (the engine applies them on text; they are only carried and checked
here) or keeping counts across steps (they are rebuilt from `history` each step, only for rows that use a
penalty).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

LOOP_GUARDS = ("off", "stop", "penalize")
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# Ranges that keep every processed logit finite in float32: a bias of 1e39 is +inf there (and -inf + inf is
# NaN), and a repetition penalty of 1e-38 divides a logit into +inf. The bias range is OpenAI's.
MAX_BIAS = 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
# Temperatures in (0, MIN_TEMPERATURE) sample at MIN_TEMPERATURE, as vLLM does: dividing by less overflows.
MIN_TEMPERATURE = 0.01


class LogitsProcessor(Protocol):
    """Reshapes the distribution one sampled row draws its next token from; handed to the sampler in
    `SamplingParams.logits_processors` (safety/watermark.py's `WatermarkProcessor` is one).

    Called once per sampled step of a row with temperature > 0 (greedy rows take the argmax of the processed
    logits and never reach it), after penalties, bias, temperature and top-k / top-p / min-p:

    - `logits`: [V] float32, the row's tempered logits, -inf for every token the truncation dropped;
    - `tokens`: the row's prompt followed by the tokens generated so far;
    - `prompt_len`: how many of `tokens` are the prompt.

    Returns new [V] logits (-inf bans a token); the draw uses their softmax, so any additive constant is
    irrelevant. A processor must not modify `logits` in place, and must be safe to share: one instance may
    serve every row of a batch and every choice of a request. An optional `name` attribute ("a watermark")
    names it in error messages.
    """

    def __call__(self, logits: Tensor, tokens: Sequence[int], prompt_len: int) -> Tensor: ...


class ContextOverflow(ValueError):
    """A request whose prompt + max_tokens does not fit the context (see fit_context)."""


def fit_context(n_prompt: int, max_tokens: int | None, context: int) -> int:
    """The one rule for whether a request fits a context of `context` tokens: the prompt and every token it
    may generate must fit. Returns `max_tokens`, or with None all the room the prompt leaves; raises
    ContextOverflow (a ValueError) with the numbers and what to do otherwise. Used by Engine.submit, api.LLM
    and the server, so all three refuse the same requests with the same words."""
    if max_tokens is None:
        if n_prompt >= context:
            raise ContextOverflow(f"prompt ({n_prompt} tokens) leaves no room to generate in the context of "
                                  f"{context} tokens; shorten the prompt")
        return context - n_prompt
    if n_prompt + max_tokens > context:
        raise ContextOverflow(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                              f"{context} tokens; shorten the prompt or lower max_tokens")
    return max_tokens


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (argmax of the processed logits: penalties and bias still apply)
    top_k: int | None = None  # None = off
    top_p: float | None = None  # nucleus, in (0, 1]; None or 1 = off
    min_p: float | None = None  # drop tokens with p < min_p * p_max; None or 0 = off
    repetition_penalty: float = 1.0  # CTRL/HF, over prompt + generated; 1 = off
    presence_penalty: float = 0.0  # OpenAI, over generated tokens: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI, over generated tokens: logit -= frequency * count
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit; -inf bans the token
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: the engine applies them on the text
    logprobs: int | None = None  # None: none; 0: the chosen token's logprob; k > 0: also the top k alternatives
    # Gemma 4 can collapse into repeating itself on long generations. "stop" ends the sequence (finish_reason
    # "loop", see Sampler.loop_detected); "penalize" bans the token that would extend the loop. A loop is a
    # generated tail made of one block of loop_min_period..loop_max_period tokens repeated at least
    # loop_min_repeats times and spanning at least loop_min_span tokens: the span floor keeps short periods
    # from firing on legitimate runs (Gemma splits numbers into digits: "1000000" is six "0"s in a row), while
    # long periods still fire after 4 repeats. Raise loop_min_span for code, where literal runs are common.
    loop_guard: str = "off"
    loop_min_period: int = 1
    loop_max_period: int = 64
    loop_min_repeats: int = 4
    loop_min_span: int = 32
    # A grammar the output must follow (constrain.Constraint: JSON schema, Lark); the engine masks the logits
    # with it before this sampler runs (unless it says it is `dormant` this step), tells it every kept token, and
    # stops the request when the grammar is complete.
    constraint: Any = None
    # Processors of a sampled row's distribution, applied in order just before the draw (see LogitsProcessor):
    # how a watermark (safety/watermark.WatermarkProcessor) plugs in. Need temperature > 0.
    logits_processors: tuple[LogitsProcessor, ...] = ()

    @property
    def plain_greedy(self) -> bool:
        """The token is the argmax of the raw logits and nothing else reads them (screen.py relies on it)."""
        return (self.temperature == 0.0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias and self.loop_guard != "penalize"
                and self.logprobs is None and not self.constrained and not self.logits_processors)

    @property
    def constrained(self) -> bool:
        """A grammar masks this step's logits: a constraint that is not `dormant` (the tool-call constraint of
        `auto` mode sleeps until the model opens a call)."""
        return self.constraint is not None and not getattr(self.constraint, "dormant", False)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first out-of-range field; give vocab_size to also check token ids."""
        for ok, message in [*self._number_checks(), *self._token_checks(vocab_size), *self._loop_checks()]:
            if not ok:
                raise ValueError(message)

    def _number_checks(self) -> list[tuple[bool, str]]:
        p = self
        return [
            (_is_int(p.max_tokens) and p.max_tokens >= 1, f"max_tokens must be at least 1, got {p.max_tokens}"),
            (0.0 <= p.temperature <= 100.0, f"temperature must be in [0, 100] (0 = greedy), got {p.temperature}"),
            (p.top_k is None or (_is_int(p.top_k) and p.top_k >= 1),
             f"top_k must be at least 1 (None disables it), got {p.top_k}"),
            (p.top_p is None or 0.0 < p.top_p <= 1.0, f"top_p must be in (0, 1] (None disables it), got {p.top_p}"),
            (p.min_p is None or 0.0 <= p.min_p <= 1.0, f"min_p must be in [0, 1] (None disables it), got {p.min_p}"),
            (MIN_PENALTY <= p.repetition_penalty <= MAX_PENALTY,
             f"repetition_penalty must be in [{MIN_PENALTY}, {MAX_PENALTY}] (1 = off), got {p.repetition_penalty}"),
            (-2.0 <= p.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {p.presence_penalty}"),
            (-2.0 <= p.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}"),
            (p.logprobs is None or (_is_int(p.logprobs) and 0 <= p.logprobs <= MAX_LOGPROBS),
             f"logprobs must be in [0, {MAX_LOGPROBS}] (None disables it), got {p.logprobs}"),
            (p.seed is None or (_is_int(p.seed) and -(2**63) <= p.seed < 2**64),
             f"seed must be an integer in [-2**63, 2**64), got {p.seed!r}"),
            (all(callable(f) for f in p.logits_processors),
             f"logits_processors must be callables (logits, tokens, prompt_len) -> logits, got "
             f"{p.logits_processors!r}"),
            (not p.logits_processors or p.temperature > 0.0,
             f"{_processor_name(p.logits_processors)} needs sampling: set temperature > 0 (greedy decoding takes "
             "the most likely token, so there is no distribution to reshape)"),
        ]

    def _token_checks(self, vocab_size: int | None) -> list[tuple[bool, str]]:
        limit = vocab_size if vocab_size is not None else math.inf
        bias = self.logit_bias or {}
        bad_ids = [t for t in [*bias, *self.stop_token_ids] if not (_is_int(t) and 0 <= t < limit)]
        bad_bias = {t: b for t, b in list(bias.items())[:10] if not (-MAX_BIAS <= b <= MAX_BIAS or b == -math.inf)}
        return [
            (not bad_ids, f"token ids in logit_bias and stop_token_ids must be in [0, {limit}), got {bad_ids[:10]}"),
            (not bad_bias, f"logit_bias values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}] (or -inf, which bans a "
                           f"token), got {bad_bias}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}"),
        ]

    def _loop_checks(self) -> list[tuple[bool, str]]:
        p = self
        return [
            (p.loop_guard in LOOP_GUARDS, f"loop_guard must be one of {LOOP_GUARDS}, got {p.loop_guard!r}"),
            (p.loop_min_period >= 1, f"loop_min_period must be at least 1, got {p.loop_min_period}"),
            (p.loop_max_period >= p.loop_min_period,
             f"loop_max_period ({p.loop_max_period}) must be at least loop_min_period ({p.loop_min_period})"),
            (p.loop_min_repeats >= 2, f"loop_min_repeats must be at least 2, got {p.loop_min_repeats}"),
            (p.loop_min_span >= 0, f"loop_min_span must be at least 0, got {p.loop_min_span}"),
        ]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _processor_name(processors: Sequence[Any]) -> str:
    return next((name for f in processors if (name := getattr(f, "name", None))), "a logits processor")


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled position, from the processed distribution (after penalties and bias, before
    temperature and truncation). `top` is the k most likely tokens, most likely first; it may include `token`."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for one request on the logits' device; None (torch's default RNG) when there is no seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def find_loop(tokens: Sequence[int], min_period: int, max_period: int, min_repeats: int,
              min_span: int = 0) -> int | None:
    """The smallest period p in [min_period, max_period] such that the last max(min_repeats * p, min_span)
    tokens are one block of p tokens repeated, else None."""
    if min_period < 1 or min_repeats < 2:
        raise ValueError(f"a loop needs min_period >= 1 and min_repeats >= 2, got {min_period}, {min_repeats}")
    # only the longest span can matter: copying just that keeps a check on a long generation cheap
    tokens = list(tokens[-max(min_repeats * max_period, min_span):])
    n = len(tokens)
    for p in range(min_period, max_period + 1):
        span = max(min_repeats * p, min_span)
        if span > n:
            break  # spans only grow with p
        # a cheap necessary condition first: the last token equals the one a period earlier
        if tokens[-1] != tokens[-1 - p]:
            continue
        tail = tokens[n - span:]
        if tail[p:] == tail[:-p]:
            return p
    return None


def _loop_period(generated: Sequence[int], p: SamplingParams) -> int | None:
    return find_loop(generated, p.loop_min_period, p.loop_max_period, p.loop_min_repeats, p.loop_min_span)


def argmax_rows(x: Tensor, chunk: int = 1024) -> Tensor:
    """x.argmax(-1) of [B, V] logits, same answer (first maximum; a NaN counts as the maximum), ~10x faster.

    torch's CPU argmax does not vectorise: 0.34 ms for one row of a 262k vocabulary and 1.9 ms for eight, which
    is 2-4% of a decode step. amax does (0.01 ms a row), so find the block of `chunk` logits that holds the
    maximum and take argmax inside that block only. Ties resolve as argmax does: the first block holding the
    maximum, then the first position in it."""
    rows, vocab = x.shape
    if vocab % chunk or vocab <= chunk:
        return x.argmax(dim=-1)
    blocks = x.reshape(rows, vocab // chunk, chunk)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # [rows]
    return best * chunk + blocks[torch.arange(rows, device=x.device), best].argmax(dim=-1)


def warp(x: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
         candidates: int = 1024) -> Tensor:
    """Tempered logits with the tokens that top-k, top-p and min-p drop set to -inf.

    x: [B, V] processed logits; temperature [B] (> 0), top_k [B] long (V = off), top_p [B] (1 = off),
    min_p [B] (0 = off). One sort serves all three: each mask keeps the descending order of the one before.

    Sorting a 262k vocabulary costs ~20 ms on a CPU, more than a compiled 270M decode step, so the sort is
    first tried on the `candidates` largest logits only (torch.topk). That answer is exact whenever every
    row's cut falls among them — top-k inside, or the nucleus / min-p threshold reached before the last
    candidate — which is what real sampling settings give; otherwise the full sort runs.
    """
    x = x / temperature[:, None]
    V = x.shape[-1]
    limited = top_k[top_k < V]
    m = min(V, max(candidates, int(limited.max()) + 1 if limited.numel() else 0))
    if m < V:
        top_x, order = x.topk(m, dim=-1)
        kept = _truncate(top_x, top_k, top_p, min_p, torch.logsumexp(x, dim=-1))
        if kept is not None:
            return torch.full_like(x, -math.inf).scatter(1, order, top_x.masked_fill(~kept, -math.inf))
    sorted_x, order = x.sort(dim=-1, descending=True)
    kept = _truncate(sorted_x, top_k, top_p, min_p, None)
    return x.scatter(1, order, sorted_x.masked_fill(~kept, -math.inf))


def _truncate(sorted_x: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, log_norm: Tensor | None
              ) -> Tensor | None:
    """Which of the descending logits [B, n] survive top-k, then top-p, then min-p. With `log_norm` (the
    log-partition over the whole vocabulary) the n columns are only the head of it: returns None unless the
    answer for the columns left out is certainly "dropped" in every row."""
    n = sorted_x.shape[-1]
    kth = sorted_x.gather(1, (top_k - 1).clamp(0, n - 1)[:, None])
    drop = sorted_x < kth
    probs = sorted_x.masked_fill(drop, -math.inf).softmax(dim=-1)
    if log_norm is not None:
        # Rows without a top-k inside the head: probabilities against the whole vocabulary.
        cut = (top_k < n)[:, None] & (sorted_x[:, -1:] < kth)  # the k-th is strictly inside: ties excluded
        probs = torch.where(cut, probs, (sorted_x - log_norm[:, None]).exp())
    # keep a token while the mass before it is short of top_p; top_p = 1 must keep all, despite rounding
    drop |= (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    if log_norm is not None:
        # A top-k row is settled when its k-th is strictly inside; any other row when its nucleus mass or its
        # min-p threshold is reached before the last column (every token left out is smaller still).
        rest_dropped = ((probs.sum(-1) >= top_p) & (top_p < 1.0)) | (probs[:, -1] < min_p * probs[:, 0])
        if not bool(torch.where(top_k < n, cut[:, 0], rest_dropped).all()):
            return None
    return ~drop


def _last_resort(z: Tensor, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """A token for a row whose draw logits `z` are no distribution. +inf logits (a processor's, or an
    overflow) are the limit of a distribution that puts all its mass on them: draw among those. Otherwise
    (NaN, or all -inf) take the argmax of the processed logits `x`, NaN counted as -inf, as greedy would."""
    top = z == math.inf
    if bool(top.any()):
        return Sampler._race(top.float() / top.sum(), generator)
    return x.nan_to_num(nan=-math.inf).argmax()


def draw(p: Tensor, generator: torch.Generator | None) -> int | None:
    """One token from the distribution `p` [V] (any scale; zeros are never drawn), with the row's generator:
    the exponential race `Sampler.sample` runs. None when p holds no mass or is not finite."""
    token = Sampler._race(p, generator)
    return None if token is None else int(token)


def _counts(seqs: list[Sequence[int]], vocab_size: int, device: torch.device) -> Tensor:
    """[B, V] float32: how often each token occurs in each row's sequence."""
    rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([len(s) for s in seqs]))
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        raise ValueError(f"history holds token ids outside [0, {vocab_size})")
    counts = torch.zeros(len(seqs), vocab_size, dtype=torch.float32)
    counts.index_put_((rows, ids), torch.ones(len(ids)), accumulate=True)
    return counts.to(device)  # built on the host: the ids come from Python lists anyway


def _column(params: list[SamplingParams], name: str, device: torch.device, default: float = 0.0) -> Tensor:
    values = [getattr(p, name) for p in params]
    return torch.tensor([default if v is None else v for v in values], dtype=torch.float32, device=device)


class Sampler:
    """Chooses the next token of every sequence in a batch; stateless apart from the vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def sample(self, logits: Tensor, params: list[SamplingParams], history: list[list[int]],
               prompt_lens: list[int], generators: list[torch.Generator | None],
               ) -> tuple[Tensor, list[TokenLogprobs | None]]:
        """Next tokens [B] long and per-row logprobs (None where not asked for).

        logits: [B, V] at the last position; history[i]: row i's prompt followed by its generated tokens,
        the first prompt_lens[i] of them being the prompt; generators[i]: from `make_generator`.
        """
        self._check(logits, params, history, prompt_lens, generators)
        x = self.process(logits, params, history, prompt_lens)
        tokens = self._choose(x, params, generators, history, prompt_lens)
        return tokens, self._logprobs(x, tokens, params)

    def process(self, logits: Tensor, params: list[SamplingParams], history: list[list[int]],
                prompt_lens: list[int]) -> Tensor:
        """[B, V] float32 logits after penalties, bias and the loop guard: what greedy and logprobs read."""
        # No copy up front: penalties and bias build new tensors, and only the loop ban writes in place (into
        # its own copy). A greedy batch of 8 over a 262k vocabulary saved ~5 ms per step, mostly page faults.
        raw = logits.float()
        x = self._penalize(raw, params, history, prompt_lens)
        x = self._bias(x, params)
        x = self._ban_loops(x, params, history, prompt_lens)
        if not any(p.logit_bias or p.loop_guard == "penalize" for p in params):
            return x  # only a bias or the loop guard can ban tokens
        dead = ~torch.isfinite(x).any(dim=-1, keepdim=True)
        return torch.where(dead, raw, x)

    @staticmethod
    def loop_detected(generated: Sequence[int], params: SamplingParams) -> bool:
        """True when a loop_guard="stop" row's generated tokens end in a loop: finish it with reason "loop"."""
        return params.loop_guard == "stop" and _loop_period(generated, params) is not None

    def _check(self, logits: Tensor, params: list, history: list, prompt_lens: list, generators: list) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [B, {self.vocab_size}], got {list(logits.shape)}")
        sizes = {len(params), len(history), len(prompt_lens), len(generators)}
        if sizes != {logits.shape[0]}:
            raise ValueError(f"params, history, prompt_lens and generators need one entry per row "
                             f"({logits.shape[0]}), got {len(params)}, {len(history)}, {len(prompt_lens)}, "
                             f"{len(generators)}")
        for p in params:
            if p.logit_bias and not all(0 <= t < self.vocab_size for t in p.logit_bias):
                raise ValueError(f"logit_bias ids must be in [0, {self.vocab_size}), got {sorted(p.logit_bias)}")

    def _penalize(self, x: Tensor, params: list[SamplingParams], history: list[list[int]],
                  prompt_lens: list[int]) -> Tensor:
        # rows that do not use a penalty contribute empty sequences: their defaults leave the logits untouched
        seen = [h if p.repetition_penalty != 1.0 else [] for p, h in zip(params, history, strict=True)]
        if any(seen):
            r = _column(params, "repetition_penalty", x.device)[:, None]
            hit = _counts(seen, self.vocab_size, x.device) > 0
            x = torch.where(hit, torch.where(x > 0, x / r, x * r), x)
        generated = [h[n:] if p.presence_penalty or p.frequency_penalty else []
                     for p, h, n in zip(params, history, prompt_lens, strict=True)]
        if any(generated):
            counts = _counts(generated, self.vocab_size, x.device)
            freq = _column(params, "frequency_penalty", x.device)[:, None]
            presence = _column(params, "presence_penalty", x.device)[:, None]
            x = x - freq * counts - presence * (counts > 0)
        return x

    def _bias(self, x: Tensor, params: list[SamplingParams]) -> Tensor:
        entries = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        if not entries:
            return x
        rows, ids, values = zip(*entries, strict=True)
        index = (torch.tensor(rows, device=x.device), torch.tensor(ids, device=x.device))
        return x.index_put(index, torch.tensor(values, dtype=torch.float32, device=x.device), accumulate=True)

    def _ban_loops(self, x: Tensor, params: list[SamplingParams], history: list[list[int]],
                   prompt_lens: list[int]) -> Tensor:
        # the token that would come next in the loop is the one a period back; banning it is the smallest change
        # that breaks the repetition, and the model picks its next-best continuation instead
        banned = [(i, h[-period]) for i, (p, h, n) in enumerate(zip(params, history, prompt_lens, strict=True))
                  if p.loop_guard == "penalize" and (period := _loop_period(h[n:], p)) is not None]
        if banned:
            x = x.clone()  # x may still be the caller's logits
            for i, token in banned:
                x[i, token] = -math.inf
        return x

    def distributions(self, logits: Tensor, params: list[SamplingParams], history: list[list[int]],
                      prompt_lens: list[int]) -> Tensor:
        """[B, V] float32: the distribution `sample` draws each row's next token from, exactly — every step of
        the module docstring's order, over each row's own history. Greedy rows are one-hot at their argmax, and
        a row whose draw logits are no distribution gets what `_last_resort` would pick. Speculative decoding
        (speculative.py) accepts a draft with this probability, which keeps the output's distribution."""
        self._check(logits, params, history, prompt_lens, [None] * len(params))
        x = self.process(logits, params, history, prompt_lens)
        out = torch.zeros_like(x).scatter_(1, argmax_rows(x)[:, None], 1.0)
        rows = [i for i, p in enumerate(params) if p.temperature > 0.0]
        if not rows:
            return out
        z = self._draw_logits(x, params, history, prompt_lens, rows)
        probs = z.softmax(dim=-1)
        for j, i in enumerate(rows):
            p, top = probs[j], z[j] == math.inf
            if bool(top.any()):  # as _last_resort: the mass sits on the +inf logits
                out[i] = top.float() / top.sum()
            elif bool(torch.isfinite(p).all()) and bool((p > 0).any()):
                out[i] = p
            else:
                out[i] = torch.zeros_like(p).scatter_(0, x[i].nan_to_num(nan=-math.inf).argmax()[None], 1.0)
        return out

    def _draw_logits(self, x: Tensor, params: list[SamplingParams], history: list[list[int]],
                     prompt_lens: list[int], rows: list[int]) -> Tensor:
        """[len(rows), V]: the logits the draw of each of `rows` (temperature > 0) softmaxes: tempered,
        truncated and processed."""
        sub, dev = [params[i] for i in rows], x.device
        index = torch.tensor(rows, device=dev)
        z, temperature = x[index], _column(sub, "temperature", dev).clamp_min(MIN_TEMPERATURE)
        if any(p.top_k or p.top_p or p.min_p for p in sub):
            top_k = torch.tensor([min(p.top_k or self.vocab_size, self.vocab_size) for p in sub], device=dev)
            z = warp(z, temperature, top_k, _column(sub, "top_p", dev, 1.0), _column(sub, "min_p", dev))
        else:
            z = z / temperature[:, None]
        if any(p.logits_processors for p in sub):
            z = torch.stack([self._run_processors(zz, params[i], history[i], prompt_lens[i])
                             for zz, i in zip(z, rows, strict=True)])
        return z

    def _choose(self, x: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                history: list[list[int]], prompt_lens: list[int]) -> Tensor:
        tokens = argmax_rows(x)
        rows = [i for i, p in enumerate(params) if p.temperature > 0.0]
        if not rows:
            return tokens
        index = torch.tensor(rows, device=x.device)
        z = self._draw_logits(x, params, history, prompt_lens, rows)
        probs = z.softmax(dim=-1)
        picked = [self._race(p, generators[i]) for p, i in zip(probs, rows, strict=True)]
        picked = [t if t is not None else _last_resort(zz, x[i], generators[i])
                  for t, zz, i in zip(picked, z, rows, strict=True)]
        return tokens.index_copy(0, index, torch.stack(picked))

    @staticmethod
    def _run_processors(z: Tensor, p: SamplingParams, tokens: list[int], prompt_len: int) -> Tensor:
        for f in p.logits_processors:
            z = f(z, tokens, prompt_len)
        return z

    @staticmethod
    def _race(p: Tensor, generator: torch.Generator | None) -> Tensor | None:
        """argmax(p / q), q ~ Exp(1), over the tokens p keeps, in id order: one draw per kept token from the
        row's own generator, so a seeded row draws the same numbers whatever the batch. Drawing only for the
        kept tokens (64 under Gemma's top-k, not all 262k) takes ~4 ms per row out of every sampled step.
        None when p is not a distribution (NaN: its logits held +inf, NaN, or nothing but -inf)."""
        kept = p.nonzero()[:, 0]
        if not len(kept) or not bool(torch.isfinite(p[kept]).all()):
            return None
        q = torch.empty(len(kept), dtype=torch.float32, device=p.device).exponential_(generator=generator)
        return kept[(p[kept] / q.clamp_min_(torch.finfo(torch.float32).tiny)).argmax()]

    def _logprobs(self, x: Tensor, tokens: Tensor, params: list[SamplingParams]) -> list[TokenLogprobs | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(params)
        if not rows:
            return out
        index = torch.tensor(rows, device=x.device)
        lp = x[index].log_softmax(dim=-1)
        chosen = lp.gather(1, tokens[index][:, None])[:, 0].tolist()
        k = min(max(params[i].logprobs for i in rows), self.vocab_size)
        top_v, top_i = (t.tolist() for t in lp.topk(k, dim=-1))  # sorted, most likely first
        ids = tokens.tolist()
        for j, i in enumerate(rows):
            kk = params[i].logprobs
            out[i] = TokenLogprobs(ids[i], chosen[j], list(zip(top_i[j][:kk], top_v[j][:kk], strict=True)))
        return out
