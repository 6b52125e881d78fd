"""Parse what a Gemma model generates into content, reasoning and tool calls, as it streams.

The text arrives as decoded chunks with special tokens spelled out (`skip_special_tokens=False`), so
`<|channel>` is literal text and a chunk may end anywhere, even inside a marker ("<|tool_" + "call>").
`StreamParser.feed` takes such chunks and returns a `Delta` of what can already be told apart.

Gemma 4 output grammar (architecture note §5.2):

    [<|channel>thought\\n REASONING <channel|>] CONTENT [<|tool_call>call:NAME{ARGS}<tool_call|>]... END

- The thought channel: `<|channel>` opens it, the channel name line ("thought\\n") is dropped, `<channel|>`
  closes it. Text inside is reasoning.
- Tool calls are parsed when `<tool_call|>` arrives and emitted at once. A body that does not parse is
  returned as content *with its markers* (so nothing the model wrote is lost) plus a warning, never raised.
  So is a call still open at the end of generation.
- End markers (`<turn|>`, `<end_of_turn>`, `<eos>`, `<|tool_response>`) end the message; the rest is ignored.
- Other special markers (`<|turn>`, `<bos>`, `<|think|>`, ...) are dropped; they are never content.
- Gemma 3 has no thought or tool syntax: everything is content up to an end marker.

Streaming safety: every marker starts with "<" and contains no other "<", so only the text from the last
"<" on can be the start of a marker. That suffix is held back until it can be decided, which makes the
result independent of where the chunks were cut. Nothing is stripped: whitespace around the channel and
the tool calls is kept as the model wrote it.

The value syntax inside a tool call (`parse_value`), as the chat template writes it:

    value  := string | object | array | number | true | false | null (also True/False/None)
    string := <|"|> any text, newlines and braces included, up to the next <|"|> <|"|>
    object := { [key : value (, key : value)*] }     key := bare word [\\w.$-]+ | string
    array  := [ [value (, value)*] ]                 number := -?(digits[.digits] | .digits)[e[+-]digits]

Whitespace is allowed between tokens. There is no escaping: a string ends at the next `<|"|>`.
"""

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
TOOL_OPEN, TOOL_CLOSE = "<|tool_call>", "<tool_call|>"
STRING_DELIM = '<|"|>'
CHANNEL_NAME = "thought\n"
END_MARKERS = ("<turn|>", "<end_of_turn>", "<eos>", "<|tool_response>")
# Special tokens that may show up in decoded text but are never shown to the user.
_DROPPED_GEMMA3 = ("<bos>", "<pad>", "<unk>", "<mask>", "<start_of_turn>", "<start_of_image>", "<end_of_image>")
_DROPPED_GEMMA4 = _DROPPED_GEMMA3 + (
    "<|turn>", "<|think|>", "<|tool>", "<tool|>", "<tool_response|>", STRING_DELIM,
    "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
)  # fmt: skip
MARKERS = {
    "gemma3": END_MARKERS + _DROPPED_GEMMA3,
    "gemma4": END_MARKERS + _DROPPED_GEMMA4 + (CHANNEL_OPEN, CHANNEL_CLOSE, TOOL_OPEN, TOOL_CLOSE),
}

# Parser states. HEADER: just after <|channel>, deciding whether the channel name line follows.
CONTENT, HEADER, THOUGHT, TOOL, DONE = "content", "header", "thought", "tool", "done"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object string, as OpenAI-style APIs carry it
    id: str


