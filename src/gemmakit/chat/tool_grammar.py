"""Gemma 4 tool calls that always parse: a Lark grammar (llguidance's dialect) per request that follows each tool's
JSON schema in Gemma's value syntax, and the constraint that applies it only once the model opens a call.

Why a grammar of our own rather than llguidance's JSON-schema support: Gemma 4 does not write JSON inside a call.
It writes `call:NAME{key:value,...}` with bare keys and strings between `<|"|>` delimiters (chat/parser.py's
docstring has the syntax), so the schema is translated here into that syntax, the way the chat template shows the
tools to the model:

- An object with declared `properties` takes exactly those keys, in the order the template writes keys (sorted
  case-insensitively, as Jinja's `dictsort`); `required` ones must appear, the others may be left out. Keys that
  are not bare words (`[\\w.$-]+`) are written as strings, which the parser reads as keys too. Names listed in
  `required` but not declared are required with any value. Undeclared keys are never written, even where the
  schema would allow them (`additionalProperties`): the model was shown only the declared ones.
- string, integer, number, boolean, null, `enum`, `const`, array (`items`), nested objects, `anyOf`/`oneOf`
  (as alternatives), type lists and OpenAPI's `nullable` are followed. Numbers are written the JSON way (no
  leading zeros, digits on both sides of a point), so every call's arguments transcode to valid JSON.
- Anything else never refuses a tool: a subtree whose schema uses `$ref`, `allOf`, `not`, `if`,
  `patternProperties`, `additionalProperties` as its only description, or an unknown type, is "any Gemma value"
  there. Keywords the template does not show the model (`minLength`, `pattern`, `minimum`, `minItems`, `format`,
  ...) are not enforced either, so such a call parses but may not validate.

Strings may hold any character, `<` and text that spells markers included. In a Gemma 4 vocabulary the
delimiter `<|"|>` is one special token: a string is that token, text, that token. The text is any run of ordinary
tokens whose characters do not spell `<|"|>` (the parser finds the delimiter as text, so that is the one thing a
string cannot say); llguidance's lexeme intersection and negation (`&`, `~`) express exactly that. Tokens that
llguidance sees as special but that are text to the parser (Gemma's HTML tags like `<b>`) are allowed between
runs (inside enum and const strings they must be spelled out). Without the special token (a vocabulary that spells
the markers out) a string is a single lexeme. Forcing is off, so fixed text may come in any tokenization.

`ToolCallConstraint` is the `auto` mode: it is `dormant` (the engine masks nothing and keeps its greedy fast
paths) until the model emits `<|tool_call>`, then hands each step to a fresh matcher for one call, and lets go
again after `<tool_call|>` (another call may follow, or `<|tool_response>`, which ends the turn).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gemmakit.chat.parser import _KEY, MARKERS, STRING_DELIM, TOOL_CLOSE, TOOL_OPEN

TokenId = Callable[[str], "int | None"]
_UNSUPPORTED = ("$ref", "allOf", "not", "if", "then", "else", "patternProperties", "dependentSchemas",
                "dependentRequired", "unevaluatedProperties", "propertyNames", "contains", "prefixItems")
_MAX_DEPTH = 48  # deeper schemas (only hand-made ones) are any value below this
_INTEGER = r"/-?(0|[1-9][0-9]*)/"
_NUMBER = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"
_TEXT = r'/(?s:.+)/ & ~/(?s:.*<\|"\|>.*)/'  # one or more characters, never spelling the delimiter


def tool_call_grammar(tools: Iterable[str | dict], token_id: TokenId, repeat: bool = False, *,
                      opened: bool = False, text_tokens: Iterable[int] = ()) -> str:
    """The grammar of one Gemma 4 tool call (`repeat`: one or more) to any of `tools`: OpenAI-style tool dicts,
    whose `parameters` schema the arguments follow (module docstring), or bare names, whose arguments may be any
    object. `token_id` finds the markers that are single tokens of the vocabulary (matched as tokens, not
    spelled). `opened`: the output starts after `<|tool_call>` (the auto mode's trigger consumed it).
    `text_tokens`: tokens llguidance treats as special that may stand in string text (`string_tokens`)."""
    builder = _Builder(token_id, list(text_tokens))
    calls = []
    for tool in tools:
        fn = tool if isinstance(tool, str) else (tool.get("function", tool) if isinstance(tool, dict) else None)
        name = fn if isinstance(fn, str) else (fn or {}).get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool {tool!r} has no name")
        params = None if isinstance(fn, str) else fn.get("parameters")
        calls.append(f"{json.dumps('call:' + name, ensure_ascii=False)} {builder.arguments(params)}")
    if not calls:
        raise ValueError("a tool-call grammar needs at least one tool")
    builder.rules.insert(0, "body: " + " | ".join(calls))
    if opened:
        head = f"start: body {builder.mark(TOOL_CLOSE)}"
    else:
        head = f"start: call{'+' if repeat else ''}\ncall: {builder.mark(TOOL_OPEN)} body {builder.mark(TOOL_CLOSE)}"
    # no_forcing: llguidance otherwise lets fixed text (a key, a name) through only in its own tokenization,
    # refusing the tokens the model would pick when they differ (e.g. "$:" across a key and its colon).
    return "\n".join(['%llguidance {"no_forcing": true}', head, *builder.rules])


def string_tokens(tokenizer: Any, llg_tokenizer: Any) -> list[int]:
    """Added tokens that are text to the chat parser (no marker) yet special to llguidance, e.g. `<b>`: a
    string may use them, as a model writing HTML into an argument would."""
    markers = {m for family in MARKERS.values() for m in family}
    return sorted(i for i, t in tokenizer.backend.get_added_tokens_decoder().items()
                  if not t.special and t.content not in markers and llg_tokenizer.is_special_token(i))


class _Builder:
    """Collects the rules for one grammar; each schema becomes a rule (or an inline expression)."""

    def __init__(self, token_id: TokenId, text_tokens: list[int]):
        self.token_id, self.rules, self._n, self._any = token_id, [], 0, False
        self.quote = token_id(STRING_DELIM)
        if self.quote is not None:
            extra = f" ({_token_set(text_tokens)} TEXT?)*" if text_tokens else ""
            self.rules += [f"string: <[{self.quote}]> TEXT?{extra} <[{self.quote}]>", f"TEXT: {_TEXT}"]
        else:
            self.rules += ['string: STRING', 'STRING: "<|\\"|>" BODY "<|\\"|>"',
                           r'BODY: /(?s:.*)/ & ~/(?s:.*<\|"\|>.*)/']
        self.rules += [f"INTEGER: {_INTEGER}", f"NUMBER: {_NUMBER}"]

    def mark(self, text: str) -> str:
        i = self.token_id(text)
        return f"<[{i}]>" if i is not None else json.dumps(text)

    def arguments(self, schema: Any) -> str:
        """The rule for a call's arguments: always an object."""
        if isinstance(schema, dict) and not _unsupported(schema) and _declared(schema):
            return self._object(schema, 0)
        return self.any_object()

    def _rule(self, body: str) -> str:
        self._n += 1
        self.rules.append(f"v{self._n}: {body}")
        return f"v{self._n}"

    def value(self, schema: Any, depth: int) -> str:
        if not isinstance(schema, dict) or not schema or depth > _MAX_DEPTH or _unsupported(schema):
            return self.any_value()
        alternatives = self._alternatives(schema, depth)
        if alternatives is None:
            return self.any_value()
        if schema.get("nullable") is True and '"null"' not in alternatives:
            alternatives.append('"null"')
        return self._rule(" | ".join(alternatives)) if len(alternatives) > 1 else alternatives[0]

    def _alternatives(self, schema: dict, depth: int) -> list[str] | None:
        """The grammar alternatives for `schema`, or None for any value."""
        if "const" in schema:
            literal = self.literal(schema["const"])
            return None if literal is None else [literal]
        if isinstance(schema.get("enum"), list):
            found = [x for x in (self.literal(v) for v in schema["enum"]) if x is not None]
            return found or None
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return [self.value(sub, depth + 1) for sub in schema[key]]
        kinds = schema.get("type")
        if kinds is None:
            kinds = "object" if "properties" in schema else "array" if "items" in schema else None
        if kinds is None:
            return None
        out = []
        for kind in kinds if isinstance(kinds, list) else [kinds]:
            alternative = self._typed(kind, schema, depth)
            if alternative is None:
                return None
            out.append(alternative)
        return out or None

    def _typed(self, kind: Any, schema: dict, depth: int) -> str | None:
        simple = {"string": "string", "integer": "INTEGER", "number": "NUMBER", "boolean": '("true" | "false")',
                  "null": '"null"'}
        if kind in simple:
            return simple[kind]
        if kind == "object":
            return self._object(schema, depth) if _declared(schema) else self.any_object()
        if kind == "array":
            item = self.value(schema.get("items"), depth + 1) if isinstance(schema.get("items"), dict) else (
                self.any_value())
            return self._rule(f'"[" ({item} ("," {item})*)? "]"')
        return None

    def _object(self, schema: dict, depth: int) -> str:
        """Declared keys in the template's order; required ones present, optional ones maybe (commas between)."""
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        names = [str(k) for k in props] + [r for r in required if r not in props]
        names = [n for n in sorted(dict.fromkeys(names), key=str.lower) if STRING_DELIM not in n]
        members = [f"{self._key(n)} \":\" {self.value(props.get(n), depth + 1)}" for n in names]
        must = [n in required for n in names]
        # rest[i]: the members from i on, each after a comma. The first member written is any one up to the
        # first required one; the rest follow it.
        rest = [""] * (len(names) + 1)
        for i in range(len(names) - 1, -1, -1):
            item = f'"," {members[i]}' if must[i] else f'("," {members[i]})?'
            rest[i] = self._rule(f"{item} {rest[i + 1]}".strip())
        firsts = []
        for i in range(len(names)):
            firsts.append(f"{members[i]} {rest[i + 1]}".strip())
            if must[i]:
                break
        if not firsts:
            return self._rule('"{" "}"')
        inner = " | ".join(f"({f})" for f in firsts)
        return self._rule(f'"{{" ({inner}){"" if any(must) else "?"} "}}"')

    def _key(self, name: str) -> str:
        return json.dumps(name, ensure_ascii=False) if _KEY.fullmatch(name) else self._string_literal(name)

    def _string_literal(self, text: str) -> str:
        if self.quote is None:
            return json.dumps(STRING_DELIM + text + STRING_DELIM, ensure_ascii=False)
        inner = f" {json.dumps(text, ensure_ascii=False)} " if text else " "
        return f"<[{self.quote}]>{inner}<[{self.quote}]>"

    def literal(self, value: Any) -> str | None:
        """`value` as fixed text in Gemma's syntax (as the template writes it); None if it has no such text."""
        if isinstance(value, str):
            return None if STRING_DELIM in value else self._string_literal(value)
        if isinstance(value, bool) or value is None:
            return json.dumps(json.dumps(value))
        if isinstance(value, int):
            return json.dumps(str(value))
        if isinstance(value, float):
            text = json.dumps(value)
            return json.dumps(text) if re.fullmatch(_NUMBER[1:-1], text) else None
        if isinstance(value, list):
            items = [self.literal(v) for v in value]
            if any(i is None for i in items):
                return None
            return '("[" ' + ' "," '.join(items) + ' "]")'
        if isinstance(value, dict):
            parts = []
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]).lower()):
                item = self.literal(v)
                if item is None or STRING_DELIM in str(k):
                    return None
                parts.append(f'{self._key(str(k))} ":" {item}')
            return '("{" ' + ' "," '.join(parts) + ' "}")'
        return None

    def any_value(self) -> str:
        if not self._any:
            self._any = True
            self.rules += [
                'any_value: string | any_object | any_array | NUMBER | "true" | "false" | "null"',
                'any_object: "{" (any_member ("," any_member)*)? "}"',
                "any_member: (KEY | string) \":\" any_value",
                'any_array: "[" (any_value ("," any_value)*)? "]"',
                r"KEY: /[A-Za-z0-9_.$-]+/",
            ]
        return "any_value"

    def any_object(self) -> str:
        self.any_value()
        return "any_object"


