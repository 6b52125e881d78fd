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

Speculative decoding lives in speculative.py, which defines the drafter contract (`Drafter`) once.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gemmakit.flags import parse_switch
from gemmakit.model import Gemma
from gemmakit.runtime.plan import model_dtype_device
from gemmakit.runtime.steps import Runtime, StepOut
from gemmakit.sampling import Sampler, SamplingParams, TokenLogprobs, fit_context, make_generator


def screen_wanted() -> bool:
    """GEMMAKIT_SCREEN: on (default) or off, for engines built without an explicit `screen=`."""
    return bool(parse_switch("GEMMAKIT_SCREEN", os.environ.get("GEMMAKIT_SCREEN", "on")))


class StopText:
    """Cuts streamed text at the first stop string, holding back any tail that could still become one.

    Stop strings may span tokens ("\\nUser:" arrives as "\\n", "User", ":"), so a piece is only released
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


@dataclass
class Request:
    """One sequence in the engine: its prompt, parameters and everything generated so far."""

    prompt: list[int]
    params: SamplingParams
    id: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # only when stop strings need it (a tokenizer was given)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "loop"
    row: int = -1
    generator: torch.Generator | None = None
    decoder: Any = None
    stop_text: StopText | None = None

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
                 screen: bool | None = None):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        config = model.config
        self.context = min(context or config.max_position_embeddings, config.max_position_embeddings)
        self.dtype, self.device = model_dtype_device(model)
        screen = screen_wanted() if screen is None else screen
        self.runtime = Runtime(model, max_batch, self.context, compile, screen, slack, prefill_chunk, check_memory)
        self.plan, self.memory = self.runtime.plan, self.runtime.plan.forecast
        self.compiled = self.plan.compiled
        self.sampler = Sampler(config.vocab_size)
        self.free_rows = list(range(max_batch))[::-1]
        self.running: dict[int, Request] = {}
        self.waiting: deque[Request] = deque()
        self._next_id = 0

    # --- admission --------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Request:
        params = params or SamplingParams()
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        fit_context(len(prompt), params.max_tokens, self.context)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer")
        req = Request(list(prompt), params, id=self._next_id,
                      generator=make_generator(params.seed, self.device))
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
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- the loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Decode one token for every running sequence, then admit (prefill) what fits into free rows; the
        newcomers join the batch at the next step. Returns (request, token) for every token produced;
        finished requests have `finish_reason` set and have already left the batch."""
        events = self._decode(list(self.running.values()))
        while self.waiting and self.free_rows:
            events += self._prefill(self.waiting.popleft())
        return events

    def _prefill(self, req: Request) -> list[tuple[Request, int]]:
        req.row = self.free_rows.pop()
        self.running[req.row] = req
        return self._take([req], self.runtime.prefill(req.prompt, req.row, req.params.plain_greedy))

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        if not reqs:
            return []
        reqs = sorted(reqs, key=lambda r: r.row)
        out = self.runtime.decode([r.tokens[-1] for r in reqs], [r.position for r in reqs], [r.row for r in reqs],
                                  greedy=all(r.params.plain_greedy for r in reqs))
        return self._take(reqs, out)

    def _take(self, reqs: list[Request], out: StepOut) -> list[tuple[Request, int]]:
        """Accept a step's certified greedy tokens, or sample from its logits."""
        if out.tokens is not None:
            return self._accept_all(reqs, out.tokens, [None] * len(reqs))
        return self._sample(reqs, out.logits)

    def _sample(self, reqs: list[Request], logits: Tensor) -> list[tuple[Request, int]]:
        constrained = [i for i, r in enumerate(reqs) if r.params.constraint is not None]
        if constrained:  # a copy: a compiled step may hand out its own output buffer
            logits = logits.clone()
            for i in constrained:
                allowed = reqs[i].params.constraint.allowed().to(logits.device)
                logits[i].masked_fill_(~allowed[: logits.shape[-1]], -math.inf)
        tokens, logprobs = self.sampler.sample(logits, [r.params for r in reqs], [r.prompt + r.tokens for r in reqs],
                                               [len(r.prompt) for r in reqs], [r.generator for r in reqs])
        return self._accept_all(reqs, tokens, logprobs)

    def _accept_all(self, reqs: list[Request], tokens: Tensor, logprobs: list[TokenLogprobs | None]
                    ) -> list[tuple[Request, int]]:
        events = []
        for req, token, lp in zip(reqs, tokens.tolist(), logprobs, strict=True):
            self._accept(req, token, lp)
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
        if req.stop_text is not None:
            req.text += req.stop_text.finish()
        self._release(req)

    def _release(self, req: Request) -> None:
        if req.row >= 0 and self.running.get(req.row) is req:
            del self.running[req.row]
            self.runtime.clear([req.row])
            self.free_rows.append(req.row)

    # --- conveniences -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Request]:
        """Run prompts to completion (as many at once as there are rows) and return them in order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while self.has_work:
            self.step()
        return reqs

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Tokens of one request as they are produced (a stop token itself is not part of the output)."""
        req, sent = self.submit(prompt, params), 0
        try:
            while not req.finished:
                self.step()
                yield from req.tokens[sent:]
                sent = len(req.tokens)
        finally:
            if not req.finished:
                self.cancel(req)