@dataclass
class Delta:
    """What one `feed()` or `finish()` produced."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ParsedMessage:
    """The whole answer."""

    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    warnings: list[str]


def _random_id(index: int) -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _pattern(markers: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))


_TOOL_END = _pattern((TOOL_CLOSE,) + END_MARKERS)


class StreamParser:
    """Incremental parser for one generated message; see the module docstring for the rules."""

    def __init__(
        self, family: str = "gemma4", in_thought: bool = False, make_id: Callable[[int], str] | None = None
    ) -> None:
        """`in_thought`: the prompt already opened the thought channel. `make_id(i)` names the i-th call."""
        if family not in MARKERS:
            raise ValueError(f"unknown family {family!r}; expected one of {sorted(MARKERS)}")
        self.family = family
        self.warnings: list[str] = []
        self._markers = MARKERS[family]
        self._find = _pattern(self._markers)
        self._make_id = make_id or _random_id
        self._state = THOUGHT if in_thought else CONTENT
        self._after_tool = CONTENT  # the state a tool call returns to
        self._buf = ""
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[ToolCall] = []
        self._delta = Delta()
        self._finished = False

    def feed(self, text: str) -> Delta:
        """Add a chunk of generated text; return what it completed."""
        if self._finished:
            raise RuntimeError("feed() after finish(); use a new StreamParser per message")
        self._buf += text
        self._drain(final=False)
        return self._take()

    def finish(self) -> Delta:
        """End of generation: flush held-back text and settle anything left open."""
        if not self._finished:
            self._finished = True
            self._drain(final=True)
            if self._state == TOOL:
                self._reject_tool(TOOL_OPEN + self._buf, "unclosed tool call at end of generation")
                self._buf = ""
        return self._take()

    @property
    def message(self) -> ParsedMessage:
        """Everything parsed so far."""
        return ParsedMessage("".join(self._content), "".join(self._reasoning), list(self._calls), list(self.warnings))

    def _take(self) -> Delta:
        delta, self._delta = self._delta, Delta()
        return delta

    def _drain(self, final: bool) -> None:
        # Each step consumes a prefix of the buffer; it returns False when it needs more text.
        while self._buf and self._state != DONE:
            if self._state == HEADER:
                progressed = self._step_header(final)
            elif self._state == TOOL:
                progressed = self._step_tool()
            else:
                progressed = self._step_text(final)
            if not progressed:
                break
        if self._state == DONE:
            self._buf = ""

    def _step_text(self, final: bool) -> bool:
        match = self._find.search(self._buf)
        if match is None:
            keep = 0 if final else _held_back(self._buf, self._markers)
            self._emit(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        self._emit(self._buf[: match.start()])
        self._buf = self._buf[match.end() :]
        self._on_marker(match.group())
        return True

    def _on_marker(self, marker: str) -> None:
        if marker in END_MARKERS:
            self._state = DONE
        elif marker == CHANNEL_OPEN and self._state == CONTENT:
            self._state = HEADER
        elif marker == CHANNEL_CLOSE and self._state == THOUGHT:
            self._state = CONTENT
        elif marker == TOOL_OPEN:
            self._after_tool, self._state = self._state, TOOL
        # Anything else (a dropped token, a stray close, a nested open) is not shown.

    def _step_header(self, final: bool) -> bool:
        buf = self._buf
        if buf.startswith(CHANNEL_NAME):
            cut = len(CHANNEL_NAME)
        elif CHANNEL_NAME.startswith(buf):
            if not final:
                return False  # "thou..." may still become the name line
            cut = len(buf)
        elif buf.startswith(CHANNEL_NAME.strip()):
            cut = len(CHANNEL_NAME.strip())  # the name without its newline, e.g. "thought<channel|>"
        else:
            cut = 0  # no name line: it is all reasoning
        self._buf, self._state = buf[cut:], THOUGHT
        return True

    def _step_tool(self) -> bool:
        # Inside a call only its close or an end marker counts: strings may hold any other text.
        match = _TOOL_END.search(self._buf)
        if match is None:
            return False
        body, self._buf = self._buf[: match.start()], self._buf[match.end() :]
        if match.group() != TOOL_CLOSE:
            self._reject_tool(TOOL_OPEN + body, f"unclosed tool call ended by {match.group()}")
            self._state = DONE
            return True
        try:
            name, args = parse_tool_call(body)
        except ValueError as err:
            self._reject_tool(TOOL_OPEN + body + TOOL_CLOSE, f"malformed tool call: {err}")
        else:
            call = ToolCall(name, json.dumps(args, ensure_ascii=False), self._make_id(len(self._calls)))
            self._calls.append(call)
            self._delta.tool_calls.append(call)
        self._state = self._after_tool
        return True

    def _reject_tool(self, raw: str, warning: str) -> None:
        self.warnings.append(warning)
        self._content.append(raw)
        self._delta.content += raw

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self._state == THOUGHT:
            self._reasoning.append(text)
            self._delta.reasoning += text
        else:
            self._content.append(text)
            self._delta.content += text


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the suffix of `text` that could still grow into a marker."""
    start = text.rfind("<")  # markers hold a single "<", at their start
    if start < 0:
        return 0
    tail = text[start:]
    return len(tail) if any(m.startswith(tail) and m != tail for m in markers) else 0


def parse(text: str, family: str = "gemma4", *, make_id: Callable[[int], str] | None = None) -> ParsedMessage:
    """Parse a whole generated message at once: `feed(text)` then `finish()`."""
    parser = StreamParser(family, make_id=make_id)
    parser.feed(text)
    parser.finish()
    return parser.message


