"""`POST /v1/responses`: OpenAI's Responses API over the same chat core as chat completions.

A Responses request is translated into a `ChatRequest` (responses_input.py) and goes through `routes.start_chat`,
so it meets the same checks, guards, grammars and prompt rules as a chat completion; only the wire format
differs. That format is built in one place, `_Output`: it turns the run's message deltas into output items
(reasoning, message, function_call, in the order the model wrote them) and, as it goes, the stream events
that describe them. A plain request runs the same machine and drops the events, so a streamed response and
a plain one always hold the same output. Text is trimmed as it streams (leading whitespace dropped, trailing
whitespace held until more text follows), so the deltas add up to exactly the final text.

Tool calls: once the chat parser streams a call in parts (`Delta.call_parts`: the name first, then argument
fragments), each part is sent as it comes (`response.function_call_arguments.delta`); with a parser that only
hands over whole calls (`Delta.tool_calls`), a call is one item with one arguments delta. Both end with the
whole call, whose arguments are the `done` event's.

`usage.output_tokens_details.reasoning_tokens` counts the tokens of the decode updates during which the parser
was inside the thought channel (the update that opens or closes it included): exact when each update carries
one token, as the server's engine sends them, and an estimate when a speculative step hands over several
tokens that straddle the channel's end.

State: a response is stateless unless `store` (OpenAI's default) is on and the server keeps responses
(`--responses-store N`, `ResponseStore`); then its conversation (input messages and output, without the
`instructions`, which OpenAI does not carry over either) can be continued with `previous_response_id`, and
it can be read back or deleted under /v1/responses/{id}.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from gemmakit.serve import protocol as P
from gemmakit.serve.responses_input import ResponsesRequest, assistant_message, to_chat_request
from gemmakit.serve.routes import Refused, Run, start_chat
from gemmakit.serve.server import HTTPFail, fail, ready, sse

log = logging.getLogger("gemmakit.serve")
# Beside the count (--responses-store), the bytes the kept conversations may take in all: a conversation with
# images carries them as base64, so a count alone would not bound memory.
STORE_BYTES = 256 << 20


def install_responses(app: FastAPI, dependencies: list) -> None:
    """Register /v1/responses (create, and read / delete a kept one) with the routes' key check."""
    app.state.responses = ResponseStore(getattr(app.state.options, "responses_store", 256))
    app.post("/v1/responses", summary="Create a model response (OpenAI Responses API)", dependencies=dependencies,
             responses=P.ERRORS)(create_response)
    app.get("/v1/responses/{response_id}", summary="A response this server kept (store: true)",
            dependencies=dependencies)(get_response)
    app.delete("/v1/responses/{response_id}", summary="Forget a kept response",
               dependencies=dependencies)(delete_response)


# --- the store ------------------------------------------------------------------------------------------
class ResponseStore:
    """The last `capacity` stored responses (least recently used first out), and at most `max_bytes` of them in
    all; each entry is self-contained (its whole conversation), so evicting one never breaks a later one."""

    def __init__(self, capacity: int, max_bytes: int = STORE_BYTES):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._entries: OrderedDict[str, tuple[list[dict], dict, int]] = OrderedDict()
        self.bytes = 0

    def put(self, rid: str, messages: list[dict], response: dict) -> None:
        size = len(json.dumps([messages, response], ensure_ascii=False))
        if self.capacity <= 0 or size > self.max_bytes:
            return
        self._entries[rid] = (messages, response, size)
        self.bytes += size
        while len(self._entries) > self.capacity or self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def get(self, rid: str) -> tuple[list[dict], dict] | None:
        entry = self._entries.get(rid)
        if entry is None:
            return None
        self._entries.move_to_end(rid)
        return entry[0], entry[1]

    def delete(self, rid: str) -> bool:
        entry = self._entries.pop(rid, None)
        if entry is not None:
            self.bytes -= entry[2]
        return entry is not None

    def __len__(self) -> int:
        return len(self._entries)


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


