"""Parse what a Gemma model generates into content, reasoning and tool calls, as it streams.

The text arrives as decoded chunks with special tokens spelled out (`skip_special_tokens=False`), so
`<|channel>` is literal text and a chunk may end anywhere, even inside a marker ("<|tool_" + "call>").
`StreamParser.feed` takes such chunks and returns a `Delta` of what can already be told apart.

Gemma 4 output grammar (architecture note §5.2):

    [<|channel>thought\\n REASONING <channel|>] CONTENT [<|tool_call>call:NAME{ARGS}<tool_call|>]... END

- The thought channel: `<|channel>` opens it, the channel name line ("thought\\n") is dropped, `<channel|>`
  closes it. Text inside is reasoning.
- Tool calls stream as OpenAI sends them (`Delta.call_parts`): the call's id and name as soon as the name is
  complete (at its "{"), then its arguments as JSON text in fragments as they are written (`_CallStream`
  transcodes the value syntax below). When `<tool_call|>` arrives the call is parsed and emitted whole as well
  (`Delta.tool_calls`), its `arguments` exactly the concatenated fragments. A body that does not parse (only
  possible unconstrained: a grammar-constrained call always parses) is returned as content *with its markers*
  (so nothing the model wrote is lost) plus a warning, never raised; so is a call still open at the end of
  generation. Its parts already streamed stay sent: a partial call at its index, which never completes (its
  fragments stop where the syntax broke) and is not in `tool_calls`; the next call takes the next index.
  Inside a call only `<|"|>` (outside strings also `<tool_call|>` and the end markers) counts: a string may
  hold any other text, markers spelled out included.
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
import unicodedata
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
class CallPart:
    """A piece of a tool call as it streams (OpenAI's `tool_calls` delta): first `id` and `name` with
    `arguments` "", then fragments of the arguments' JSON text with `id` and `name` None. `index` counts the
    calls the message has opened, from 0."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class Delta:
    """What one `feed()` or `finish()` produced. `tool_calls`: the calls completed (whole, parsed);
    `call_parts`: the same calls as they stream (see `CallPart`)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    call_parts: list[CallPart] = field(default_factory=list)


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


_CALL_MARKERS = (STRING_DELIM, TOOL_CLOSE) + END_MARKERS  # what counts inside a call, outside its strings
_IN_CALL, _IN_STRING = _pattern(_CALL_MARKERS), _pattern((STRING_DELIM,))


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
        self._call: _CallStream | None = None  # the open call
        self._opened = 0  # calls opened so far: the stream index of the next one
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
                self._reject_tool(TOOL_OPEN + self._call.raw + self._buf, "unclosed tool call at end of generation")
                self._buf, self._call = "", None
        return self._take()

    @property
    def in_thought(self) -> bool:
        """The text so far has opened the thought channel and not closed it (how reasoning tokens are counted)."""
        return self._state in (HEADER, THOUGHT)

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
            self._call = _CallStream(self._opened, self._make_id(len(self._calls)))
            self._opened += 1
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
        # Inside a call only its close, an end marker or a string delimiter counts, and inside a string only
        # the delimiter: strings may hold any other text. The rest goes to the call's transcoder as it comes.
        call = self._call
        match = (_IN_STRING if call.in_string else _IN_CALL).search(self._buf)
        if match is None:
            keep = _held_back(self._buf, (STRING_DELIM,) if call.in_string else _CALL_MARKERS)
            self._to_call(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        self._to_call(self._buf[: match.start()])
        self._buf, marker = self._buf[match.end() :], match.group()
        if marker == STRING_DELIM:
            self._to_call(marker)
            return True
        self._call = None
        if marker != TOOL_CLOSE:
            self._reject_tool(TOOL_OPEN + call.raw, f"unclosed tool call ended by {marker}")
            self._state = DONE
            return True
        try:
            name, args = parse_tool_call(call.raw)
        except ValueError as err:
            self._reject_tool(TOOL_OPEN + call.raw + TOOL_CLOSE, f"malformed tool call: {err}")
        else:
            # The streamed JSON is the arguments; it always agrees with the parse (json.dumps is a safety net).
            arguments = call.arguments if call.complete else json.dumps(args, ensure_ascii=False)
            done = ToolCall(name, arguments, call.id)
            self._calls.append(done)
            self._delta.tool_calls.append(done)
        self._state = self._after_tool
        return True

    def _to_call(self, text: str) -> None:
        """Feed the open call; its new parts join the delta (fragments of one call merged)."""
        parts = self._delta.call_parts
        for part in self._call.feed(text):
            last = parts[-1] if parts else None
            if part.name is None and last is not None and last.name is None and last.index == part.index:
                last.arguments += part.arguments
            else:
                parts.append(part)

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


class _CallStream:
    """Transcodes one call body (`call:NAME{...}`, fed in pieces; each `<|"|>` fed on its own) into OpenAI's
    streamed parts: the name once it is complete, then the arguments as JSON text, piece by piece.

    A push-down reader of the value syntax above: bare keys are quoted, string text is JSON-escaped as it
    comes, True/False/None become true/false/null, numbers are written the JSON way once complete (leading
    zeros dropped, "0" added around a bare point; the exponent is kept, so the value is the same). Separators
    are json.dumps's (", ", ": "). A body that stops following the syntax stops the stream there (`failed`);
    what was already sent stays sent (the parser then rejects the call, see StreamParser)."""

    _WORD = re.compile(r"[\w.$+\-]")

    def __init__(self, index: int, call_id: str):
        self.index, self.id = index, call_id
        self.raw = ""  # the body as fed
        self.in_string = False
        self.failed = False
        self._out: list[str] = []
        self._head = ""  # "call:NAME" until the opening brace
        self._stack: list[str] = []  # "{" / "[" of the open containers
        self._expect = "head"  # head | key | key_or_close | colon | value | value_or_close | sep | end
        self._word = ""
        self._key = False  # the open string is a key

    @property
    def arguments(self) -> str:
        return "".join(self._out)

    @property
    def complete(self) -> bool:
        return not self.failed and self._expect == "end"

    def feed(self, text: str) -> list[CallPart]:
        self.raw += text
        if self.failed or not text:
            return []
        parts: list[CallPart] = []
        if text == STRING_DELIM:
            self._delimiter(parts)
        elif self.in_string:
            self._emit(parts, json.dumps(text, ensure_ascii=False)[1:-1])
        else:
            for ch in text:
                self._char(ch, parts)
                if self.failed:
                    break
        return parts

    def _emit(self, parts: list[CallPart], text: str) -> None:
        self._out.append(text)
        parts.append(CallPart(self.index, None, None, text))

    def _fail(self) -> None:
        self.failed = True

    def _delimiter(self, parts: list[CallPart]) -> None:
        self.in_string = not self.in_string
        if self.in_string:
            self._end_word(parts)
            if self.failed or self._expect not in ("key", "key_or_close", "value", "value_or_close"):
                return self._fail()
            self._key = self._expect in ("key", "key_or_close")
            self._emit(parts, '"')
        else:
            self._emit(parts, '"')
            self._expect = "colon" if self._key else "sep"

    def _char(self, ch: str, parts: list[CallPart]) -> None:
        if self._expect == "head":
            if ch != "{":
                self._head += ch
                return
            match = _CALL.fullmatch(self._head)
            if match is None:
                return self._fail()
            parts.append(CallPart(self.index, self.id, match.group(1), ""))
            return self._open("{", parts)
        if self._WORD.match(ch) and self._expect in ("key", "key_or_close", "value", "value_or_close"):
            self._word += ch
            return
        self._end_word(parts)
        if self.failed or ch.isspace():
            return
        expect, top = self._expect, self._stack[-1] if self._stack else None
        if ch in "{[" and expect in ("value", "value_or_close"):
            self._open(ch, parts)
        elif ch == ":" and expect == "colon":
            self._emit(parts, ": ")
            self._expect = "value"
        elif ch == "," and expect == "sep":
            self._emit(parts, ", ")
            self._expect = "key" if top == "{" else "value"
        elif (ch == "}" and top == "{" and expect in ("sep", "key_or_close")) or (
                ch == "]" and top == "[" and expect in ("sep", "value_or_close")):
            self._stack.pop()
            self._emit(parts, ch)
            self._expect = "sep" if self._stack else "end"
        else:
            self._fail()

    def _open(self, bracket: str, parts: list[CallPart]) -> None:
        self._stack.append(bracket)
        self._emit(parts, bracket)
        self._expect = "key_or_close" if bracket == "{" else "value_or_close"

    def _end_word(self, parts: list[CallPart]) -> None:
        word, self._word = self._word, ""
        if not word:
            return
        if self._expect in ("key", "key_or_close"):
            if not _KEY.fullmatch(word):
                return self._fail()
            self._emit(parts, json.dumps(word, ensure_ascii=False))
            self._expect = "colon"
        elif word in _LITERALS:
            self._emit(parts, json.dumps(_LITERALS[word]))
            self._expect = "sep"
        elif _NUMBER.fullmatch(word):
            self._emit(parts, _json_number(word))
            self._expect = "sep"
        else:
            self._fail()


def _json_number(literal: str) -> str:
    """A number of the value syntax as JSON text of the same value: "-007.50e3" -> "-7.50e3", ".5" -> "0.5"."""
    literal = "".join(str(unicodedata.digit(c)) if c.isdigit() else c for c in literal)  # \d is any digit
    if _INT.fullmatch(literal):
        return str(int(literal))
    mantissa, e, exponent = literal.replace("E", "e").partition("e")
    sign = "-" if mantissa.startswith("-") else ""
    whole, point, fraction = mantissa.lstrip("-").partition(".")
    return f"{sign}{whole.lstrip('0') or '0'}{'.' + (fraction or '0') if point else ''}{e}{exponent}"
