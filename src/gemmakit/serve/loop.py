"""Continuous batching: one thread owns the engine; HTTP handlers talk to it through tickets.

The engine (engine.py) is single-threaded by design: `step()` decodes one token for every running sequence,
then admits waiting requests into free rows. `EngineLoop` runs that in a thread of its own, so requests join
and leave the running batch between two decode steps while the asyncio side stays free to accept
connections. A handler gets a `Ticket` for each sequence it wants (its prompt ids, and the soft tokens of its
images / audio, already computed by the handler off the event loop: the engine thread only places them); the
loop pushes `Update`s (new text, token ids, logprobs, finish reason) into the ticket's asyncio queue through
`call_soon_threadsafe`, and a cancelled ticket (its client went away) leaves the batch before the next step.

Admission is bounded: at most `max_queue` sequences wait for a row; beyond that `submit` raises `QueueFull`
and the server answers 429.

Errors stay where they belong. The engine ends a request that fails by itself (a grammar that refuses its
token, NaN logits, a processor that raises) with an error of its own, and only that ticket hears it. An
error the engine cannot pin on one request ends what the engine holds (`Engine.abort`, which also frees every
row) and the loop goes on serving. Only if the thread itself dies does `failure` say why (`/health` reports
it), every waiting client gets an error, and later submissions are answered with that error at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gemmakit.checkpoints.common import return_freed_memory
from gemmakit.engine import Engine, Request
from gemmakit.media.soft import PromptMedia
from gemmakit.sampling import SamplingParams, TokenLogprobs

log = logging.getLogger("gemmakit.serve")


class QueueFull(Exception):
    pass


@dataclass
class Update:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Ticket:
    prompt: list[int]
    params: SamplingParams
    events: asyncio.Queue  # receives (index, Update); the tickets of one HTTP request may share it
    loop: asyncio.AbstractEventLoop
    index: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    request: Request | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    last_token_at: float | None = None
    media: PromptMedia | None = None  # the prompt's image / audio soft tokens; None for text
    adapter: str | None = None  # the LoRA adapter that answers (adapters.py); None: the base model

    def push(self, update: Update) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down): nobody listens
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, update))


class EngineLoop:
    """The engine's own thread: admits and cancels tickets between steps, steps, and reports every token."""

    def __init__(self, engine: Engine, max_queue: int = 64, metrics: Any = None):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tickets: dict[int, Ticket] = {}
        self._stop = self._busy = False
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="gemmakit-engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # --- the asyncio side -----------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, events: asyncio.Queue | None = None,
               index: int = 0, media: PromptMedia | None = None, adapter: str | None = None) -> Ticket:
        if self.waiting >= self.max_queue:
            raise QueueFull(f"{self.waiting} requests are already waiting for a slot (--max-queue {self.max_queue})")
        ticket = Ticket(prompt, params, events or asyncio.Queue(), asyncio.get_running_loop(), index, media=media,
                        adapter=adapter)
        if self._failure is not None:  # nothing would ever answer it
            ticket.push(Update(error=self._failure, finish_reason="error"))
            return ticket
        self._inbox.put(("add", ticket))
        self._wake.set()
        if self._failure is not None:  # it died while we queued: _orphan_all may have drained the inbox already
            self._orphan_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        self._inbox.put(("cancel", ticket))
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Sequences not yet in a row: the engine's queue plus what the loop has not picked up yet."""
        return len(self.engine.waiting) + self._inbox.qsize()

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def alive(self) -> bool:
        """The engine thread is running and has not died."""
        return self._thread.is_alive() and self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the engine thread died; None while it runs (and after a clean `stop`)."""
        return self._failure

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                try:
                    self._turn()
                except Exception as e:  # nobody to blame: end what the engine held, keep serving
                    log.exception("the engine loop failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                    time.sleep(0.05)  # an error that repeats every round must not spin a core
        except BaseException as e:  # _fail_all itself failed, or the thread is being torn down
            self._failure = f"the engine thread died: {type(e).__name__}: {e}"
            log.critical("%s; /health reports it and requests are refused", self._failure)
            self._orphan_all()
            raise

    def _turn(self) -> None:
        """One round: pick up new and cancelled tickets, then one engine step (or a nap when idle)."""
        self._drain_inbox()
        if self.metrics is not None:
            self.metrics.observe_batch(self.running, self.waiting)
        if not self.engine.has_work:
            if self._busy:  # gone idle: hand the heap that requests left behind back to the OS
                return_freed_memory()
            self._busy = False
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return
        self._busy = True
        self._dispatch(self.engine.step())
        stats = self.engine.drafter_stats
        if self.metrics is not None and stats is not None:
            self.metrics.observe_speculation(stats.drafted, stats.accepted)

    def _take_inbox(self) -> Iterator[tuple[str, Ticket]]:
        """What the asyncio side has put in the inbox so far, ("add" | "cancel", ticket), oldest first."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for op, ticket in self._take_inbox():
            if op == "add":
                try:
                    ticket.request = self.engine.submit(ticket.prompt, ticket.params, ticket.media, ticket.adapter)
                except ValueError as e:  # the request itself is at fault (the handlers check most of it first)
                    ticket.push(Update(error=str(e), finish_reason="invalid"))
                    continue
                except Exception as e:
                    ticket.push(Update(error=f"could not start: {type(e).__name__}: {e}", finish_reason="error"))
                    continue
                self._tickets[ticket.request.id] = ticket
            elif ticket.request is not None and not ticket.request.finished:
                self.engine.cancel(ticket.request)
                self._tickets.pop(ticket.request.id, None)

    def _dispatch(self, events: list[tuple[Request, int]]) -> None:
        """Send every ticket its new tokens; a request the engine ended with an error gets that error alone."""
        now = time.perf_counter()
        for req in {id(r): r for r, _ in events}.values():
            ticket = self._tickets.get(req.id)
            if ticket is None:
                continue
            if req.error is not None:
                self._tickets.pop(req.id, None)
                ticket.push(Update(error=req.error, finish_reason="error"))
                continue
            update = Update(text=req.text[ticket.sent_text:], tokens=req.tokens[ticket.sent_tokens:],
                            logprobs=req.logprobs[ticket.sent_tokens:], finish_reason=req.finish_reason)
            ticket.sent_text, ticket.sent_tokens = len(req.text), len(req.tokens)
            if self.metrics is not None:
                first = ticket.last_token_at is None
                self.metrics.observe_tokens(now - (ticket.submitted if first else ticket.last_token_at), first,
                                            len(update.tokens))
                if first and req.cached_tokens:
                    self.metrics.prefix_hit_tokens.inc(req.cached_tokens)
            ticket.last_token_at = now
            ticket.push(update)
            if req.finished:
                self._tickets.pop(req.id, None)

    def _fail_all(self, message: str) -> None:
        """An error outside any one request: the engine ends all it holds and frees every row (so the next
        request starts from a consistent engine), and each of their clients hears why."""
        self.engine.abort(message)
        for ticket in list(self._tickets.values()):
            ticket.push(Update(error=message, finish_reason="error"))
        self._tickets.clear()

    def _orphan_all(self) -> None:
        """The thread is dying: no client may wait forever for an update that will never come."""
        for ticket in list(self._tickets.values()):
            ticket.push(Update(error=self._failure or "the engine stopped", finish_reason="error"))
        self._tickets.clear()
        for op, ticket in self._take_inbox():
            if op == "add":
                ticket.push(Update(error=self._failure or "the engine stopped", finish_reason="error"))
