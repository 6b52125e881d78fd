"""The Anthropic Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`, as the `anthropic` SDK
and clients built on it (Claude Code) speak it.

Why a translation and not a second chat path: a Messages request is turned into the `ChatRequest` chat
completions take and goes through `routes.start_chat`, so it gets the same checks, guards, grammars, prompt rules
and engine; only the wire format differs. The translation:

- `system` (a string or text blocks) becomes the first, system message.
- A user message's `tool_result` blocks become OpenAI `tool` messages, in order, before the rest of that message
  (text and images: an image's base64 or url source becomes a data/http URL on the existing image path). An
  error result reaches the model as `{"error": ...}`.
- An assistant message's `tool_use` blocks become its `tool_calls` (arguments: the input as JSON), its `thinking`
  blocks its `reasoning` (which the Gemma 4 template renders for turns after the last user message); a
  `redacted_thinking` block is dropped. A trailing assistant message (a prefill) is refused: the chat templates
  can only open a new model turn, not continue one.
- `tools` become functions (input_schema -> parameters); Anthropic's server tools (web search, code execution,
  ...) are refused by name. `tool_choice` auto/any/tool/none is OpenAI's auto/required/named/none; with
  `disable_parallel_tool_use` only the first call of an answer is returned (the model is not held to one).
- `thinking` enabled or adaptive turns Gemma 4 thinking on, disabled (or none) off. Gemma has no thinking budget,
  so `budget_tokens` is accepted and not enforced; `display: "omitted"` returns thinking blocks with empty text.
- `output_config.format` (a JSON schema) constrains the answer as chat completions' response_format does.
- Sampling: the SDK no longer sends temperature / top_p / top_k itself; they are taken from the body
  (`extra_body`) when given, with Gemma's defaults otherwise.
- `stop_sequences`: up to MAX_STOP_SEQUENCES (more than OpenAI's 4: Anthropic sets no such bound, and the engine
  matches every stop string in O(1) per character, so the bound is only there to keep a request's cost finite).

Thinking signatures: each thinking block is signed with an HMAC-SHA256 of its (trimmed) text under a secret that
lives as long as the server process. A thinking block sent back is rendered as the model's earlier reasoning only
when its signature checks out; anything else (text a client wrote, a block from another server or from before a
restart) is dropped rather than passed off to the model as its own thoughts. The signature proves origin only;
it holds no hidden state.

Auth is the server's API key as `x-api-key` (what the SDK sends) or `Authorization: Bearer`; the
`anthropic-version` and `anthropic-beta` headers are accepted and not needed.

A `max_tokens` past what the context leaves is not refused, as Anthropic's current models do not refuse it:
clients such as Claude Code send a large one whatever the model. The answer may then run to the end of the
context, and says so with stop_reason model_context_window_exceeded; a prompt that leaves no room is a 400.

Answers: `stop_reason` is tool_use when the answer calls a tool, max_tokens at the limit, refusal when a guard
cut it, stop_sequence when one of the client's stop sequences ended it (the engine cuts the text without saying
which string matched, so `stop_sequence` is found again in the decoded tokens), else end_turn. Usage follows
Anthropic's split: `input_tokens` are the prompt tokens computed, `cache_read_input_tokens` those the prefix
cache supplied, `cache_creation_input_tokens` is 0 (nothing is billed for writing the cache).

Streaming sends Anthropic's events: message_start, ping, per block content_block_start / _delta / _stop (text,
thinking then its signature, tool_use with input_json_delta fragments: incremental when the parser gives call
parts, else the whole arguments in one), message_delta (stop_reason, final usage), message_stop; a failure after
the stream started is an `error` event. Errors before it, on every path under /v1/messages (validation, auth,
unknown model, a full queue, no such route), are Anthropic's envelope, by `AnthropicErrors` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from gemmakit.serve import protocol as P
from gemmakit.serve.messages_input import CountTokensRequest, MessagesRequest, sign, thinking_mode, to_chat
from gemmakit.serve.routes import Refused, Run, chat_prompt, check_media_kinds, start_chat
from gemmakit.serve.server import HTTPFail, Server, check_model, ready, sse

_PATH = re.compile(r"/v1/messages(/|$)")


def install_messages(app: FastAPI, keyed: list) -> None:
    """The two routes (behind the API key, `keyed`), and Anthropic's error envelope for every path under them."""
    app.post("/v1/messages", summary="Create a message (Anthropic Messages API)", dependencies=keyed)(create_message)
    app.post("/v1/messages/count_tokens", summary="Count a message's input tokens (Anthropic Messages API)",
             dependencies=keyed)(count_tokens)
    app.add_middleware(AnthropicErrors)


