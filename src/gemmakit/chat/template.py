"""Chat formats: the prompt string a Gemma 3 / Gemma 4 chat model was trained on, built from OpenAI-style messages.

Two paths, which the tests hold together:

- **Built-in renderers** (`render_gemma4`, `render_gemma3`): plain Python, no Jinja. They follow the official HF
  templates (architecture note §5.2 and §7.2) and also take the OpenAI shapes those templates do not: `role: "tool"`
  messages and JSON-string tool arguments.
- **The checkpoint's own template** (`render_jinja`, in chat/jinja.py): jinja2's immutable sandbox set up exactly as
  `transformers.apply_chat_template(tokenize=False)` sets it up, so a template from the hub renders the same bytes
  here and there. Templates are untrusted code; the one difference is that unsafe (dunder) attribute access raises
  at once instead of rendering an empty string.

`ChatFormat` picks one: the checkpoint's template when it has one, else the built-in renderer for the family.

Gemma 4, as `render_gemma4` writes it:

    <bos>[<|turn>system\\n[<|think|>]SYSTEM[<|tool>declaration:NAME{...}<tool|>]...<turn|>\\n]
    <|turn>user\\nTEXT<turn|>\\n
    <|turn>model\\n[<|tool_call>call:NAME{ARGS}<tool_call|>]...[<|tool_response>response:NAME{...}<tool_response|>]...
        ANSWER<turn|>\\n
    <|turn>model\\n[<|channel>thought\\n<channel|>]

- The system turn is written when messages[0] is system/developer, tools are given or thinking is on.
- Text is trimmed; thoughts (`<|channel>...<channel|>`) are cut from model text. Reasoning carried across tool calls,
  as Gemma 4's current official template does: an assistant message after the last user message (the model turn in
  progress, tool calls and results going back and forth) with a string `reasoning` (else `reasoning_content`) gets
  `<|channel>thought\nREASONING\n<channel|>` before its tool calls and text, so multi-step tool use keeps its
  thinking; earlier turns' reasoning is not rendered (Gemma 4 drops thoughts once a new user turn begins).
- A tool result continues the model turn that called the tool: no `<turn|>` and no new `<|turn>model\\n`, since
  the model stopped at `<|tool_response>` and picks up after `<tool_response|>`. An assistant message after a tool
  result continues that turn too. Results come from HF-style `tool_responses` on the assistant message or from
  OpenAI `tool` messages (name from `name`, else the matching `tool_call_id`, else the call in the same position).
- Thinking off: E2B/E4B-style templates end the prompt at `<|turn>model\\n`; 26B/31B-style ones add an empty
  thought channel (`empty_thought_when_off`).
- Where the official template is quirky, this renderer is tidy instead (the usual shapes come out byte-identical):
  tool results followed by answer text in one message still get `<turn|>` and a fresh prompt header; a property
  named "type" or "description" is kept; an object property without a description gets no stray comma; a schema
  without `type` gets no empty `type:`; None is `null`, not `None`; JSON-string arguments are parsed, not pasted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from gemmakit.chat.jinja import render_jinja

Message = dict[str, Any]
Tool = dict[str, Any]

QUOTE = '<|"|>'  # Gemma 4's string delimiter inside tool blocks (token 52)
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>thought\n", "<channel|>"  # how a Gemma 4 model writes its reasoning
EMPTY_THOUGHT = THOUGHT_OPEN + THOUGHT_CLOSE
SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant", "tool")
_MEDIA4 = {"image": "\n\n<|image|>\n\n", "audio": "<|audio|>", "video": "\n\n<|video|>\n\n"}
_MEDIA3 = {"image": "<start_of_image>"}
STOP_STRINGS = {"gemma3": ("<end_of_turn>", "<eos>"), "gemma4": ("<turn|>", "<|tool_response>", "<eos>")}


def format_value(value: Any) -> str:
    """Write a JSON-like Python value in Gemma 4's tool syntax (tool-call arguments, tool results).

    Grammar (no whitespace anywhere, no escaping):

        value   := string | number | boolean | null | object | array
        string  := <|"|> TEXT <|"|>        TEXT is the str as is; it must not contain <|"|>
        number  := str() of a Python int or finite float: 15, -3, 2.5, 15.0, 1e-05, 1e+16
        boolean := true | false
        null    := null                     (from None)
        object  := { [KEY:value (,KEY:value)*] }   KEY bare (str() of the key, unquoted), keys sorted
                                            case-insensitively as Jinja's `dictsort` does (ties keep dict order)
        array   := [ [value (,value)*] ]    from a list or tuple, order kept

    A tool call is `<|tool_call>call:NAME` + object + `<tool_call|>`; a tool result is
    `<|tool_response>response:NAME` + object + `<tool_response|>`, a non-object result being wrapped as
    `{value:VALUE}`. Raises ValueError for other types and for inf/nan.
    """
    return _format(value, quote_keys=False)


def _format(value: Any, quote_keys: bool) -> str:
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value} in a Gemma 4 tool block; only finite numbers have a syntax")
        return str(value)
    if isinstance(value, Mapping):
        key = (lambda k: QUOTE + str(k) + QUOTE) if quote_keys else str
        return "{" + ",".join(f"{key(k)}:{_format(v, quote_keys)}" for k, v in _dictsort(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v, quote_keys) for v in value) + "]"
    raise ValueError(f"cannot write a {type(value).__name__} in a Gemma 4 tool block; use str, int, float, bool, "
                     "None, dict or list")


def _dictsort(mapping: Mapping) -> list[tuple[Any, Any]]:
    # Jinja's `dictsort` (case-insensitive, stable): the official template sorts keys with it.
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _declaration(tool: Tool) -> str:
    """`declaration:NAME{description:...,parameters:{...}[,response:{...}]}` for one OpenAI-style tool."""
    fn = tool.get("function", tool)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"tool {tool!r} has no name: give {{'type': 'function', 'function': {{'name': ...}}}}")
    fields = [f"description:{_format(str(fn.get('description') or ''), False)}"]
    for key in ("parameters", "response"):
        if fn.get(key):
            fields.append(f"{key}:{{{_schema(fn[key])}}}")
    return f"declaration:{fn['name']}{{{','.join(fields)}}}"


def _schema(schema: Mapping) -> str:
    """The fields of one JSON schema, comma-joined: properties sorted, types upper-cased, strings quoted."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"a tool parameter schema must be a JSON-schema object, got {schema!r}")
    fields = []
    if schema.get("description"):
        fields.append(f"description:{_format(str(schema['description']), False)}")
    if schema.get("nullable"):
        fields.append("nullable:true")
    if schema.get("enum"):
        fields.append(f"enum:{_format(list(schema['enum']), True)}")
    if isinstance(schema.get("properties"), Mapping):
        props = ",".join(f"{name}:{{{_schema(sub)}}}" for name, sub in _dictsort(schema["properties"]))
        fields.append(f"properties:{{{props}}}")
    if schema.get("required"):
        fields.append(f"required:{_format(list(schema['required']), False)}")
    if isinstance(schema.get("items"), Mapping) and schema["items"]:
        fields.append(f"items:{{{_schema(schema['items'])}}}")
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first type names it, as in the official template
        kind = kind[0] if kind else None
    if kind:
        fields.append(f"type:{_format(str(kind).upper(), False)}")
    return ",".join(fields)


