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
- Decode steps of one row and of every row can run through torch.compile (`compile=True`, compiled.py):
  ~3x faster on CPU once built; partly filled batches take the full-batch step with throw-away rows. The
  model must not change afterwards (quantize it first): the compiled step does not re-check the model's
  modules on every call. On CPU a compiled engine also gives the model's int4 linears a compiled unpack for
  prompts (quantize.compile_prompt_unpack: a bf16 GEMM instead of the int4 kernel, ~1.3x faster prefill).
- Greedy steps of float models skip most of the output head: the token comes from a half-size copy of it
  (bf16 for fp32, int8 for bf16), certified against the exact logits of the 16 best candidates (screen.py),
  so a one-row fp32 step reads ~0.7 of the bytes for the same tokens. A step with any row that needs logits
  (sampling, penalties, logprobs) computes the full head, and so does a step the screen cannot certify.
  `screen=False` (or GEMMAKIT_SCREEN=off, for engines the CLI and server build) saves the copy's memory.
- Memory is known before it is allocated: the KV cache for `max_batch` rows x `context` tokens plus working
  memory is estimated first (cache.estimate_bytes), and an engine that would not fit is refused with the
  numbers instead of crashing later.

Speculative decoding (`speculative_generate`) runs a cheap drafter ahead and verifies its tokens with one
target forward pass; for greedy sampling the output is exactly plain greedy decoding. A drafter is anything
with `propose(last_token, position, k) -> list[int]` and `rollback(position)`; `ModelDrafter` wraps a small
model of the same tokenizer, and Gemma 4's MTP heads can implement the same two methods.
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

from gemmakit.cache import Append, Extend, KVCache, Prefill, check_fits_memory, estimate_bytes
from gemmakit.compiled import compile_decode, compile_supported
from gemmakit.flags import parse_switch
from gemmakit.model import Gemma
from gemmakit.quantize import UNPACK_ROWS, compile_prompt_unpack
from gemmakit.sampling import Sampler, SamplingParams, TokenLogprobs, fit_context, make_generator
from gemmakit.screen import HeadScreen, plan_screen, screen_bytes


def model_bytes(model: torch.nn.Module) -> int:
    from gemmakit.packing import packed_bytes

    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) + packed_bytes(model)


def forecast_bytes(model: Gemma, max_batch: int, context: int, compiled: bool, unpack_kernels: int = 0,
                   screen: bool = True, slack: int = 8, prefill_chunk: int = 512) -> dict[str, int]:
    """What an `Engine` with these settings will hold (cache.estimate_bytes), its head screen included."""
    dtype, device = model_dtype_device(model)
    plan = plan_screen(model, max_batch, compiled) if screen else None
    return estimate_bytes(model.config, max_batch, context, dtype, model_bytes(model), slack, prefill_chunk,
                          compiled=compiled, device_type=device.type, unpack_kernels=unpack_kernels,
                          head_screen=screen_bytes(*plan) if plan else 0)


def screen_wanted() -> bool:
    """GEMMAKIT_SCREEN: on (default) or off, for engines built without an explicit `screen=`."""
    return bool(parse_switch("GEMMAKIT_SCREEN", os.environ.get("GEMMAKIT_SCREEN", "on")))