def _not_found(rid: str, store: ResponseStore, param: str | None = None) -> HTTPFail:
    return HTTPFail(fail(404, f"No response with id {rid!r} is kept here: this server keeps the last "
                              f"{store.capacity} responses created with store: true (--responses-store)", param,
                         "not_found"))


def history(request: Request, previous: str | None) -> list[dict]:
    """The conversation `previous_response_id` continues (empty without one)."""
    if previous is None:
        return []
    store = _store(request)
    if store.capacity <= 0:
        raise P.ParamError("previous_response_id needs the response store, which this server has turned off "
                           "(--responses-store 0): send the whole conversation as input instead",
                           "previous_response_id", "unsupported_parameter")
    entry = store.get(previous)
    if entry is None:
        raise _not_found(previous, store, "previous_response_id")
    return entry[0]


async def get_response(response_id: str, request: Request) -> dict:
    entry = _store(request).get(response_id)
    if entry is None:
        raise _not_found(response_id, _store(request))
    return entry[1]


async def delete_response(response_id: str, request: Request) -> dict:
    if not _store(request).delete(response_id):
        raise _not_found(response_id, _store(request))
    return {"id": response_id, "object": "response", "deleted": True}


# --- the handler ----------------------------------------------------------------------------------------
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    server = ready(request)
    past = history(request, body.previous_response_id)
    chat, conversation = to_chat_request(body, past)
    try:
        run = await start_chat(server, request, chat, P.new_id("resp", "_"))
    except P.ParamError as e:  # name the Responses parameter, not the chat request's
        e.param = _param(e.param)
        raise
    rid = run.rid if isinstance(run, Run) else P.new_id("resp", "_")
    out = _Output(rid, run.model, body, int(time.time()))
    keep = body.store and isinstance(run, Run)
    if body.stream:
        return StreamingResponse(_stream(request, run, out, conversation, keep), media_type="text/event-stream")
    if isinstance(run, Refused):
        out.refuse(run.message)
        return out.response("incomplete", None)
    await _consume(run, out)
    response = out.finish(run)
    if keep and response["status"] != "in_progress":
        _store(request).put(rid, conversation + out.messages(), response)
    return response


def _param(param: str | None) -> str | None:
    """The Responses parameter behind a chat request's (`messages[2].content` is somewhere in `input`)."""
    if param is None:
        return None
    bare = param.split(".")[0].split("[")[0]
    if bare == "messages":
        return "input"
    if bare in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if bare == "response_format":
        return "text.format" + param[len(bare):].replace(".json_schema", "")
    return param


async def _consume(run: Run, out: _Output) -> None:
    async for choice, delta in run.updates():
        out.feed(choice, delta)


async def _stream(request: Request, run: Run | Refused, out: _Output, conversation: list[dict], keep: bool
                  ) -> AsyncIterator[str]:
    """The Responses event stream: created, in_progress, each item's events as the model writes it, then
    completed / incomplete, or failed with the error when the run fails part way."""
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return sse(data, kind)

    def drain() -> list[str]:
        events, out.events = out.events, []
        return [event(kind, **fields) for kind, fields in events]

    yield event("response.created", response=out.response("in_progress", None, output=False))
    yield event("response.in_progress", response=out.response("in_progress", None, output=False))
    if isinstance(run, Refused):
        out.refuse(run.message)
        for line in drain():
            yield line
        yield event("response.incomplete", response=out.response("incomplete", None))
        return
    error = None
    try:
        async for choice, delta in run.updates():
            out.feed(choice, delta)
            for line in drain():
                yield line
    except HTTPFail as e:
        error = json.loads(e.response.body)["error"]
    except Exception as e:  # the stream has started: the failure can only be an event now
        log.exception("a streamed response failed")
        error = {"message": f"{type(e).__name__}: {e}", "type": "server_error"}
    if error is not None:
        out.close("incomplete")
        for line in drain():
            yield line
        code = "invalid_prompt" if error.get("type") == "invalid_request_error" else "server_error"
        failed = out.response("failed", None)
        failed["error"] = {"code": code, "message": error["message"]}
        yield event("response.failed", response=failed)
        return
    response = out.finish(run)
    for line in drain():
        yield line
    if response["status"] == "in_progress":  # the client went away; no one reads what would follow
        return
    if keep:
        _store(request).put(out.rid, conversation + out.messages(), response)
    yield event("response.completed" if response["status"] == "completed" else "response.incomplete",
                response=response)


