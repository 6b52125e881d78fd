"""A Responses API request (`ResponsesRequest`) and its translation into the chat request every chat API shares.

The Responses API keeps a conversation as a flat list of items, where chat messages nest: a model turn that
thought, said something and called two tools is a reasoning item, a message item and two function_call items.
`to_chat_request` folds such runs back into one assistant message (`reasoning`, `content`, `tool_calls`), which
is the shape Gemma's chat template renders (the reasoning of the turns since the last user message goes back to
the model, as Gemma 4 expects between tool calls), and turns each function_call_output into a `tool` message.
Gemma has a single system turn, so `instructions` and any system / developer messages are joined into it, in
order.

What the translation cannot take is a 400 naming the item (`input[3].call_id`): an item type other than
messages, function calls, their outputs and reasoning; a tool other than a function; a result for a call that
was never made. Unknown top-level fields are ignored (`user`, `include`, `truncation`, ...), as the other
routes ignore extras; gemmakit's own sampling extensions (`top_k`, `min_p`, ...) pass through.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gemmakit.serve import protocol as P

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# Extensions the chat request takes that a Responses request may carry too (unknown fields are ignored).
PASSED = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "logit_bias",
          "stop", "chat_template_kwargs")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[Any] = ""
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, Any] | None = None
    user: str | None = None

    def effort(self) -> str | None:
        """The reasoning effort asked for (None: no `reasoning`, so no thinking)."""
        if self.reasoning is None:
            return None
        effort = self.reasoning.get("effort") or "medium"
        if effort not in EFFORTS:
            raise P.ParamError(f"reasoning.effort must be one of {', '.join(EFFORTS)}, got {str(effort)[:40]!r}",
                               "reasoning.effort")
        return effort

    def text_format_echo(self) -> dict:
        return (self.text or {}).get("format") or {"type": "text"}

    def tool_choice_echo(self) -> str | dict:
        return self.tool_choice if self.tool_choice is not None else "auto"

    def tools_echo(self) -> list[dict]:
        return [{"type": "function", "name": f["name"], "description": f.get("description"),
                 "parameters": f.get("parameters"), "strict": bool(t.get("strict", f.get("strict", False)))}
                for t in self.tools or [] for f in [_function_of(t)]]


def to_chat_request(body: ResponsesRequest, past: list[dict]) -> tuple[P.ChatRequest, list[dict]]:
    """The chat request `body` asks for, and the conversation to keep for `previous_response_id` (the `past`
    one plus this request's input, without `instructions`)."""
    conversation = past + input_messages(body.input, _call_ids(past))
    system = [body.instructions] if body.instructions else []
    system += [_text(m["content"]) for m in conversation if m["role"] in ("system", "developer")]
    messages = [m for m in conversation if m["role"] not in ("system", "developer")]
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if not messages:
        raise P.ParamError("input is empty: give a string or at least one message item", "input")
    effort = body.effort()
    fields: dict[str, Any] = {
        "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "tools": _tools(body.tools),
        "tool_choice": _tool_choice(body.tool_choice), "response_format": _text_format(body.text),
        "reasoning_effort": {"xhigh": "high", "max": "high"}.get(effort, effort),
        **{k: v for k, v in (body.model_extra or {}).items() if k in PASSED}}
    try:
        return P.ChatRequest.model_validate(fields), conversation
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise P.ParamError(f"{loc}: {first.get('msg', 'invalid value')}", _chat_param(loc)) from None


def _chat_param(loc: str) -> str:
    head = loc.split(".")[0]
    return {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
            "reasoning_effort": "reasoning.effort"}.get(head, head)


# --- input items ----------------------------------------------------------------------------------------
def input_messages(value: str | list[Any], known_calls: set[str]) -> list[dict]:
    """Chat messages from the Responses `input`: a string (one user message) or a list of items."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value else []
    out: list[dict] = []
    turn: dict | None = None  # the assistant message the items since the last non-assistant item build

    def flush() -> None:
        nonlocal turn
        if turn is not None and (turn.get("content") is not None or turn.get("tool_calls")):
            out.append(turn)
        turn = None

    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise P.ParamError(f"{where} must be an item object, got {type(item).__name__}", where)
        try:
            P.check_depth(item, where)
        except ValueError as e:
            raise P.ParamError(str(e), where) from None
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message" and item.get("role") == "assistant":
            if turn is not None and (turn.get("content") is not None or turn.get("tool_calls")):
                flush()
            turn = turn or {"role": "assistant"}
            turn["content"] = _content(item.get("content"), f"{where}.content", assistant=True)
        elif kind == "message":
            flush()
            out.append(_message(item, where))
        elif kind == "function_call":
            turn = turn or {"role": "assistant"}
            call = _function_call(item, where)
            turn.setdefault("tool_calls", []).append(call)
            known_calls.add(call["id"])
        elif kind == "function_call_output":
            flush()
            out.append(_call_output(item, where, known_calls))
        elif kind == "reasoning":
            if turn is not None and (turn.get("content") is not None or turn.get("tool_calls")):
                flush()
            turn = turn or {"role": "assistant"}
            text = _reasoning_text(item, where)
            turn["reasoning"] = (turn.get("reasoning", "") + "\n" + text).strip() if text else turn.get("reasoning")
        else:
            raise P.ParamError(f"{where}: items of type {str(kind)[:40]!r} are not supported here; send message, "
                               "function_call, function_call_output or reasoning items", f"{where}.type")
    flush()
    return out


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer"):
        raise P.ParamError(f"{where}.role must be user, system, developer or assistant, got {str(role)[:40]!r}",
                           f"{where}.role")
    return {"role": role, "content": _content(item.get("content"), f"{where}.content", assistant=False)}


def _content(content: Any, where: str, assistant: bool) -> str | list[dict]:
    """A message's content as the chat request takes it: the string, or text / image / audio parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise P.ParamError(f"{where} must be a string or a list of content parts", where)
    parts: list[dict] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise P.ParamError(f"{where}[{j}]: a {kind} part needs a string 'text'", f"{where}[{j}]")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and not assistant:
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise P.ParamError(f"{where}[{j}]: an input_image part needs an image_url (a data: URL, or a URL "
                                   "the server may read); file_id is not supported here", f"{where}[{j}]")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_audio" and not assistant:
            parts.append({"type": "input_audio", "input_audio": part.get("input_audio")})
        else:
            allowed = "output_text or refusal" if assistant else "input_text, input_image or input_audio"
            raise P.ParamError(f"{where}[{j}]: content parts here must be {allowed}, got {str(kind)[:40]!r}",
                               f"{where}[{j}]")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _function_call(item: dict, where: str) -> dict:
    name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise P.ParamError(f"{where}: a function_call needs its 'name'", f"{where}.name")
    if not isinstance(call_id, str) or not call_id:
        raise P.ParamError(f"{where}: a function_call needs its 'call_id'", f"{where}.call_id")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise P.ParamError(f"{where}.arguments must be a JSON object, as a string", f"{where}.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_output(item: dict, where: str, known_calls: set[str]) -> dict:
    call_id, output = item.get("call_id"), item.get("output")
    if call_id not in known_calls:
        raise P.ParamError(f"{where}: a function_call_output answers a function_call; call_id {str(call_id)[:60]!r} "
                           "matches none before it in the conversation", f"{where}.call_id")
    if isinstance(output, list):
        output = _content(output, f"{where}.output", assistant=False)
        if not isinstance(output, str):
            raise P.ParamError(f"{where}.output: a function's output here is text", f"{where}.output")
    if not isinstance(output, str):
        raise P.ParamError(f"{where}.output must be a string (or text parts)", f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _reasoning_text(item: dict, where: str) -> str:
    """The thinking a reasoning item carries: its reasoning_text content, else its summary."""
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key) or []
        if not isinstance(parts, list) or any(not isinstance(p, dict) or not isinstance(p.get("text"), str)
                                              for p in parts):
            raise P.ParamError(f"{where}.{key} must be a list of {{'type': '{kind}', 'text': ...}} parts",
                               f"{where}.{key}")
        if parts:
            return "\n".join(p["text"] for p in parts)
    return ""


def _call_ids(messages: list[dict]) -> set[str]:
    return {c["id"] for m in messages for c in m.get("tool_calls") or []}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


# --- tools, tool_choice, text.format --------------------------------------------------------------------
def _function_of(tool: dict) -> dict:
    """A tool's function: Responses tools are flat ({type, name, parameters}); the chat shape is taken too."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def _tools(tools: list[Any] | None) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise P.ParamError(f"tools[{i}]: tools of type {str(kind)[:40]!r} are not supported; this server runs "
                               "function tools ({'type': 'function', 'name': ..., 'parameters': {...}})",
                               f"tools[{i}].type")
        fn = _function_of(tool)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise P.ParamError(f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        if not isinstance(fn.get("parameters") or {}, dict):
            raise P.ParamError(f"tools[{i}].parameters must be a JSON-schema object", f"tools[{i}].parameters")
        out.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                      if fn.get(k) is not None}})
    return out


def _tool_choice(choice: str | dict | None) -> str | dict | None:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise P.ParamError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
                       "tool_choice")


def _text_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise P.ParamError("text.format.schema must be a JSON schema object", "text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"],
                                                       "strict": fmt.get("strict")}}
    raise P.ParamError(f"text.format.type must be text, json_object or json_schema, got {str(kind)[:40]!r}",
                       "text.format.type")


# --- output back into the conversation ------------------------------------------------------------------
def assistant_message(items: list[dict]) -> list[dict]:
    """A response's output items as the assistant message(s) a later turn continues from."""
    return input_messages(items, set())