_CALL = re.compile(r"\s*call:([\w.\-]+)\s*")
_KEY = re.compile(r"[\w.$\-]+")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_INT = re.compile(r"-?\d+")
_WS = re.compile(r"\s*")
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def tool_call_grammar(names: list[str], token_id: Callable[[str], int | None], repeat: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) for Gemma 4 tool calls to `names`: the syntax above, written
    compactly. `token_id` finds the markers that are single special tokens of the vocabulary (they are then
    matched as tokens, `<[id]>`, not spelled out); `repeat` allows several calls in a row. Strings may not
    contain "<", which keeps the string delimiter unambiguous."""
    def mark(text: str) -> str:
        i = token_id(text)
        return f"<[{i}]>" if i is not None else json.dumps(text)

    if token_id(STRING_DELIM) is not None:
        string = f"string: {mark(STRING_DELIM)} TEXT {mark(STRING_DELIM)}\nTEXT: /[^<]*/"
    else:
        string = 'string: STRING\nSTRING: /<\\|"\\|>[^<]*<\\|"\\|>/'
    return "\n".join([
        f"start: call{'+' if repeat else ''}",
        f'call: {mark(TOOL_OPEN)} "call:" NAME "{{" [pair ("," pair)*] "}}" {mark(TOOL_CLOSE)}',
        "NAME: " + " | ".join(json.dumps(n) for n in names),
        'pair: KEY ":" value',
        r"KEY: /[A-Za-z_][\w.$-]*/",
        '?value: string | object | array | NUMBER | "true" | "false" | "null"',
        string,
        'object: "{" [pair ("," pair)*] "}"',
        'array: "[" [value ("," value)*] "]"',
        r"NUMBER: /-?(\d+(\.\d+)?|\.\d+)([eE][+-]?\d+)?/",
    ])


def parse_tool_call(body: str) -> tuple[str, dict]:
    """Parse "call:NAME{...}" into (name, arguments); raise ValueError if it is malformed."""
    match = _CALL.match(body)
    if match is None:
        raise ValueError(f"expected 'call:NAME{{...}}', got {body[:40]!r}")
    args = parse_value(body[match.end() :])
    if not isinstance(args, dict):
        raise ValueError(f"arguments of {match.group(1)!r} are not an object")
    return match.group(1), args


def parse_value(text: str) -> Any:
    """Parse one value in Gemma's tool syntax (module docstring) into Python; raise ValueError if malformed."""
    try:
        value, pos = _value(text, _skip(text, 0))
    except RecursionError:
        raise ValueError("value nested too deeply") from None
    pos = _skip(text, pos)
    if pos != len(text):
        raise ValueError(f"unexpected text at offset {pos}: {text[pos : pos + 20]!r}")
    return value


def _skip(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _value(text: str, pos: int) -> tuple[Any, int]:
    if text.startswith(STRING_DELIM, pos):
        return _string(text, pos)
    if text.startswith("{", pos):
        items, pos = _sequence(text, pos + 1, "}", _member)
        return dict(items), pos
    if text.startswith("[", pos):
        return _sequence(text, pos + 1, "]", _value)
    if number := _NUMBER.match(text, pos):
        literal = number.group()
        return (int(literal) if _INT.fullmatch(literal) else float(literal)), number.end()
    word = _KEY.match(text, pos)
    if word and word.group() in _LITERALS:
        return _LITERALS[word.group()], word.end()
    raise ValueError(f"expected a value at offset {pos}: {text[pos : pos + 20]!r}")


def _string(text: str, pos: int) -> tuple[str, int]:
    start = pos + len(STRING_DELIM)
    end = text.find(STRING_DELIM, start)
    if end < 0:
        raise ValueError(f"unterminated string at offset {pos}")
    return text[start:end], end + len(STRING_DELIM)


def _member(text: str, pos: int) -> tuple[tuple[str, Any], int]:
    if text.startswith(STRING_DELIM, pos):
        key, pos = _string(text, pos)
    elif word := _KEY.match(text, pos):
        key, pos = word.group(), word.end()
    else:
        raise ValueError(f"expected a key at offset {pos}: {text[pos : pos + 20]!r}")
    pos = _skip(text, pos)
    if not text.startswith(":", pos):
        raise ValueError(f"expected ':' after key {key!r} at offset {pos}")
    value, pos = _value(text, _skip(text, pos + 1))
    return (key, value), pos


def _sequence(text: str, pos: int, close: str, item: Callable[[str, int], tuple[Any, int]]) -> tuple[list, int]:
    """Items separated by commas up to `close`; `pos` is just past the opening bracket."""
    items: list = []
    pos = _skip(text, pos)
    if text.startswith(close, pos):
        return items, pos + 1
    while True:
        value, pos = item(text, pos)
        items.append(value)
        pos = _skip(text, pos)
        if text.startswith(close, pos):
            return items, pos + 1
        if not text.startswith(",", pos):
            raise ValueError(f"expected ',' or {close!r} at offset {pos}: {text[pos : pos + 20]!r}")
        pos = _skip(text, pos + 1)
