"""One generated choice of a request: turns the engine's text updates into OpenAI message fields.

A chat choice of an instruction-tuned model goes through the chat parser (chat/parser.py), which splits the
stream into content, reasoning (the thought channel) and tool calls, holding back text that may still turn
into a marker. Streamed tool calls go out as the parser's `call_parts` (the name first, then the arguments in
fragments, as OpenAI streams them), except under a guard, which checks arguments whole: then each call goes out
whole once it is complete and checked. A base model chats through the plain dialogue format, whose turn markers
the engine already cut as stop strings; only the space after "Assistant:" is dropped here.
Completions take the text as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gemmakit.chat.parser import CallPart, Delta, StreamParser
from gemmakit.sampling import TokenLogprobs
from gemmakit.serve.loop import Update
from gemmakit.serve.protocol import finish_reason, tool_call_json


@dataclass
class Choice:
    index: int
    parser: StreamParser | None = None  # None: text as it comes (completions, base-model dialogue)
    strip_start: bool = False  # the dialogue format's space after "Assistant:"
    content: str = ""
    reasoning: str = ""
    tool_calls: list[Any] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    tokens: int = 0
    engine_reason: str | None = None
    filtered: bool = False
    watch: Any = None  # a guard's MessageWatch (safety/guard.py): what of the message may be sent yet

    def add_guard(self, guard: Any, prompt: str | None) -> None:
        from gemmakit.safety.guard import MessageWatch

        self.watch = MessageWatch(guard, prompt)

    def guard(self, delta: Delta) -> str | None:
        """Pass `delta` through the guard (after `feed`). The refusal if a rule blocks, else None; at the end,
        content and reasoning become what was sent (redacted)."""
        refusal = self.watch.update(delta, self.finished)
        if self.finished and refusal is None:
            self.content, self.reasoning = self.watch.content.sent, self.watch.reasoning.sent
        return refusal

    def feed(self, update: Update) -> Delta:
        """The new message parts of an update (and, when it is the last one, whatever the parser held)."""
        self.tokens += len(update.tokens)
        self.logprobs += update.logprobs
        delta = self._text(update.text)
        if update.finish_reason is not None:
            self.engine_reason = update.finish_reason
            if self.parser is not None:
                tail = self.parser.finish()
                delta = Delta(delta.content + tail.content, delta.reasoning + tail.reasoning,
                              delta.tool_calls + tail.tool_calls, delta.call_parts + tail.call_parts)
        self.content += delta.content
        self.reasoning += delta.reasoning
        self.tool_calls += delta.tool_calls
        return delta

    def _text(self, text: str) -> Delta:
        if self.strip_start and not self.content:
            text = text.lstrip()
        return self.parser.feed(text) if self.parser is not None else Delta(content=text)

    @property
    def finished(self) -> bool:
        return self.engine_reason is not None

    @property
    def finish_reason(self) -> str | None:
        if self.filtered:
            return "content_filter"
        return finish_reason(self.engine_reason, bool(self.tool_calls))

    def message(self) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content.strip() or None}
        if self.reasoning.strip():
            msg["reasoning_content"] = msg["reasoning"] = self.reasoning.strip()
        if self.tool_calls:
            msg["tool_calls"] = [tool_call_json(c, i) for i, c in enumerate(self.tool_calls)]
            for c in msg["tool_calls"]:
                del c["index"]
        return msg

    def delta_json(self, delta: Delta, first_call: int) -> dict:
        """A chat.completion.chunk delta. Tool calls stream as their parts (name first, then argument
        fragments); under a guard they are sent whole once checked (`first_call`: the index of the first)."""
        out: dict[str, Any] = {}
        if delta.content:
            out["content"] = delta.content
        if delta.reasoning:
            out["reasoning_content"] = out["reasoning"] = delta.reasoning
        if self.watch is not None or self.filtered:  # the guard checks arguments whole: nothing before that
            if delta.tool_calls:
                out["tool_calls"] = [tool_call_json(c, first_call + i) for i, c in enumerate(delta.tool_calls)]
        elif delta.call_parts:
            out["tool_calls"] = [call_part_json(p) for p in delta.call_parts]
        return out


def call_part_json(part: CallPart) -> dict:
    """One streamed piece of a tool call as OpenAI's chunks carry it: the opening piece names the call."""
    if part.name is not None:
        return {"index": part.index, "id": part.id, "type": "function",
                "function": {"name": part.name, "arguments": part.arguments}}
    return {"index": part.index, "function": {"arguments": part.arguments}}
