"""The endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics and the chat page.

A request's `model` is the base model's name or a served LoRA adapter's (server.py); responses name the one
that answered, and /v1/models lists the base model, then each adapter with the base as its `parent`.

Every chat API comes through `start_chat`: chat completions here, and the Responses (responses.py) and
Messages (messages.py) APIs, which translate their requests into a `ChatRequest` and render `Run.updates()` in
their own wire formats. Both completion endpoints follow one path: build the prompts and per-choice sampling
parameters, submit the tickets, then either stream SSE chunks as updates arrive or collect them into one
response. A client that goes away mid-request (stream closed, or a plain request whose connection drops)
cancels its tickets.

A chat's images and audio are decoded and run through the towers in a worker thread before its tickets are
submitted (each ticket carries the prompt's soft tokens), so the engine thread and the event loop never wait
on them, and a source that is refused or cannot be decoded is that request's 400 and no one else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from gemmakit.chat.dialogue import STOP_STRINGS as DIALOGUE_STOPS
from gemmakit.chat.parser import StreamParser
from gemmakit.media.soft import MediaError, PromptMedia
from gemmakit.media.towers import check_kinds
from gemmakit.serve import protocol as P
from gemmakit.serve.choices import Choice
from gemmakit.serve.embeddings import model_entries
from gemmakit.serve.server import (
    HTTPFail,
    Server,
    check_fits,
    check_model,
    check_room,
    engine_failure,
    fail,
    key_matches,
    loaded,
    next_update,
    per_choice,
    ready,
    require_key,
    response_constraint,
    sse,
    submit_all,
    tool_constraint,
)


def install_routes(app: FastAPI) -> list[Any]:
    """The OpenAI chat and completion routes and the server's own; returns the key dependency, which the other
    APIs' routes (responses.py, messages.py, installed by app.py) take too."""
    keyed = [Depends(require_key)]  # on the routes themselves: holds under any mount prefix (app.py)
    app.post("/v1/chat/completions", summary="Create a chat completion (OpenAI-compatible)", dependencies=keyed,
             responses={200: {"model": P.ChatCompletion}, **P.ERRORS})(chat_completions)
    app.post("/v1/completions", summary="Create a text completion (OpenAI-compatible)", dependencies=keyed,
             responses={200: {"model": P.TextCompletion}, **P.ERRORS})(completions)
    app.get("/v1/models", summary="List the served model and its LoRA adapters", dependencies=keyed)(models)
    app.get("/health", summary="200 when the model is loaded and the engine runs, 503 while loading")(health)
    app.get("/metrics", summary="Prometheus metrics", response_class=Response, dependencies=keyed)(metrics)
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(page)
    return keyed


async def health(request: Request) -> JSONResponse:
    """ok / loading / failed; why it failed (which names files) and the model only to key holders."""
    state = request.app.state
    key = state.options.api_key
    detailed = not key or key_matches(request, key)
    server = state.server
    failure = state.load_error or (server is not None and engine_failure(server)) or None
    if failure:
        return JSONResponse({"status": "failed: " + failure if detailed else "failed"}, status_code=500)
    if not state.loaded:
        return JSONResponse({"status": "loading"}, status_code=503)
    name = server.name if server is not None else state.embeddings.name  # an embeddings-only server
    return JSONResponse({"status": "ok", "model": name} if detailed else {"status": "ok"})


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> dict:
    loaded(request)
    server, chat = request.app.state.server, []
    if server is not None:  # else an embeddings-only server
        base = {"id": server.name, "object": "model", "created": int(time.time()), "owned_by": "gemmakit",
                "max_model_len": server.context}
        chat = [base, *({**base, "id": name, "parent": server.name} for name in server.adapters)]
    return {"object": "list", "data": [*chat, *model_entries(request.app)]}


async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("gemmakit.serve").joinpath("page.html").read_text())


# --- chat -----------------------------------------------------------------------------------------------
async def chat_completions(body: P.ChatRequest, request: Request) -> Any:
    server = ready(request)
    run = await start_chat(server, request, body)
    if isinstance(run, Refused):
        return _refused(server, body, run.message, model=run.model)
    if body.stream:
        return StreamingResponse(run.sse_stream("chat.completion.chunk", run.chat_chunks(body.logprobs),
                                                body.include_usage), media_type="text/event-stream")
    await run.collect()
    return P.envelope("chat.completion", run.rid, run.model, [
        {"index": c.index, "message": c.message(), "finish_reason": c.finish_reason,
         "logprobs": {"content": P.chat_logprobs(c.logprobs, server.piece)} if body.logprobs else None}
        for c in run.choices], run.usage())