def model_dtype_device(model: Gemma) -> tuple[torch.dtype, torch.device]:
    """The activation dtype and device: those of the first floating-point parameter or buffer."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    raise ValueError("the model has no floating-point weights")


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
        self.prefill_chunk = prefill_chunk
        compiled = compile and compile_supported(self.device)
        # int4 prompts take a bf16 GEMM on CPU in compiled engines (quantize.py says why): kernels to count.
        self.unpack_kernels = compile_prompt_unpack(model) if compiled else 0
        # Greedy rows pick from a screen of the head (screen.py): same tokens, half the head's bytes.
        screen = screen_wanted() if screen is None else screen
        self.memory = forecast_bytes(model, max_batch, self.context, compiled, self.unpack_kernels, screen, slack,
                                     prefill_chunk)
        if check_memory:
            check_fits_memory(self.memory, self.device, already_resident=self.memory["weights"])
        plan = plan_screen(model, max_batch, compiled) if screen else None
        self.screen: HeadScreen | None = HeadScreen(*plan) if plan else None
        self.cache = KVCache(config, max_batch, self.context, self.dtype, self.device, slack)
        self.sampler = Sampler(config.vocab_size)
        # Decode steps of one row (latency) or of every row (throughput) run compiled when asked and possible;
        # compiled.py says why not the others.
        self.compiled, self._decode_compiled = compiled, self._forward_decode
        self._greedy_compiled = self._forward_greedy
        if compiled:
            cache_tensors = [*self.cache.k.values(), *self.cache.v.values(), *self.cache.slot_pos.values()]
            self._decode_compiled = compile_decode(self._forward_decode, self.device, cache_tensors)
            if self.screen is not None:
                self._greedy_compiled = compile_decode(self._forward_greedy, self.device, cache_tensors)
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
            if self.screen is not None:
                kinds.append(SamplingParams(max_tokens=2, logprobs=0))
            for rows in sorted({self.max_batch, 1}):
                for params in kinds:
                    self.generate([bos] * rows, params)
            if self.unpack_kernels and self.context > UNPACK_ROWS:  # only prompts this long reach them
                self.generate([bos * UNPACK_ROWS], SamplingParams(max_tokens=1))

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
        row = torch.tensor([req.row], device=self.device)
        screened = self._screens([req], 1, compiled=False)
        forward = self.model.hidden if screened else self.model  # hidden states for the screen, else logits
        # In chunks, so a long prompt's working memory stays that of `prefill_chunk` tokens (as estimated).
        for start in range(0, len(req.prompt), self.prefill_chunk):
            chunk = req.prompt[start:start + self.prefill_chunk]
            pos = torch.arange(start, start + len(chunk), device=self.device)[None]
            step = (Prefill if start == 0 else Extend)(pos, self.cache, row)
            out = forward(torch.tensor([chunk], device=self.device), step=step, logits_to_keep=1)[:, -1]
        return self._pick([req], *self.screen(out), out) if screened else self._sample([req], out)

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        if not reqs:
            return []
        reqs = sorted(reqs, key=lambda r: r.row)
        rows = torch.tensor([r.row for r in reqs], device=self.device)
        ids = torch.tensor([[r.tokens[-1]] for r in reqs], device=self.device)
        pos = torch.tensor([[r.position] for r in reqs], device=self.device)
        padded = self.compiled and 1 < len(reqs) < self.max_batch
        compiled = self.compiled and (padded or len(reqs) in (1, self.max_batch))
        greedy = self._screens(reqs, self.max_batch if padded else len(reqs), compiled)
        if greedy:
            forward = self._greedy_compiled if compiled else self._forward_greedy
        else:
            forward = self._decode_compiled if compiled else self._forward_decode
        out = self._decode_padded(forward, ids, pos, rows) if padded else forward(
            ids, pos, rows, len(reqs) == self.max_batch)
        return self._pick(reqs, *out) if greedy else self._sample(reqs, out)

    def _decode_padded(self, forward: Any, ids: Tensor, pos: Tensor, rows: Tensor) -> Any:
        """A partly filled batch through the compiled full-batch step: free rows decode a throw-away token at
        position 0, which the next prefill of that row clears and rewrites. On CPU the matmuls of 8 rows cost
        about what 2 rows cost, while an eager step costs ~3x a compiled one; a graph per batch size would
        cost a compilation each."""
        full_ids = torch.zeros(self.max_batch, 1, dtype=ids.dtype, device=self.device)
        full_pos = torch.zeros(self.max_batch, 1, dtype=pos.dtype, device=self.device)
        full_ids[rows], full_pos[rows] = ids, pos
        every_row = torch.arange(self.max_batch, device=self.device)
        out = forward(full_ids, full_pos, every_row, True)
        return tuple(t[rows] for t in out) if isinstance(out, tuple) else out[rows]

    def _forward_decode(self, ids: Tensor, pos: Tensor, rows: Tensor, all_rows: bool) -> Tensor:
        # Every row decoding (rows sorted): attend over the cache in place rather than gathering a copy of it.
        return self.model(ids, step=Append(pos, self.cache, rows, all_rows))[:, -1]

    def _forward_greedy(self, ids: Tensor, pos: Tensor, rows: Tensor, all_rows: bool
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """A decode step whose rows are all plain greedy: (screened tokens, certified, hidden states)."""
        x = self.model.hidden(ids, step=Append(pos, self.cache, rows, all_rows))[:, -1]
        return (*self.screen(x), x)

    def _screens(self, reqs: list[Request], rows: int, compiled: bool) -> bool:
        """Whether this step's tokens come from the head screen: every row a plain argmax, and the screen
        usable for a step of `rows` rows."""
        return (self.screen is not None and self.screen.usable(rows, compiled)
                and all(r.params.plain_greedy for r in reqs))

    def _pick(self, reqs: list[Request], tokens: Tensor, certified: Tensor, x: Tensor
              ) -> list[tuple[Request, int]]:
        """Accept screened greedy tokens; a step the screen could not certify takes the full head."""
        if not bool(certified.all()):
            self.screen.fallbacks += 1
            return self._sample(reqs, self.model.head(x))
        return self._accept_all(reqs, tokens, [None] * len(reqs))

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
            self.cache.clear([req.row])
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
