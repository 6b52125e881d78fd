"""Anthropic Messages requests in, chat requests out: the request models, the translation of system, messages,
tools, tool_choice and thinking into the `ChatRequest` that `routes.start_chat` takes, and the signatures of
thinking blocks. What each Anthropic field becomes, and why thinking is signed: messages.py's docstring.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gemmakit.serve import protocol as P

MAX_STOP_SEQUENCES = 16
_SECRET = secrets.token_bytes(32)  # signs thinking blocks; per process (messages.py docstring)


# --- request --------------------------------------------------------------------------------------------
class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, metadata, betas...: accepted, ignored

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class _Chat(P.ChatRequest):
    """A chat request translated from a Messages one: Anthropic's bound on stop strings instead of OpenAI's 4."""

    def _stops(self) -> list[str]:
        stop = list(self.stop or [])
        if len(stop) > MAX_STOP_SEQUENCES or any(not x or len(x) > P.MAX_STOP_CHARS for x in stop):
            raise P.ParamError(f"stop_sequences takes up to {MAX_STOP_SEQUENCES} non-empty strings of at most "
                               f"{P.MAX_STOP_CHARS} characters each", "stop_sequences")
        return stop


def to_chat(body: CountTokensRequest) -> P.ChatRequest:
    """The chat request a Messages request means (module docstring); what it gets wrong is a 400 naming it."""
    thinking_on, _ = thinking_mode(body.thinking)
    choice = _tool_choice(body.tool_choice)
    fields: dict[str, Any] = {
        "model": body.model, "messages": chat_messages(body), "tools": _tools(body.tools),
        "tool_choice": choice, "chat_template_kwargs": {"enable_thinking": thinking_on}}
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, stop=body.stop_sequences, temperature=body.temperature,
                      top_p=body.top_p, top_k=body.top_k, response_format=_output_format(body.output_config))
    try:
        return _Chat.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        param = "stop_sequences" if where.startswith("stop") else where
        raise P.ParamError(f"{param}: {first.get('msg', 'invalid value')}", param) from None


def thinking_mode(config: dict[str, Any] | None) -> tuple[bool, bool]:
    """(thinking on, thinking text omitted from the answer) for Anthropic's `thinking` setting."""
    if config is None:
        return False, False
    kind = config.get("type")
    if kind not in ("enabled", "adaptive", "disabled", "between_tools"):
        raise P.ParamError(f"thinking.type must be 'enabled', 'adaptive' or 'disabled', got {str(kind)[:40]!r}",
                           "thinking.type")
    budget = config.get("budget_tokens")
    if kind == "enabled" and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise P.ParamError("thinking.budget_tokens must be a positive integer", "thinking.budget_tokens")
    return kind != "disabled", config.get("display") == "omitted"


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise P.ParamError(f"tools[{i}] must be an object", f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise P.ParamError(f"tools[{i}]: {str(tool.get('type'))[:60]!r} is one of Anthropic's server tools; this "
                               "server runs custom tools only ({name, description, input_schema})", f"tools[{i}].type")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise P.ParamError(f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        if not isinstance(schema, dict):
            raise P.ParamError(f"tools[{i}].input_schema must be a JSON-schema object", f"tools[{i}].input_schema")
        fn = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise P.ParamError("tool_choice of type 'tool' needs the tool's name", "tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if mapped is None:
        raise P.ParamError(f"tool_choice.type must be auto, any, tool or none, got {str(kind)[:40]!r}",
                           "tool_choice.type")
    return mapped


def _output_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """`output_config.format` (structured output) as the chat request's response_format; `effort` is ignored."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise P.ParamError('output_config.format must be {"type": "json_schema", "schema": {...}}',
                           "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def chat_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The OpenAI-style messages (the ones the chat templates take) for a Messages request's system and turns."""
    out: list[dict[str, Any]] = []
    system = _system(body.system)
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise P.ParamError(f"{where}.role must be 'user' or 'assistant', got {str(role)[:40]!r}", f"{where}.role")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise P.ParamError(f"{where}.content must be a string or a list of content blocks", f"{where}.content")
        out += _user(blocks, where) if role == "user" else [_assistant(blocks, where)]
    if body.messages[-1].get("role") == "assistant":
        raise P.ParamError("the last message is the assistant's: continuing a prefilled assistant turn is not "
                           "supported here; end with a user message", f"messages[{len(body.messages) - 1}].role")
    return out


def _system(system: str | list[dict[str, Any]] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if any(b.get("type") != "text" or not isinstance(b.get("text"), str) for b in system):
        raise P.ParamError("system must be a string or a list of text blocks", "system")
    return "\n".join(b["text"] for b in system)


def _user(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Tool results first (as `tool` messages, in order), then the rest of the turn as one user message."""
    results, parts = [], []
    for j, b in enumerate(blocks):
        kind, at = b.get("type"), f"{where}.content[{j}]"
        if kind == "tool_result":
            results.append(_tool_result(b, at))
        elif kind == "text":
            parts.append({"type": "text", "text": _text(b, at)})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b.get("source"), at)}})
        else:
            raise P.ParamError(f"{at}: a user message holds text, image and tool_result blocks, got "
                               f"{str(kind)[:40]!r}", at)
    if not parts:
        return results
    if all(p["type"] == "text" for p in parts):
        return [*results, {"role": "user", "content": "\n".join(p["text"] for p in parts)}]
    return [*results, {"role": "user", "content": parts}]


def _text(block: dict[str, Any], at: str) -> str:
    if not isinstance(block.get("text"), str):
        raise P.ParamError(f"{at}: a text block needs its text as a string", at)
    return block["text"]


def _image_url(source: Any, at: str) -> str:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise P.ParamError(f'{at}: an image needs a source {{"type": "base64", "media_type": "image/png", "data": ...}}'
                       ' or {"type": "url", "url": ...}', at)


def _tool_result(block: dict[str, Any], at: str) -> dict[str, Any]:
    call_id, content = block.get("tool_use_id"), block.get("content", "")
    if not isinstance(call_id, str) or not call_id:
        raise P.ParamError(f"{at}: a tool_result needs the tool_use_id it answers", f"{at}.tool_use_id")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise P.ParamError(f"{at}: tool_result content may hold text blocks only here", f"{at}.content")
        content = "\n".join(_text(p, at) for p in content)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise P.ParamError(f"{at}: tool_result content must be a string or text blocks", f"{at}.content")
    if block.get("is_error"):
        content = json.dumps({"error": content}, ensure_ascii=False)
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    text, calls, thoughts = [], [], []
    for j, b in enumerate(blocks):
        kind, at = b.get("type"), f"{where}.content[{j}]"
        if kind == "text":
            text.append(_text(b, at))
        elif kind == "tool_use":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or not isinstance(
                    b.get("input"), dict):
                raise P.ParamError(f"{at}: a tool_use block needs id, name and an input object", at)
            calls.append({"id": b["id"], "type": "function", "function": {
                "name": b["name"], "arguments": json.dumps(b["input"], ensure_ascii=False)}})
        elif kind == "thinking":
            thought = b.get("thinking")
            if isinstance(thought, str) and verify(thought, b.get("signature")):
                thoughts.append(thought.strip())
        elif kind != "redacted_thinking":
            raise P.ParamError(f"{at}: an assistant message holds text, tool_use and thinking blocks, got "
                               f"{str(kind)[:40]!r}", at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        message["tool_calls"] = calls
    if any(thoughts):
        message["reasoning"] = "\n".join(t for t in thoughts if t)
    return message


def sign(thinking: str) -> str:
    """The signature a thinking block carries: HMAC-SHA256 of its trimmed text under this process's secret."""
    digest = hmac.new(_SECRET, thinking.strip().encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def verify(thinking: str, signature: Any) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(signature.encode(), sign(thinking).encode())