# --- handlers -------------------------------------------------------------------------------------------
async def create_message(body: MessagesRequest, request: Request) -> Any:
    server = ready(request)
    chat, rid = to_chat(body), P.new_id("msg", "_")
    try:
        run = await start_chat(server, request, chat, rid)
    except P.ParamError as e:  # max_tokens past the context: generate up to its end instead (module docstring)
        if e.code != "context_length_exceeded":
            raise
        run = await start_chat(server, request, chat.model_copy(update={"max_tokens": None}), rid)
    answer = _Answer(server, body)
    if isinstance(run, Refused):
        return answer.refused(run) if not body.stream else StreamingResponse(
            _refused_events(answer, run), media_type="text/event-stream")
    if body.stream:
        return StreamingResponse(_events(answer, run), media_type="text/event-stream")
    await run.collect()
    return answer.message(run)


async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    """The prompt's tokens as `create` would render it (images as their soft tokens), without generating."""
    server = ready(request)
    check_model(server, body.model)
    chat = to_chat(body)
    llm = server.llm
    messages = P.check_messages(chat.messages)
    kinds = P.media_kinds(messages)
    check_media_kinds(llm, server.name, kinds)
    tools = None if chat.tool_choice == "none" else chat.tools
    async with server.media_slots if kinds else contextlib.nullcontext():
        ids, _ = await asyncio.to_thread(chat_prompt, llm, messages, tools, chat.thinking, server.media_policy)
    return {"input_tokens": len(ids)}


# --- answers --------------------------------------------------------------------------------------------
class _Answer:
    """What a request's answer needs besides its run: the stop sequences asked for, and the tool and thinking
    options that shape the content blocks."""

    def __init__(self, server: Server, body: MessagesRequest):
        self.server, self.stops, self.max_tokens = server, list(body.stop_sequences or []), body.max_tokens
        self.single = bool(body.tool_choice and body.tool_choice.get("disable_parallel_tool_use"))
        self.omit_thinking = thinking_mode(body.thinking)[1]

    def start(self, rid: str, model: str, usage: dict) -> dict:
        return {"id": rid, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage}

    def message(self, run: Run) -> dict:
        c = run.choices[0]
        content: list[dict[str, Any]] = []
        if c.reasoning.strip():
            shown = "" if self.omit_thinking else c.reasoning.strip()
            content.append({"type": "thinking", "thinking": shown, "signature": sign(shown)})
        if c.content.strip():
            content.append({"type": "text", "text": c.content.strip()})
        for call in c.tool_calls[:1] if self.single else c.tool_calls:
            content.append({"type": "tool_use", "id": _tool_id(), "name": call.name,
                            "input": json.loads(call.arguments)})
        reason, sequence = self.stop(run)
        return {**self.start(run.rid, run.model, self.usage(run)), "content": content, "stop_reason": reason,
                "stop_sequence": sequence}

    def refused(self, refusal: Refused) -> dict:
        return {**self.start(P.new_id("msg", "_"), refusal.model, _usage(0, 0, 0)),
                "content": [{"type": "text", "text": refusal.message}], "stop_reason": "refusal"}

    def usage(self, run: Run) -> dict:
        cached = run.usage()["prompt_tokens_details"]["cached_tokens"]
        return _usage(run.prompt_tokens - cached, sum(c.tokens for c in run.choices), cached)

    def stop(self, run: Run) -> tuple[str, str | None]:
        """(stop_reason, the stop sequence that ended the answer or None)."""
        c = run.choices[0]
        if c.filtered:
            return "refusal", None
        if c.tool_calls:
            return "tool_use", None
        if c.engine_reason == "length":
            return ("max_tokens" if c.tokens >= self.max_tokens else "model_context_window_exceeded"), None
        matched = self._matched_stop(run)
        return ("stop_sequence", matched) if matched is not None else ("end_turn", None)

    def _matched_stop(self, run: Run) -> str | None:
        """Which of the client's stop sequences ended generation: the engine says only "stop", so the one that
        completes first in the decoded tokens (its stop strings are cut the same way), if any does."""
        req = run.tickets[0].request
        if not self.stops or req is None or req.stop_text is None or not req.stop_text.stopped:
            return None
        text = self.server.llm.tokenizer.decode(req.tokens)
        ends = {s: text.find(s) + len(s) for s in req.params.stop if s in text}
        first = min(ends, key=lambda s: (ends[s], ends[s] - len(s)), default=None)
        return first if first in self.stops else None


def _usage(fresh: int, output: int, cached: int) -> dict:
    return {"input_tokens": fresh, "output_tokens": output, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0}


def _tool_id() -> str:
    return P.new_id("toolu", "_")


def event(kind: str, data: dict) -> str:
    return sse({"type": kind, **data}, kind)


async def _events(answer: _Answer, run: Run) -> AsyncIterator[str]:
    yield event("message_start", {"message": answer.start(run.rid, run.model, answer.usage(run))})
    yield event("ping", {})
    blocks = _Blocks(answer.single, answer.omit_thinking)
    try:
        async for choice, delta in run.updates():
            # Under a guard, which checks arguments whole, calls go out whole too (as chat completions send them).
            for out in blocks.feed(delta, whole_calls=choice.watch is not None or choice.filtered):
                yield out
    except HTTPFail as e:
        yield event("error", {"error": anthropic_error(e.response.status_code, e.response.body)["error"]})
        return
    for out in blocks.close():
        yield out
    reason, sequence = answer.stop(run)
    yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                  "usage": answer.usage(run)})
    yield event("message_stop", {})