def _tool_call(call: Mapping) -> tuple[str, str]:
    """(name, `<|tool_call>call:NAME{...}<tool_call|>`) for an OpenAI tool call; arguments may be a JSON string."""
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tool call {call!r} needs {{'function': {{'name': str, 'arguments': dict}}}}")
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested past what json can parse
            raise ValueError(f"arguments of tool call {fn['name']!r} are not valid JSON: {e}") from e
    if not isinstance(args, Mapping):
        raise ValueError(f"arguments of tool call {fn['name']!r} must be a JSON object, got {args!r}")
    return fn["name"], f"<|tool_call>call:{fn['name']}{format_value(args)}<tool_call|>"


def _tool_response(name: str, response: Any) -> str:
    if isinstance(response, str) and response.lstrip().startswith("{"):
        # OpenAI tool results are strings; a JSON object among them is written as the object the model was trained on.
        with suppress(json.JSONDecodeError, RecursionError):
            response = json.loads(response)
    body = format_value(response) if isinstance(response, Mapping) else "{value:" + format_value(response) + "}"
    return f"<|tool_response>response:{name}{body}<tool_response|>"


def _content(content: Any, media: Mapping[str, str], strip_thoughts: bool = False) -> str:
    """A message's text (str or OpenAI parts), trimmed, with media placeholders and optionally thoughts cut."""
    clean = _strip_thoughts if strip_thoughts else str.strip
    if content is None:
        return ""
    if isinstance(content, str):
        return clean(content)
    if not isinstance(content, list):
        raise ValueError(f"message content must be a str or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            out.append(clean(part.get("text", "")))
        elif kind in media:
            out.append(media[kind])
        else:
            raise ValueError(f"unsupported content part {part!r}; use type " + " / ".join(["text", *media]))
    return "".join(out)


def _strip_thoughts(text: str) -> str:
    # Cut every `<|channel>...<channel|>`, and an unclosed `<|channel>...` at the end, as the official template does.
    return "".join(piece.split("<|channel>")[0] for piece in text.split("<channel|>")).strip()


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages is empty: give at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if role in SYSTEM_ROLES and i > 0:
            raise ValueError(f"message {i}: a {role} message must be the first message")
        if not isinstance(message.get("tool_calls") or [], list):
            raise ValueError(f"message {i}: tool_calls must be a list")


class _Turns:
    """Writes Gemma 4 turns; a model turn stays open while tool calls and their results go back and forth."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.state = "closed"  # "closed" | "model": open model turn | "response": open, a tool result came last
        self.calls: list[tuple[str | None, str]] = []  # (id, name) of the open turn's tool calls, in order
        self.answered = 0

    def add(self, message: Message, current: bool = False) -> None:
        """`current`: the message comes after the last user message (its reasoning is rendered)."""
        if message["role"] == "user":
            self._close()
            self.out.append(f"<|turn>user\n{_content(message.get('content'), _MEDIA4)}<turn|>\n")
        elif message["role"] == "assistant":
            self._assistant(message, current)
        else:
            self._tool(message)

    def finish(self, add_generation_prompt: bool) -> str:
        if add_generation_prompt and self.state != "response":
            self._close()
            self.out.append("<|turn>model\n")
        elif self.state == "model":
            self._close()
        return "".join(self.out)

    def _close(self) -> None:
        if self.state != "closed":
            self.out.append("<turn|>\n")
            self.state = "closed"

    def _assistant(self, message: Message, current: bool) -> None:
        if self.state != "response":
            self._close()
            self.out.append("<|turn>model\n")
            self.calls, self.answered = [], 0
        self.state = "model"
        # transformers hands a Jinja template `thinking` as reasoning_content: the same fields, the same order
        reasoning = message.get("reasoning") or message.get("reasoning_content") or message.get("thinking")
        if current and isinstance(reasoning, str) and reasoning:
            self.out.append(f"{THOUGHT_OPEN}{reasoning}\n{THOUGHT_CLOSE}")
        for call in message.get("tool_calls") or []:
            name, text = _tool_call(call)
            self.calls.append((call.get("id"), name))
            self.out.append(text)
        for response in message.get("tool_responses") or []:
            self._respond(response.get("name") or self._name_for(None), response.get("response"))
        text = _content(message.get("content"), _MEDIA4, strip_thoughts=True)
        self.out.append(text)
        if text:
            self.state = "model"

    def _tool(self, message: Message) -> None:
        if self.state == "closed" or not self.calls:
            raise ValueError("a tool message must follow an assistant message with tool_calls (the call it answers)")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            content = "".join(p.get("text", "") for p in content)  # OpenAI allows text parts in a tool result
        self._respond(message.get("name") or self._name_for(message.get("tool_call_id")), content)

    def _respond(self, name: str, response: Any) -> None:
        self.out.append(_tool_response(name, response))
        self.answered += 1
        self.state = "response"

    def _name_for(self, call_id: str | None) -> str:
        named = next((name for cid, name in self.calls if call_id is not None and cid == call_id), None)
        if named:
            return named
        if self.answered < len(self.calls):
            return self.calls[self.answered][1]
        raise ValueError("a tool result has no name and matches no tool call: give it 'name' or 'tool_call_id'")


def render_gemma4(messages: list[Message], tools: list[Tool] | None = None, *, add_generation_prompt: bool = True,
                  enable_thinking: bool = False, empty_thought_when_off: bool = False, bos_token: str = "<bos>") -> str:
    """The Gemma 4 prompt for `messages` (module docstring); `empty_thought_when_off` selects the 26B/31B style."""
    _check_messages(messages)
    has_system = messages[0]["role"] in SYSTEM_ROLES
    system = _content(messages[0].get("content"), _MEDIA4) if has_system else ""
    rest = messages[1:] if has_system else messages
    out = [bos_token]
    if has_system or tools or enable_thinking:
        declarations = "".join(f"<|tool>{_declaration(tool)}<tool|>" for tool in tools or [])
        out.append(f"<|turn>system\n{'<|think|>' if enable_thinking else ''}{system}{declarations}<turn|>\n")
    turns = _Turns()
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    for i, message in enumerate(rest):
        turns.add(message, current=i > last_user)
    out.append(turns.finish(add_generation_prompt))
    if add_generation_prompt and not enable_thinking and empty_thought_when_off:
        out.append(EMPTY_THOUGHT)
    return "".join(out)


def render_gemma3(messages: list[Message], tools: list[Tool] | None = None, *, add_generation_prompt: bool = True,
                  bos_token: str = "<bos>") -> str:
    """The Gemma 3 prompt: the system text (untrimmed, + "\\n\\n") opens the first user turn, roles alternate."""
    if tools:
        raise ValueError("Gemma 3 has no tool-calling format: drop `tools`, or use a Gemma 4 model")
    _check_messages(messages)
    rest, prefix = messages, ""
    if messages[0]["role"] in SYSTEM_ROLES:
        content = messages[0].get("content") or ""
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        rest, prefix = messages[1:], text + "\n\n"
    if not rest:
        raise ValueError("Gemma 3 folds the system prompt into the first user turn: add a user message")
    out = [bos_token]
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected or message.get("tool_calls"):
            raise ValueError(f"Gemma 3 turns must alternate user/assistant starting with user (no tools); message "
                             f"{i + len(messages) - len(rest)} is {message['role']!r}, expected {expected!r}")
        role = "model" if expected == "assistant" else "user"
        text = _content(message.get("content"), _MEDIA3)
        out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{text}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


@dataclass(frozen=True)
class ChatFormat:
    """How a model's prompts are written: its own Jinja template when it has one, else the family's built-in one."""

    family: str  # "gemma3" | "gemma4"
    template: str | None = None  # the checkpoint's chat template (tokenizer_config / chat_template.jinja / GGUF)
    empty_thought_when_off: bool = False  # 26B/31B style: an empty thought channel in the prompt when not thinking
    bos_token: str = "<bos>"
    eos_token: str = "<eos>"

    def __post_init__(self) -> None:
        if self.family not in STOP_STRINGS:
            raise ValueError(f"unknown chat family {self.family!r}; use one of {', '.join(STOP_STRINGS)}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends a generated message (eos ids 1, 106, 50 for Gemma 4; 1, 106 for Gemma 3)."""
        return STOP_STRINGS[self.family]

    def render(self, messages: list[Message], tools: list[Tool] | None = None, *,
               add_generation_prompt: bool = True, enable_thinking: bool = False) -> str:
        try:
            return self._render(messages, tools, add_generation_prompt, enable_thinking)
        except RecursionError:  # the renderers recurse into tool schemas and arguments
            raise ValueError("the messages or tools are nested too deeply to render") from None

    def _render(self, messages: list[Message], tools: list[Tool] | None, add_generation_prompt: bool,
                enable_thinking: bool) -> str:
        if self.template is not None:
            return render_jinja(self.template, messages, tools, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token, eos_token=self.eos_token, enable_thinking=enable_thinking)
        if self.family == "gemma3":
            if enable_thinking:
                raise ValueError("Gemma 3 has no thinking mode: render with enable_thinking=False")
            return render_gemma3(messages, tools, add_generation_prompt=add_generation_prompt,
                                 bos_token=self.bos_token)
        return render_gemma4(messages, tools, add_generation_prompt=add_generation_prompt,
                             enable_thinking=enable_thinking, empty_thought_when_off=self.empty_thought_when_off,
                             bos_token=self.bos_token)
