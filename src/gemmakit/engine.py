"""The generation engine: many sequences, each with its own sampling and stop rules, decoded in one batch.

How a request flows:
- `submit` queues it (checked first: valid sampling parameters, prompt + max_tokens within the context).
- `step` admits queued requests into free cache rows — each is prefilled on its own (any prompt length, no
  padding, in chunks of `prefill_chunk` tokens so a long prompt's working memory stays bounded), and samples
  its first token — then runs ONE batched decode step over every running row, rows at
  different positions included (cache.py keeps per-row positions). Sequences that finish (a stop token, a stop
  string, max_tokens, a detected repetition loop) leave their row at once, and the next step may admit
  someone else into it: continuous batching. The server drives `step` from its loop; `generate` is the
  blocking convenience on top.
- How each forward pass runs on this machine is the runtime's business (runtime/): a plan made once per
  engine decides weight layout, compiled decode steps (`compile=True`), the head screen that picks greedy
  tokens from a cheaper copy of the output head (`screen=False` or GEMMAKIT_SCREEN=off turns it off), the
  int4 prompt unpack and the decode-attention kernel, each with the reason (`engine.plan.describe()`). The
  engine calls `runtime.prefill` / `runtime.decode` and gets logits to sample from, or greedy tokens the
  screen certified equal to the full head's. Build a compiled engine after quantizing: its steps do not
  re-check the model's modules.
- Memory is known before it is allocated: the KV cache for `max_batch` rows x `context` tokens plus working
  memory is estimated first (cache.estimate_bytes), and an engine that would not fit is refused with the
  numbers instead of crashing later.
- Failures stay with the request that caused them. A grammar that refuses the sampled token, logits that are
  NaN or allow no token, a logits processor or a prefill that raises: that request finishes with "error"
  (`Request.error` says why) and leaves its row, and every other row goes on. A batched decode step that
  raises is retried row by row, so only the rows that fail alone end. `abort` ends everything and frees
  every row, for the errors nobody can be blamed for.

Speculative decoding lives in speculative.py, which defines the drafter contract (`Drafter`) once.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gemmakit.adapters import adapter_names
from gemmakit.flags import parse_switch
from gemmakit.media.soft import PromptMedia
from gemmakit.model import Gemma
from gemmakit.prefix import PrefixCache, make_prefix_cache
from gemmakit.runtime.plan import model_dtype_device
from gemmakit.runtime.steps import Runtime, StepOut
from gemmakit.sampling import Sampler, SamplingParams, TokenLogprobs, fit_context, make_generator
from gemmakit.speculative import DraftStats, check_draft_tokens, speculation_stats, speculative_step


def screen_wanted() -> bool:
    """GEMMAKIT_SCREEN: on (default) or off, for engines built without an explicit `screen=`."""
    return bool(parse_switch("GEMMAKIT_SCREEN", os.environ.get("GEMMAKIT_SCREEN", "on")))


def pacing_wanted() -> bool:
    """GEMMAKIT_PACED_PREFILL: on (default) or off (a newcomer's whole prompt goes in at once, as fast as it can,
    while running streams wait), for engines built without an explicit `paced=`."""
    return bool(parse_switch("GEMMAKIT_PACED_PREFILL", os.environ.get("GEMMAKIT_PACED_PREFILL", "on")))


class StopText:
    """Cuts streamed text at the first stop string, holding back any tail that could still become one.

    Stop strings may span tokens ("\\nUser:" arrives as "\\n", "User", ":"), so a piece is only released
    once no stop string can start inside it. Each stop string is matched by a KMP automaton whose state is the
    longest prefix of it that the text ends with: every character costs O(1) amortised per stop string, however
    long the strings are, and the held-back tail is never longer than the longest of them. (Searching the
    held text for every prefix of every stop string on each token was quadratic in their length, and it runs
    in the engine thread that every request waits on.)
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._fail = [_kmp_table(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        base = len(self.pending)
        self.pending += text
        first = None  # the earliest start of a stop string that ends inside `text`
        for k, (stop, fail) in enumerate(zip(self.stops, self._fail, strict=True)):
            state, hit = self._state[k], None
            for i, ch in enumerate(text):
                state = _kmp_step(stop, fail, state, ch)
                if state == len(stop):
                    hit = base + i + 1 - len(stop)
                    break
            self._state[k] = state
            if hit is not None and (first is None or hit < first):
                first = hit
        if first is not None:
            self.stopped = True
            out, self.pending = self.pending[:first], ""
            return out
        keep = max(self._state, default=0)  # the longest tail that is still the start of a stop string
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _kmp_table(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def _kmp_step(s: str, fail: list[int], state: int, ch: str) -> int:
    """The automaton's next state: how much of `s` the text ends with after `ch`."""
    if state == len(s):
        state = fail[state - 1]
    while state and s[state] != ch:
        state = fail[state - 1]
    return state + 1 if s[state] == ch else 0


class Pacer:
    """How many prompt tokens a step may prefill while other rows are decoding: about as many as take as long
    as a decode step (`SHARE` of it), so a running stream's time per token stays within about twice what it is
    without a newcomer, however long the newcomer's prompt. Both costs are measured as the engine runs, the
    prompt's per token on the small chunks this pacing runs (a whole prompt goes faster per token)."""

    SHARE, SMOOTH = 0.8, 0.3

    def __init__(self, most: int):
        self.most = most
        self.decode_s: float | None = None
        self.token_s: float | None = None

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.SMOOTH) * old + self.SMOOTH * new

    def decoded(self, seconds: float) -> None:
        self.decode_s = self._mix(self.decode_s, seconds)

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.token_s = self._mix(self.token_s, seconds / tokens)

    def budget(self, block: int) -> int:
        """Prompt tokens for this step (at least one `block`: a prompt always moves on)."""
        if self.decode_s is None or self.token_s is None:
            return block
        return max(block, min(self.most, int(self.SHARE * self.decode_s / self.token_s)))


@dataclass
class Request:
    """One sequence in the engine: its prompt, parameters and everything generated so far."""

    prompt: list[int]
    params: SamplingParams
    id: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # only when stop strings need it (a tokenizer was given)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "loop", "cancelled" or "error" (then `error` says why)
    error: str | None = None
    row: int = -1
    generator: torch.Generator | None = None
    decoder: Any = None
    stop_text: StopText | None = None
    media: PromptMedia | None = None  # image / audio soft tokens of the prompt (media/soft.py)
    adapter: int = -1  # which attached LoRA adapter answers (adapters.py), -1: the base model
    prefilled: int = 0  # prompt positions in the cache row so far (a long prompt arrives over several steps)
    cached_tokens: int = 0  # of those, the ones taken from the prefix cache rather than computed
    stored: int = 0  # tokens of the sequence the prefix cache holds (from position 0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Where the last sampled token goes when it is fed back."""
        return len(self.prompt) + len(self.tokens) - 1


class Engine:
    def __init__(self, model: Gemma, tokenizer: Any = None, max_batch: int = 8, context: int | None = None,
                 slack: int = 8, check_memory: bool = True, compile: bool = False, prefill_chunk: int = 512,
                 screen: bool | None = None, drafter: Any = None, draft_tokens: int = 4,
                 prefix_cache: bool | int | PrefixCache | None = None, paced: bool | None = None):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        # Speculative decoding (speculative.py): a `Drafter` guesses `draft_tokens` per row, the target checks them.
        self.drafter, self.draft_tokens = drafter, draft_tokens
        config = model.config
        self.context = min(context or config.max_position_embeddings, config.max_position_embeddings)
        self.dtype, self.device = model_dtype_device(model)
        screen = screen_wanted() if screen is None else screen
        self.runtime = Runtime(model, max_batch, self.context, compile, screen, slack, prefill_chunk, check_memory)
        self.plan, self.memory = self.runtime.plan, self.runtime.plan.forecast
        self.compiled = self.plan.compiled
        self.sampler = Sampler(config.vocab_size)
        self.free_rows = list(range(max_batch))[::-1]
        self.running: dict[int, Request] = {}  # rows decoding
        self.prefilling: dict[int, Request] = {}  # rows whose prompt is still going in, oldest first
        self.waiting: deque[Request] = deque()
        self.prefix = make_prefix_cache(prefix_cache, self.runtime.cache.nbytes(), self.device)
        if drafter is not None:
            check_draft_tokens(self)
        self.pacer = Pacer(prefill_chunk) if (pacing_wanted() if paced is None else paced) else None
        self._next_id = 0

    # --- admission --------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               media: PromptMedia | None = None, adapter: str | None = None) -> Request:
        """Queue a prompt; `adapter` names one of the model's attached LoRA adapters (adapters.py)."""
        params = params or SamplingParams()
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        fit_context(len(prompt), params.max_tokens, self.context)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer")
        if media is not None and int(media.positions.max()) >= len(prompt):
            raise ValueError("the media's soft tokens lie past the end of the prompt")
        names = adapter_names(self.model)
        if adapter is not None and adapter not in names:
            raise ValueError(f"no adapter named {adapter!r}; this model has {names or 'none'}")
        req = Request(list(prompt), params, id=self._next_id, generator=make_generator(params.seed, self.device),
                      media=media, adapter=-1 if adapter is None else names.index(adapter))
        if self.tokenizer is not None:  # keeps req.text, cut at any stop string, current token by token
            req.decoder, req.stop_text = self.tokenizer.decode_stream(), StopText(params.stop)
        self._next_id += 1
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request (e.g. its client went away); its row is free for the next step."""
        if req in self.waiting:
            self.waiting.remove(req)
        req.finish_reason = req.finish_reason or "cancelled"
        self._release(req)

    def warmup(self) -> None:
        """Build the compiled decode steps (and int4 prompt unpacks) now, on throw-away tokens, rather than
        in the first requests."""
        if self.compiled and not self.has_work:
            bos = [self.model.config.bos_token_id or 0]
            # Greedy rows and the rest take different compiled steps where the head is screened.
            kinds = [SamplingParams(max_tokens=2)]
            if self.plan.screen is not None:
                kinds.append(SamplingParams(max_tokens=2, logprobs=0))
            for rows in sorted({self.max_batch, 1}):
                for params in kinds:
                    self.generate([bos] * rows, params)
            prompt = self.runtime.longest_warmup_prompt(self.context)
            if prompt:  # the compiled int4 prompt unpacks are reached only by prompts this long
                self.generate([bos * prompt], SamplingParams(max_tokens=1))

    @property
    def drafter_stats(self) -> DraftStats | None:
        """Speculation counters (rounds, drafted, accepted, acceptance) when a drafter is set."""
        return speculation_stats(self) if self.drafter is not None else None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    # --- the loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Decode one token for every running sequence, then admit waiting requests into free rows and prefill
        prompts: all of them when nothing is decoding, else only as many tokens as take about as long as the
        decode step did (`Pacer`), so running streams never stall behind a long prompt. A request whose prompt
        is in samples its first token and joins the batch at the next step. Returns (request, token) for every
        token produced; finished requests have `finish_reason` set and have already left the batch. A request
        that fails (see the module docstring) finishes with "error" and its `error`, as (request, -1)."""
        decoding = bool(self.running)
        began = time.perf_counter()
        events = self._decode(list(self.running.values()))
        if decoding and self.pacer is not None:
            self.pacer.decoded(time.perf_counter() - began)
        while self.waiting and self.free_rows:
            req = self.waiting.popleft()
            events += self._guarded([req], lambda r=req: self._admit(r), "prefill failed")
        paced = decoding and self.pacer is not None
        budget = self.pacer.budget(self.prefix.block if self.prefix else 1) if paced else None
        for req in list(self.prefilling.values()):
            if budget is not None and budget <= 0:
                break
            want = len(req.prompt) - req.prefilled if budget is None else budget
            before = req.prefilled
            events += self._guarded([req], lambda r=req, w=want, p=budget is not None: self._prefill(r, w, p),
                                    "prefill failed")
            if budget is not None:
                budget -= req.prefilled - before
        return events

    def abort(self, message: str) -> list[Request]:
        """End every running and waiting request with `message` and free every row: the way back to a
        consistent engine after an error nobody can be blamed for. Returns the requests it ended."""
        ended = [*self.running.values(), *self.prefilling.values(), *self.waiting]
        self.waiting.clear()
        for req in ended:
            req.finish_reason, req.error = "error", req.error or message
            req.row = -1
        if self.drafter is not None:
            for row in [*self.running, *self.prefilling]:
                self.drafter.release(row)
        self.running.clear()
        self.prefilling.clear()
        self.runtime.clear(list(range(self.max_batch)))
        self.free_rows = list(range(self.max_batch))[::-1]
        return ended

    def _admit(self, req: Request) -> list[tuple[Request, int]]:
        """Give `req` a row, holding whatever the prefix cache has of its prompt (all but its last token, whose
        logits are needed)."""
        req.row = self.free_rows.pop()
        self.prefilling[req.row] = req
        if self.prefix is not None and req.media is None:
            blocks = self.prefix.match(req.prompt, req.adapter, limit=len(req.prompt) - 1)
            req.prefilled = req.cached_tokens = req.stored = self.runtime.restore(req.row, blocks)
        return []

    def _prefill(self, req: Request, tokens: int, paced: bool) -> list[tuple[Request, int]]:
        """About `tokens` more of `req`'s prompt into its row (whole prefix-cache blocks, so what is computed
        can be stored; `paced`: a share of a decode step); once the prompt is in, its first token."""
        end = min(len(req.prompt), req.prefilled + tokens)
        if end < len(req.prompt) and self.prefix is not None:
            end = req.prefilled + max(self.prefix.block, tokens // self.prefix.block * self.prefix.block)
            end = min(end, len(req.prompt))
        store = self.prefix is not None and req.media is None
        began = time.perf_counter()
        done, out = self.runtime.prefill_part(req.prompt, req.row, req.prefilled, end, req.params.plain_greedy,
                                              req.media, req.adapter, self._storer(req) if store else None)
        if paced:
            self.pacer.prefilled(done - req.prefilled, time.perf_counter() - began)
        req.prefilled = done
        if out is None:
            return []
        del self.prefilling[req.row]
        self.running[req.row] = req
        return self._take([req], out)

    def _storer(self, req: Request) -> Any:
        def store(start: int, kv: dict[int, tuple[Tensor, Tensor]]) -> None:
            if start == req.stored:
                req.stored = self.prefix.store(req.prompt, req.adapter, start, list(kv.values()))
        return store

    def _keep_prefix(self, req: Request) -> None:
        """Store the whole blocks of the sequence that its row holds beyond what is stored, while a ring still
        holds them (each time a block fills, and when the sequence ends): a later turn of the same conversation
        starts with this prompt and reply."""
        fed = len(req.prompt) + len(req.tokens) - 1
        start, block = req.stored, self.prefix.block
        end = start + (fed - start) // block * block
        if end > start and req.media is None and req.prefilled == len(req.prompt):
            kv = self.runtime.cache.read(req.row, start, end)
            if kv is not None:
                req.stored = self.prefix.store(req.prompt + req.tokens, req.adapter, start, list(kv.values()))

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        if not reqs:
            return []
        reqs = sorted(reqs, key=lambda r: r.row)
        try:
            return self._decode_rows(reqs)
        except Exception as e:
            if len(reqs) == 1:
                return [self._fail(reqs[0], f"decoding failed: {type(e).__name__}: {e}")]
        # Which row broke the batch is unknown: step each alone (writing a row's K/V again at the same position
        # is harmless), so only the rows that fail by themselves end.
        return [e for r in reqs for e in self._guarded([r], lambda r=r: self._decode_rows([r]), "decoding failed")]

    def _decode_rows(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        if self.drafter is not None:
            events = speculative_step(self, reqs)
        else:
            out = self.runtime.decode([r.tokens[-1] for r in reqs], [r.position for r in reqs],
                                      [r.row for r in reqs], greedy=all(r.params.plain_greedy for r in reqs),
                                      adapters=[r.adapter for r in reqs])
            events = self._take(reqs, out)
        if self.prefix is not None:
            for r in reqs:
                if not r.finished and r.position - r.stored > self.prefix.block:
                    self._keep_prefix(r)
        return events

    def _guarded(self, reqs: list[Request], work: Any, what: str) -> list[tuple[Request, int]]:
        """`work()`'s events; if it raises, `reqs` (the only rows it touched) end with the error instead."""
        try:
            return work()
        except Exception as e:
            return [self._fail(r, f"{what}: {type(e).__name__}: {e}") for r in reqs if not r.finished]

    def _fail(self, req: Request, message: str) -> tuple[Request, int]:
        req.error = message
        self._finish(req, "error")
        return req, -1

    def _take(self, reqs: list[Request], out: StepOut) -> list[tuple[Request, int]]:
        """Accept a step's certified greedy tokens, or sample from its logits."""
        if out.tokens is not None:
            return self._accept_all(reqs, out.tokens.tolist(), [None] * len(reqs))
        return self._sample(reqs, out.logits)

    def _sample(self, reqs: list[Request], logits: Tensor) -> list[tuple[Request, int]]:
        """Sample every row that can be sampled; a row whose logits are NaN, or that allows no token at all,
        ends with an error of its own."""
        failed: list[tuple[Request, int]] = []
        constrained = [i for i, r in enumerate(reqs) if r.params.constrained]
        if constrained:  # a copy: a compiled step may hand out its own output buffer
            logits = logits.clone()
            for i in constrained:
                try:
                    allowed = reqs[i].params.constraint.allowed().to(logits.device)
                except Exception as e:
                    failed.append(self._fail(reqs[i], f"the grammar failed: {type(e).__name__}: {e}"))
                    continue
                logits[i].masked_fill_(~allowed[: logits.shape[-1]], -math.inf)
        top = logits.amax(dim=-1).tolist()  # NaN if a row holds one, -inf if it allows nothing: one pass
        for i in (i for i, t in enumerate(top) if not t > -math.inf and not reqs[i].finished):
            failed.append(self._fail(reqs[i], "the model's logits for this sequence are NaN" if math.isnan(top[i])
                                     else "no token is allowed here: the grammar (response_format / tool_choice) "
                                     "admits none of the model's tokens"))
        keep = [i for i, r in enumerate(reqs) if not r.finished]
        if len(keep) < len(reqs):
            reqs, logits = [reqs[i] for i in keep], logits[torch.tensor(keep, device=logits.device)]
        if not reqs:
            return failed
        try:
            tokens, logprobs = self._draw(reqs, logits)
        except Exception:  # one row's parameters or processors: find which, row by row
            return failed + [e for i, r in enumerate(reqs) for e in self._guarded(
                [r], lambda i=i, r=r: self._accept_all([r], *self._draw([r], logits[i:i + 1])), "sampling failed")]
        return failed + self._accept_all(reqs, tokens, logprobs)

    def _draw(self, reqs: list[Request], logits: Tensor) -> tuple[list[int], list[TokenLogprobs | None]]:
        tokens, logprobs = self.sampler.sample(logits, [r.params for r in reqs], [r.prompt + r.tokens for r in reqs],
                                               [len(r.prompt) for r in reqs], [r.generator for r in reqs])
        return tokens.tolist(), logprobs

    def _accept_all(self, reqs: list[Request], tokens: list[int], logprobs: list[TokenLogprobs | None]
                    ) -> list[tuple[Request, int]]:
        events = []
        for req, token, lp in zip(reqs, tokens, logprobs, strict=True):
            try:
                self._accept(req, token, lp)
            except Exception as e:  # e.g. the grammar refused the token: this request ends, the batch goes on
                events.append(self._fail(req, f"{type(e).__name__}: {e}"))
                continue
            events.append((req, token))
        return events

    def _accept(self, req: Request, token: int, logprob: TokenLogprobs | None) -> None:
        p = req.params
        if token in p.stop_token_ids:
            return self._finish(req, "stop")
        if p.constraint is not None:
            p.constraint.advance(token)
        req.tokens.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        if req.stop_text is not None:
            req.text += req.stop_text.feed(req.decoder.step(token))
            if req.stop_text.stopped:
                return self._finish(req, "stop")
        if p.loop_guard == "stop" and self.sampler.loop_detected(req.tokens, p):
            return self._finish(req, "loop")
        if p.constraint is not None and p.constraint.done:
            return self._finish(req, "stop")
        if len(req.tokens) >= p.max_tokens:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if self.prefix is not None and reason != "error" and self.running.get(req.row) is req:
            self._keep_prefix(req)
        if req.stop_text is not None:
            req.text += req.stop_text.finish()
        self._release(req)

    def _release(self, req: Request) -> None:
        held = next((rows for rows in (self.running, self.prefilling) if rows.get(req.row) is req), None)
        if req.row >= 0 and held is not None:
            del held[req.row]
            self.runtime.clear([req.row])
            if self.drafter is not None:
                self.drafter.release(req.row)
            self.free_rows.append(req.row)

    # --- conveniences -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 media: Sequence[PromptMedia | None] | None = None) -> list[Request]:
        """Run prompts to completion (as many at once as there are rows) and return them in order; `media`
        gives each prompt's soft tokens (None for a text-only one)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        mlist = list(media) if media is not None else [None] * len(prompts)
        reqs = [self.submit(p, sp, m) for p, sp, m in zip(prompts, plist, mlist, strict=True)]
        while self.has_work:
            self.step()
        return reqs

    def stream(self, prompt: Sequence[int], params: SamplingParams, media: PromptMedia | None = None
               ) -> Iterator[int]:
        """Tokens of one request as they are produced (a stop token itself is not part of the output)."""
        req, sent = self.submit(prompt, params, media), 0
        try:
            while not req.finished:
                self.step()
                yield from req.tokens[sent:]
                sent = len(req.tokens)
            if req.error is not None:
                raise RuntimeError(req.error)
        finally:
            if not req.finished:
                self.cancel(req)