# --- the output -----------------------------------------------------------------------------------------
class _Trim:
    """Streamed text with its leading whitespace dropped and trailing whitespace held back until more text follows
    (dropped if none does): the deltas add up to the stripped text."""

    def __init__(self) -> None:
        self.started, self.held = False, ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        shown = text.rstrip()
        self.held = text[len(shown):]
        return shown


class _Output:
    """The output items of one response, and the stream events that build them (`events`: (type, fields))."""

    def __init__(self, rid: str, model: str, body: ResponsesRequest, created: int):
        self.rid, self.model, self.body, self.created = rid, model, body, created
        self.items: list[dict] = []
        self.events: list[tuple[str, dict]] = []
        self.open: dict | None = None  # the item being written
        self.trim = _Trim()
        self.calls: dict[int, dict] = {}  # a call's index in the message -> its item, while it streams in parts
        self.tokens = self.reasoning_tokens = 0
        self.thinking = False

    # feeding
    def feed(self, choice: Any, delta: Any) -> None:
        """One update of the run's (only) choice: count its tokens, then write its parts."""
        thinking = choice.parser is not None and choice.parser.in_thought
        new, self.tokens = choice.tokens - self.tokens, choice.tokens
        if thinking or self.thinking:
            self.reasoning_tokens += new
        self.thinking = thinking
        if delta.reasoning:
            self._text("reasoning", delta.reasoning)
        if delta.content:
            self._text("message", delta.content)
        if choice.watch is None:  # under a guard, calls go out whole, once their arguments are checked
            for part in getattr(delta, "call_parts", None) or []:
                self._call_part(part)
        for call in delta.tool_calls:
            self._call_done(call)
        if choice.filtered:
            self.refuse(choice.content)

    def refuse(self, message: str) -> None:
        """A guard stopped the answer: its message is the response's last text."""
        self.close("incomplete")
        self._text("message", message)
        self.close("completed")

    def _text(self, kind: str, text: str) -> None:
        if self.open is None or self.open["type"] != kind:
            trim = _Trim()
            shown = trim.feed(text)
            if not shown:
                return
            self.close("completed")
            self._open_text(kind)
            self.trim = trim
        else:
            shown = self.trim.feed(text)
            if not shown:
                return
        item, index = self.open, len(self.items) - 1
        if kind == "reasoning":
            item["content"][0]["text"] += shown
            self._emit("response.reasoning_text.delta", item_id=item["id"], output_index=index, content_index=0,
                       delta=shown)
        else:
            item["content"][0]["text"] += shown
            self._emit("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                       delta=shown, logprobs=[])

    def _open_text(self, kind: str) -> None:
        if kind == "reasoning":
            item = {"type": "reasoning", "id": P.new_id("rs", "_"), "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": P.new_id("msg", "_"), "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
        self._add(item)
        self._emit("response.content_part.added", item_id=item["id"], output_index=len(self.items) - 1,
                   content_index=0, part=dict(part))
        item["content"].append(part)

    def _call_part(self, part: Any) -> None:
        item = self.calls.get(part.index)
        if item is None:
            self.close("completed")
            item = self.calls[part.index] = self._open_call(part.id, part.name)
        if part.arguments:
            self._arguments(item, part.arguments)

    def _call_done(self, call: Any) -> None:
        """A whole call: the item its parts built (or a new one, when it came whole), finished."""
        key = next((k for k, c in self.calls.items() if c["call_id"] == call.id), None)
        item = self.calls.pop(key) if key is not None else None
        if item is None:
            self.close("completed")
            item = self._open_call(call.id, call.name)
        if call.arguments.startswith(item["arguments"]) and len(call.arguments) > len(item["arguments"]):
            self._arguments(item, call.arguments[len(item["arguments"]):])
        item["arguments"] = call.arguments  # the whole call is what counts
        self.close("completed", item)

    def _open_call(self, call_id: str, name: str) -> dict:
        item = {"type": "function_call", "id": P.new_id("fc", "_"), "call_id": call_id, "name": name, "arguments": "",
                "status": "in_progress"}
        self._add(item)
        return item

    def _arguments(self, item: dict, fragment: str) -> None:
        item["arguments"] += fragment
        self._emit("response.function_call_arguments.delta", item_id=item["id"],
                   output_index=self.items.index(item), delta=fragment)

    def _add(self, item: dict) -> None:
        self.items.append(item)
        self.open = item
        self._emit("response.output_item.added", output_index=len(self.items) - 1, item=_copy(item))

    def close(self, status: str, item: dict | None = None) -> None:
        """Finish `item` (default: the one being written); `status`: completed, or incomplete if it was cut."""
        item = item or self.open
        if item is self.open:
            self.open = None
        if item is None:
            return
        index = self.items.index(item)
        if item["type"] == "function_call" and any(c is item for c in self.calls.values()):
            status = "incomplete"  # streamed in parts, then broke off: the parser never completed it
            self.calls = {k: c for k, c in self.calls.items() if c is not item}
        item["status"] = status
        if item["type"] == "function_call":
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       arguments=item["arguments"])
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {} if item["type"] == "reasoning" else {"logprobs": []}
            self._emit(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"], **extra)
            self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                       part=dict(part))
        self._emit("response.output_item.done", output_index=index, item=_copy(item))

    def _emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    # the response
    def finish(self, run: Run) -> dict:
        """The final response once the run has ended ("in_progress" if the client left before it did)."""
        choice = run.choices[0]
        if not choice.finished:
            return self.response("in_progress", run.usage())
        cut = "content_filter" if choice.filtered else "max_output_tokens" if choice.engine_reason == "length" else None
        self.close("incomplete" if cut else "completed")
        return self.response("incomplete" if cut else "completed", run.usage(), cut)

    def response(self, status: str, usage: dict | None, cut: str | None = None, output: bool = True) -> dict:
        """The response object as OpenAI's SDK reads it: the output so far, what was asked, and the usage."""
        body = self.body
        if status == "incomplete" and cut is None:
            cut = "content_filter"  # only a guard's refusal ends one otherwise
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None, "incomplete_details": {"reason": cut} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": [_copy(i) for i in self.items] if output else [],
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.effort(), "summary": None}, "store": body.store,
            "temperature": body.temperature if body.temperature is not None else P.GEMMA_DEFAULTS["temperature"],
            "text": {"format": body.text_format_echo()}, "tool_choice": body.tool_choice_echo(),
            "tools": body.tools_echo(), "top_p": body.top_p if body.top_p is not None else P.GEMMA_DEFAULTS["top_p"],
            "truncation": "disabled", "usage": self._usage(usage), "user": body.user, "metadata": body.metadata or {},
            "background": False,
        }

    def _usage(self, usage: dict | None) -> dict | None:
        if usage is None:
            return None
        return {"input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                         "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens, usage["completion_tokens"])},
                "total_tokens": usage["total_tokens"]}

    def messages(self) -> list[dict]:
        """The output as chat messages, for a conversation kept for `previous_response_id`."""
        return assistant_message(self.items)


def _copy(item: dict) -> dict:
    return json.loads(json.dumps(item))