@dataclass
class Refused:
    """An input guard said no: the model never sees the request; `message` is the guard's answer."""

    message: str
    model: str


async def start_chat(server: Server, request: Request, body: P.ChatRequest, rid: str | None = None) -> Run | Refused:
    """Check, render and submit a chat request; the running tickets, or the input guard's refusal. Every chat
    API (chat completions, Responses, Messages) translates its request into a `ChatRequest` and comes here, so
    they share one set of checks, guards, constraints and prompt rules; each then renders `Run.updates()` in its
    own wire format. `rid`: the id the answer carries (default a chat-completion id)."""
    adapter = check_model(server, body.model)
    model = adapter or server.name
    check_room(server, body.n)
    llm = server.llm
    messages = P.check_messages(body.messages)
    kinds = P.media_kinds(messages)
    check_media_kinds(llm, server.name, kinds)  # before anything is decoded
    if refusal := server.check_input(messages):
        return Refused(refusal, model)
    if server.guard is not None:  # redacts personal data, may refuse; off the event loop (policies run a model)
        messages, verdict = await asyncio.to_thread(server.guard.check_messages, messages)  # text parts too
        if verdict.refusal:
            return Refused(verdict.refusal, model)
    tools = None if body.tool_choice == "none" else body.tools
    # Rendering (a checkpoint's template), tokenizing, decoding images / audio and the tower forward are CPU
    # (or device) work: off the event loop other requests need.
    async with server.media_slots if kinds else contextlib.nullcontext():
        ids, media = await asyncio.to_thread(chat_prompt, llm, messages, tools, body.thinking, server.media_policy)
    max_tokens = check_fits(server, len(ids), body.max_completion_tokens or body.max_tokens, "messages")
    params = body.sampling(max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                           llm.model.config.vocab_size)
    params.stop_token_ids = tuple(llm.stop_ids())
    if llm.is_base:
        params.stop += DIALOGUE_STOPS
    choices = [Choice(i, None if llm.is_base else StreamParser(llm.chat_format.family), llm.is_base)
               for i in range(body.n)]
    if server.guard is not None:
        last_user = next((_text_of(m["content"]) for m in reversed(messages) if m.get("role") == "user"), None)
        for c in choices:
            c.add_guard(server.guard, last_user)
    if body.response_format or body.tool_choice not in (None, "auto", "none"):
        await asyncio.to_thread(server.grammars)  # built once (~3 s), off the event loop other streams need
    constraint = await asyncio.to_thread(response_constraint, server, body.response_format)  # compiles it
    if body.tool_choice not in (None, "auto", "none") or (tools and constraint is None):  # auto: from <|tool_call>
        if constraint is not None:
            raise P.ParamError("tool_choice and response_format cannot both constrain one output", "tool_choice")
        constraint = await asyncio.to_thread(tool_constraint, server, body.tool_choice or "auto", tools)
    tickets, events = submit_all(server, [ids] * body.n, per_choice(params, body.n, constraint), [media] * body.n,
                                 adapter)
    return Run(server, request, tickets, events, choices, rid or P.new_id("chatcmpl"), len(ids), model)


def chat_prompt(llm: Any, messages: list[dict], tools: list[dict] | None, thinking: Any, policy: Any
                 ) -> tuple[list[int], PromptMedia | None]:
    """The prompt ids and the soft tokens of its media; what the request got wrong is a 400 naming messages."""
    try:
        return llm.prepare_chat(messages, tools, thinking, policy)
    except MediaError as e:  # a source the policy refuses, bytes no decoder reads, over a limit
        raise P.ParamError(str(e), "messages", "invalid_media") from None
    except ValueError as e:  # e.g. tools for a base model, a template that refuses the messages, a too-short clip
        raise P.ParamError(str(e), "messages") from None


def check_media_kinds(llm: Any, name: str, kinds: set[str]) -> None:
    """Images or audio the model has no tower for are refused before any of them is decoded."""
    try:
        check_kinds(llm.model, kinds, name)
    except MediaError as e:
        raise P.ParamError(str(e), "messages", "unsupported_media") from e


def _text_of(content: Any) -> str | None:
    """A message's text: the string, or its text parts joined (None without content)."""
    if isinstance(content, list):
        return "".join(p["text"] for p in content if p["type"] == "text")
    return content