def _token_set(ids: list[int]) -> str:
    return "<[" + ",".join(str(i) for i in ids) + "]>"


def _unsupported(schema: dict) -> bool:
    return any(k in schema for k in _UNSUPPORTED)


def _declared(schema: dict) -> bool:
    """Objects with declared keys (or closed to all keys) follow them; any other object schema is any object."""
    return bool(schema.get("properties")) or bool(schema.get("required")) or schema.get("additionalProperties") is False


class ToolCallConstraint:
    """The `auto` mode's constraint (same interface as constrain.Constraint): free until `trigger`
    (`<|tool_call>`), then one call by `make()`'s grammar, then free again. Never done: the model ends the turn."""

    def __init__(self, trigger: int, make: Callable[[], Any], vocab_size: int):
        self.trigger, self._make = trigger, make
        self._free = torch.ones(vocab_size, dtype=torch.bool)
        self._call: Any = None

    @property
    def in_call(self) -> bool:
        return self._call is not None

    @property
    def dormant(self) -> bool:
        """Nothing is constrained this step: the engine skips the mask and keeps its fast greedy paths."""
        return self._call is None

    def allowed(self) -> Tensor:
        return self._free if self._call is None else self._call.allowed()

    def advance(self, token: int) -> None:
        if self._call is None:
            if token == self.trigger:
                self._call = self._make()
            return
        self._call.advance(token)
        if self._call.done:
            self._call = None

    @property
    def done(self) -> bool:
        return False
