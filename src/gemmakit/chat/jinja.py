"""Render a checkpoint's own chat template exactly as `transformers.apply_chat_template(tokenize=False)` does.

A chat template is untrusted code shipped with a checkpoint, so it runs in jinja2's immutable sandbox, set up
the way transformers sets it up (trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`,
`strftime_now`, the `{% generation %}` tag, namespaces), so a template from the hub renders the same bytes here
and there. One deliberate difference: unsafe (dunder) attribute access raises at once instead of quietly
rendering an empty string. Whatever goes wrong inside a template surfaces as one ValueError.

Bounds. The template is code from the checkpoint the operator chose, but what it loops over (messages, tools)
comes from clients, so one render is bounded in time and size: a deadline checked at every call, attribute
and item access the sandbox mediates (every loop over `range` or data passes through them), the output
streamed and cut at `RENDER_CHARS`, and values that could grow without output (`*` and `**` results,
namespace attributes, call arguments) held to the same size. Past a bound the render fails like any other
template error. transformers renders without bounds; nothing a bounded render returns differs from its output.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

Message = dict[str, Any]
Tool = dict[str, Any]


# One render's bounds (module docstring): far above any real chat prompt, which fits a model's context.
RENDER_SECONDS = 5.0
RENDER_CHARS = 8 << 20
_render = threading.local()  # the deadline of the render running in this thread


def _check_budget() -> None:
    deadline = getattr(_render, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise SecurityError(f"the chat template ran longer than {RENDER_SECONDS:g} s on this input")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > RENDER_CHARS:
        raise SecurityError(f"the chat template built a value of {len(value)} items (at most {RENDER_CHARS})")
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template sandbox, except that unsafe attribute access raises instead of rendering '',
    and that a render is bounded (module docstring)."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_budget()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_budget()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        _check_budget()
        for value in (*args, *kwargs.values()):
            _check_size(value)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_budget()
        if operator == "*":  # repetition: size it before building it
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > RENDER_CHARS:
                raise SecurityError(f"the chat template built a value of {len(seq) * times} items "
                                    f"(at most {RENDER_CHARS})")
        elif operator == "**" and isinstance(right, int) and right > 64 and abs(left) > 1:
            raise SecurityError(f"the chat template raised a number to the power {right}")
        return _check_size(super().call_binop(context, operator, left, right))


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block, as transformers builds it, so `set` inside the block stays inside it there and here.
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(Namespace):
    """`namespace()` that refuses underscore-prefixed names, as transformers' does (they lead to internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick: `self` may be a key
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        _check_budget()
        Namespace.__setitem__(self, name, _check_size(value))


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})")


class _Dict:
    """The `dict` global: builds dicts, and offers nothing else to reach through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: no HTML escaping, and the json.dumps options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=_Namespace)
    return env.from_string(template)


def _plain(value: Any) -> Any:
    # What the template sees is rebuilt from plain JSON-like types (as transformers does): rich objects carry methods
    # the sandbox does not know to be dangerous, so they become an inert "<TypeName>".
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    base = next((t for t in (str, int, float) if isinstance(value, t)), None)  # subclasses lose their methods
    return base(value) if base else f"<{type(value).__name__}>"


def _template_messages(messages: Any) -> list[dict]:
    # transformers drops None-valued keys, then fills `reasoning_content` / `thinking` from any reasoning field.
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages is empty: give at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"each message must be a dict, got {message!r}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def render_jinja(template: str, messages: list[Message], tools: list[Tool] | None = None, *,
                 add_generation_prompt: bool = True, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 **kwargs: Any) -> str:
    """Render a chat template as `apply_chat_template(tokenize=False)` does for a tokenizer whose only special
    tokens are `bos_token` and `eos_token`; extra kwargs (`enable_thinking`, ...) reach the template as variables.

    Any failure inside the template (syntax, `raise_exception`, a sandbox violation) becomes a ValueError.
    """
    chat = _template_messages(messages)
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise ValueError("tools must be JSON-schema dicts: {'type': 'function', 'function': {...}}")
    documents = _plain(kwargs.pop("documents", None))
    variables = _plain({"bos_token": bos_token, "eos_token": eos_token, **kwargs})
    _render.deadline = time.monotonic() + RENDER_SECONDS
    try:
        return _bounded(_compile(template).generate(messages=chat, tools=_plain(tools), documents=documents,
                                                    add_generation_prompt=add_generation_prompt, **variables))
    except Exception as e:  # the template is untrusted code: whatever goes wrong in it is a template error
        raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _render.deadline = None


def _bounded(pieces: Any) -> str:
    """The rendered text, cut off with an error once it passes RENDER_CHARS."""
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        if size > RENDER_CHARS:
            raise SecurityError(f"the chat template's output passed {RENDER_CHARS} characters")
        out.append(piece)
    return "".join(out)