def _refused(server: Server, body: Any, message: str, count: int | None = None, model: str | None = None) -> Any:
    """An input guard said no: the model never sees the request. Chat and text completions alike. `model`: the
    name the answer carries (an adapter's; default the base model's)."""
    model = model or server.name
    chat = isinstance(body, P.ChatRequest)
    kind, rid = ("chat.completion", P.new_id("chatcmpl")) if chat else ("text_completion", P.new_id("cmpl"))
    answer = {"message": {"role": "assistant", "content": message}} if chat else {"text": message}
    choices = [{"index": i, **answer, "finish_reason": "content_filter", "logprobs": None}
               for i in range(body.n if count is None else count)]
    if not body.stream:
        return P.envelope(kind, rid, model, choices, P.usage(0, 0))

    async def events() -> AsyncIterator[str]:
        for c in choices:
            delta = {"delta": {"role": "assistant", "content": message}} if chat else {"text": message}
            yield sse(P.envelope(kind + (".chunk" if chat else ""), rid, model, [
                {"index": c["index"], **delta, "logprobs": None, "finish_reason": "content_filter"}]))
        yield sse("[DONE]")
    return StreamingResponse(events(), media_type="text/event-stream")


# --- completions ----------------------------------------------------------------------------------------
async def completions(body: P.CompletionRequest, request: Request) -> Any:
    server = ready(request)
    adapter = check_model(server, body.model)
    model = adapter or server.name
    if body.suffix:
        raise P.ParamError("suffix is not supported", "suffix", "unsupported_value")
    check_room(server, _prompt_count(body.prompt) * body.n, "prompt")  # before any work is built for them
    prompts = await asyncio.to_thread(_prompt_ids, server, body.prompt)
    texts: list[str | None] = [None] * len(prompts)
    if server.guard is not None:
        prompts, texts, refusal = await asyncio.to_thread(_guard_prompts, server, prompts)
        if refusal:
            return _refused(server, body, refusal, len(prompts) * body.n, model)
    max_tokens = max(check_fits(server, len(ids), body.max_tokens, "prompt") for ids in prompts)
    params = body.sampling(max_tokens, body.logprobs, server.llm.model.config.vocab_size)
    params.stop_token_ids = tuple(server.llm.stop_ids(chat=False))
    all_ids = [ids for ids in prompts for _ in range(body.n)]
    all_params = [p for _ in prompts for p in per_choice(params, body.n, None)]
    choices = [Choice(i) for i in range(len(all_ids))]
    if server.guard is not None:
        for c in choices:
            c.add_guard(server.guard, texts[c.index // body.n])
    tickets, events = submit_all(server, all_ids, all_params, adapter=adapter)
    run = Run(server, request, tickets, events, choices, P.new_id("cmpl"), sum(map(len, prompts)), model)
    echo = [server.llm.tokenizer.decode(ids, skip_special_tokens=True) if body.echo else "" for ids in all_ids]
    if body.stream:
        return StreamingResponse(run.sse_stream("text_completion", run.completion_chunks(body.logprobs, echo),
                                                body.include_usage), media_type="text/event-stream")
    await run.collect()
    return P.envelope("text_completion", run.rid, model, [
        {"index": c.index, "text": echo[c.index] + c.content, "finish_reason": c.finish_reason,
         "logprobs": None if body.logprobs is None else P.completion_logprobs(c.logprobs, server.piece,
                                                                                len(echo[c.index]))}
        for c in choices], run.usage())


def _prompt_items(prompt: Any) -> list[Any]:
    """The prompts of a completion request: a string, strings, token ids, or lists of token ids."""
    return prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]


def _prompt_count(prompt: Any) -> int:
    return len(_prompt_items(prompt))


def _prompt_ids(server: Server, prompt: Any) -> list[list[int]]:
    """The prompt as token-id lists: a string, strings, token ids, or lists of token ids."""
    tok, vocab = server.llm.tokenizer, server.llm.model.config.vocab_size
    items = _prompt_items(prompt)
    out = []
    for item in items:
        ids = tok.encode(item) if isinstance(item, str) else list(item)
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise P.ParamError(f"prompt must be non-empty text or token ids in [0, {vocab})", "prompt")
        out.append(ids)
    if not out:
        raise P.ParamError("prompt is empty", "prompt")
    return out


def _guard_prompts(server: Server, prompts: list[list[int]]) -> tuple[list[list[int]], list[str], str | None]:
    """Each prompt's text through the input rules: (prompt ids, with redacted ones re-encoded from their redacted
    text; the texts; the first refusal or None). Token-id prompts are checked as the text they decode to."""
    tok, ids_out, texts = server.llm.tokenizer, [], []
    for ids in prompts:
        text = tok.decode(ids, skip_special_tokens=True)
        verdict = server.guard.check(text, "input")
        if verdict.refusal:
            return prompts, texts, verdict.refusal
        ids_out.append(ids if verdict.text == text else tok.encode(verdict.text))
        texts.append(verdict.text)
    return ids_out, texts, None


# --- one request's run ----------------------------------------------------------------------------------
class Run:
    """The tickets of one request and their choices, consumed as a stream or collected; `model` is the name the
    chunks carry (the adapter's, or the base model's)."""

    def __init__(self, server: Server, request: Request, tickets: list, events: Any, choices: list[Choice],
                 rid: str, prompt_tokens: int, model: str):
        self.server, self.request, self.tickets, self.events = server, request, tickets, events
        self.choices, self.rid, self.prompt_tokens, self.model = choices, rid, prompt_tokens, model

    def usage(self) -> dict:
        """Token counts; cached_tokens: the most prompt tokens any choice took from the prefix cache (the
        engine sets it at admission, before the first token reaches us)."""
        cached = max((t.request.cached_tokens for t in self.tickets if t.request is not None), default=0)
        return P.usage(self.prompt_tokens, sum(c.tokens for c in self.choices), cached)

    def cancel(self) -> None:
        for t in self.tickets:
            self.server.loop.cancel(t)

    async def updates(self) -> AsyncIterator[tuple[Choice, Any]]:
        """(choice, delta) per update until every choice has finished; cancels the rest on the way out."""
        try:
            while not all(c.finished for c in self.choices):
                got = await next_update(self.events, self.request)
                if got is None:  # the client went away
                    return
                index, update = got
                if update.error:  # this request's own failure: the other rows went on (loop.py)
                    if update.finish_reason == "invalid":
                        raise HTTPFail(fail(400, update.error))
                    raise HTTPFail(fail(500, update.error, code="generation_failed", type="server_error"))
                choice = self.choices[index]
                if choice.filtered:  # cut by a guard: what was already in flight is dropped
                    continue
                delta = choice.feed(update)
                refusal = self.server.check_output(choice.content)
                if choice.watch is not None and not refusal:  # off the loop: policy rules run a model
                    refusal = await asyncio.to_thread(choice.guard, delta)
                if refusal and not choice.filtered:
                    choice.filtered, choice.engine_reason = True, "content_filter"
                    choice.content, choice.reasoning, choice.tool_calls = refusal, "", []
                    self.server.loop.cancel(self.tickets[index])
                    delta.content, delta.reasoning, delta.tool_calls = "", "", []
                yield choice, delta
        finally:
            self.cancel()

    async def collect(self) -> None:
        async for _ in self.updates():
            pass

    async def sse_stream(self, kind: str, chunks: AsyncIterator[dict], include_usage: bool) -> AsyncIterator[str]:
        """Chunks as SSE events, then the usage chunk if asked, then [DONE]; an error mid-way is an event too."""
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except HTTPFail as e:
            yield sse(json.loads(e.response.body))
        if include_usage:
            yield sse(P.envelope(kind, self.rid, self.model, [], self.usage()))
        yield sse("[DONE]")

    async def chat_chunks(self, logprobs: bool) -> AsyncIterator[dict]:
        name = self.model
        for c in self.choices:
            yield P.envelope("chat.completion.chunk", self.rid, name, [
                {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}])
        calls, sent_lp = [0] * len(self.choices), [0] * len(self.choices)
        async for c, delta in self.updates():
            out = c.delta_json(delta, calls[c.index])
            calls[c.index] += len(delta.tool_calls)
            lp = None
            if logprobs and len(c.logprobs) > sent_lp[c.index]:
                lp = {"content": P.chat_logprobs(c.logprobs[sent_lp[c.index]:], self.server.piece)}
                sent_lp[c.index] = len(c.logprobs)
            if out or lp or c.finished:
                yield P.envelope("chat.completion.chunk", self.rid, name, [
                    {"index": c.index, "delta": out, "logprobs": lp,
                     "finish_reason": c.finish_reason if c.finished else None}])

    async def completion_chunks(self, logprobs: int | None, echo: list[str]) -> AsyncIterator[dict]:
        sent_lp, started = [0] * len(self.choices), [False] * len(self.choices)
        async for c, delta in self.updates():
            text = ("" if started[c.index] else echo[c.index]) + delta.content
            started[c.index] = True
            lp = None
            if logprobs is not None:
                lp = P.completion_logprobs(c.logprobs[sent_lp[c.index]:], self.server.piece, 0)
                sent_lp[c.index] = len(c.logprobs)
            yield P.envelope("text_completion", self.rid, self.model, [
                {"index": c.index, "text": text, "logprobs": lp,
                 "finish_reason": c.finish_reason if c.finished else None}])