async def _refused_events(answer: _Answer, refusal: Refused) -> AsyncIterator[str]:
    message = answer.refused(refusal)
    yield event("message_start", {"message": {**message, "content": [], "stop_reason": None}})
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": refusal.message}})
    yield event("content_block_stop", {"index": 0})
    yield event("message_delta", {"delta": {"stop_reason": "refusal", "stop_sequence": None},
                                  "usage": message["usage"]})
    yield event("message_stop", {})


class _Blocks:
    """Turns a choice's deltas into content-block events: a block opens when its kind of output starts (leading
    whitespace before a block's first text is dropped, as the plain answer trims it) and closes when another
    starts or the answer ends; a thinking block's signature goes out just before it closes."""

    def __init__(self, single: bool, omit_thinking: bool):
        self.single, self.omit_thinking = single, omit_thinking
        self.index, self.open = -1, None  # the open block's index and kind ("thinking", "text", "tool_use")
        self.thinking = ""
        self.calls = 0  # completed tool calls seen
        self.streamed: dict[int, int] = {}  # call index -> its block, for calls whose parts were streamed

    def feed(self, delta: Any, whole_calls: bool = False) -> list[str]:
        out: list[str] = []
        if delta.reasoning:
            out += self._text("thinking", delta.reasoning)
        if delta.content:
            out += self._text("text", delta.content)
        for part in [] if whole_calls else getattr(delta, "call_parts", None) or []:
            out += self._part(part)
        for call in delta.tool_calls:
            out += self._call(call)
        return out

    def close(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": sign(self._shown())}))
        out.append(event("content_block_stop", {"index": self.index}))
        self.open = None
        return out

    def _start(self, block: dict) -> list[str]:
        out = self.close()
        self.index += 1
        self.open = block["type"]
        return [*out, event("content_block_start", {"index": self.index, "content_block": block})]

    def _delta(self, delta: dict) -> str:
        return event("content_block_delta", {"index": self.index, "delta": delta})

    def _shown(self) -> str:
        return "" if self.omit_thinking else self.thinking

    def _text(self, kind: str, text: str) -> list[str]:
        out = []
        if self.open != kind:
            text = text.lstrip()
            if not text:
                return []
            out += self._start({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                               else {"type": "text", "text": ""})
            self.thinking = ""  # after _start: closing the block before signs the text it had
        if kind == "thinking":
            self.thinking += text
            if not self.omit_thinking:
                out.append(self._delta({"type": "thinking_delta", "thinking": text}))
        else:
            out.append(self._delta({"type": "text_delta", "text": text}))
        return out

    def _part(self, part: Any) -> list[str]:
        """A piece of a tool call as it streams: its name first (a new block), then argument fragments."""
        if self.single and part.index > 0:
            return []
        out = []
        if part.index not in self.streamed:
            out += self._start({"type": "tool_use", "id": _tool_id(), "name": part.name, "input": {}})
            self.streamed[part.index] = self.index
        if part.arguments and self.streamed[part.index] == self.index:
            out.append(self._delta({"type": "input_json_delta", "partial_json": part.arguments}))
        return out

    def _call(self, call: Any) -> list[str]:
        """A completed tool call: closes its streamed block, or is sent whole when it came without parts."""
        index, self.calls = self.calls, self.calls + 1
        if self.single and index > 0:
            return []
        if index in self.streamed:
            return self.close() if self.streamed[index] == self.index else []
        out = self._start({"type": "tool_use", "id": _tool_id(), "name": call.name, "input": {}})
        out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        return out + self.close()


# --- errors ---------------------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                529: "overloaded_error"}


def anthropic_error(status: int, body: bytes) -> dict:
    """Anthropic's error envelope for an error response the rest of the server wrote in OpenAI's shape."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip() or f"HTTP {status}"
    if status == 401:
        message = "missing or wrong API key: send 'x-api-key: <key>' (or 'Authorization: Bearer <key>')"
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicErrors:
    """Pure ASGI middleware: an error response (status >= 400) on a path under /v1/messages is rewritten into
    Anthropic's envelope. Every refusal there (a body that fails validation, a wrong key, an unknown model, a
    full queue, no such route) is written by the server's shared handlers in OpenAI's shape first; converting
    the finished response keeps those handlers single and every other path as it was. Only whole, small error
    bodies are touched: successful responses (and streams) pass through untouched."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _PATH.search(scope.get("path", "")):
            return await self.app(scope, receive, send)
        start: dict | None = None
        body: list[bytes] = []

        async def rewrite(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            new = json.dumps(anthropic_error(start["status"], b"".join(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() not in (b"content-length",
                                                                                        b"content-type")]
            await send({**start, "headers": [*headers, (b"content-type", b"application/json"),
                                             (b"content-length", str(len(new)).encode())]})
            await send({"type": "http.response.body", "body": new})

        await self.app(scope, receive, rewrite)
