"""`gemmakit chat`: a terminal chat that streams the answer as it is generated.

A front end beside cli.py, over `api.LLM`; the prompt formats it talks through live below it in chat/.

Input is read line by line, from a terminal or a pipe alike. A line ending in a backslash continues on the
next line, and a `\"\"\"` line opens (and closes) a multi-line block. Commands start with a slash (/help lists
them). The conversation is kept as OpenAI-style messages; when the next prompt would not fit the context
window, the oldest exchanges are dropped (the system message stays) and the user is told. Ctrl-C while an
answer streams stops that answer and keeps what was said so far; Ctrl-C or Ctrl-D at the prompt ends the chat.

Images and audio (`/image FILE`, `/audio FILE`, or `gemmakit chat --image/--audio` for the first message) are
held until the next message is sent and go with it as content parts naming the file, so /save writes paths,
not pixels, and /load reads them back. A file or model that cannot work is refused when it is attached, and a
failure while answering (a file gone since) ends that turn only. Soft tokens make a prompt longer than its
text says; the context check counts text only (the towers are not run twice), and when the engine finds the
prompt with its soft tokens too long, the oldest exchanges are dropped and the turn is asked again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from gemmakit.api import LLM
from gemmakit.chat.parser import Delta
from gemmakit.cli_common import check_media, describe_media, media_part, user_message
from gemmakit.files import write_text_atomic
from gemmakit.flags import parse_switch
from gemmakit.media.soft import MediaError
from gemmakit.sampling import ContextOverflow

HELP = """commands:
  /system TEXT    set the system message (and start over)
  /reset          forget the conversation
  /think on|off   thinking mode (Gemma 4 instruction-tuned models)
  /image FILE     attach an image to your next message (multimodal models)
  /audio FILE     attach an audio clip to your next message (Gemma 4 E2B / E4B)
  /save FILE      write the conversation to FILE as JSON (images and audio as their paths)
  /load FILE      continue a conversation written by /save
  /help           this list
  /exit           leave (or Ctrl-D)
multi-line input: end a line with \\ to continue it, or wrap the text in \"\"\" lines"""

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ChatSession:
    def __init__(self, llm: LLM, sampling: dict[str, Any], context: int, out: TextIO = sys.stdout,
                 system: str | None = None, thinking: bool = False, color: bool = False, guard: Any = None,
                 verbose: bool = False):
        self.llm, self.sampling, self.context, self.out = llm, sampling, context, out
        self.system, self.thinking, self.color, self.verbose = system, thinking, color, verbose
        self.guard = guard  # safety/guard.py: checks (and redacts) what is typed and what is answered
        self.history: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # media parts for the next message

    def messages(self) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    # --- commands ---------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return False
        if name == "help":
            self.say(HELP)
        elif name == "reset":
            self.history.clear()
            self.pending.clear()
            self.say("(conversation cleared)")
        elif name == "system":
            self.system, self.history = arg or None, []
            self.say("(system message set; conversation cleared)" if arg else "(system message removed)")
        elif name == "think":
            self.set_thinking(arg)
        elif name == "save":
            self.save(arg)
        elif name == "load":
            self.load(arg)
        elif name in ("image", "audio"):
            self.attach_file(name, arg)
        else:
            self.say(f"(unknown command /{name}; /help lists the commands)")
        return True

    def set_thinking(self, arg: str) -> None:
        fmt = self.llm.chat_format
        if fmt is None or fmt.family != "gemma4":
            self.say("(thinking needs an instruction-tuned Gemma 4 model; this one has no thinking mode)")
        else:
            try:
                self.thinking = bool(parse_switch("/think", arg))
            except ValueError:
                self.say("(usage: /think on|off)")
                return
            self.say(f"(thinking {'on' if self.thinking else 'off'})")

    def save(self, arg: str) -> None:
        if not arg:
            self.say("(usage: /save FILE)")
            return
        path = Path(arg).expanduser()
        data = {"model": self.llm.name, "messages": self.messages()}
        try:
            write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            self.say(f"(could not save to {path}: {e})")
            return
        self.say(f"(saved {len(self.history)} messages to {path})")

    def load(self, arg: str) -> None:
        if not arg:
            self.say("(usage: /load FILE)")
            return
        path = Path(arg).expanduser()
        try:
            messages = json.loads(path.read_text(encoding="utf-8"))["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError("its messages are not a list of {role, content} objects")
            for m in messages:  # every file still there and readable by this model, or nothing is loaded
                for part in m.get("content") if isinstance(m.get("content"), list) else []:
                    if isinstance(part, dict) and part.get("type") in ("image", "audio") and "path" in part:
                        check_media(self.llm, part)
        except (OSError, ValueError, KeyError, TypeError) as e:  # MediaError is a ValueError
            self.say(f"(could not load {path}: {e})")
            return
        system = messages[0].get("content") if messages and messages[0]["role"] == "system" else None
        self.system, self.history, self.pending = system, messages[1 if system is not None else 0:], []
        self.say(f"(loaded {len(self.history)} messages from {path})")

    def attach_file(self, kind: str, arg: str) -> None:
        arg = arg.strip()
        if len(arg) > 1 and arg[0] == arg[-1] and arg[0] in "'\"":  # a terminal's drag and drop quotes paths
            arg = arg[1:-1]
        if not arg:
            self.say(f"(usage: /{kind} FILE)")
            return
        try:
            self.attach(media_part(kind, arg))
        except MediaError as e:
            self.say(f"(error: {e})")
            return
        self.say(f"({kind} {Path(arg).name} attached to your next message)")

    def attach(self, part: dict[str, Any]) -> None:
        """Hold a media part for the next message; MediaError (saying what to do) if it cannot work."""
        check_media(self.llm, part)
        if self.verbose:
            print(describe_media(self.llm, [part]), file=sys.stderr)
        self.pending.append(part)

    # --- one exchange -----------------------------------------------------------------------
    def ask(self, text: str) -> None:
        watch = None
        if self.guard is not None:
            from gemmakit.safety.guard import MessageWatch

            verdict = self.guard.check(text, "input")
            if verdict.refusal:
                self.say(f"(guard: {verdict.refusal})")
                return
            text, watch = verdict.text, MessageWatch(self.guard, verdict.text)
        self.history.append(user_message(text, self.pending))
        self.pending = []
        if not self.fit():
            self.history.pop()
            return
        reply: dict[str, Any] = {"role": "assistant", "content": ""}
        while True:
            try:
                self.answer(reply, watch)
                break
            except MediaError as e:  # nothing was shown: the towers run before the first token
                self.say(f"(error: {e}; the message was not sent)")
                self.history.pop()
                return
            except ContextOverflow:  # the prompt with its soft tokens; raised before the first token too
                if len(self.history) <= 1:
                    self.say(f"(this message with its images / audio does not fit the {self.context}-token "
                             "context; attach fewer or smaller ones, or lower --image-tokens)")
                    self.history.pop()
                    return
                del self.history[:2]
                self.say("(context full: dropped the oldest exchange)")
        reply["content"] = reply["content"].strip()
        self.history.append(reply)

    def answer(self, reply: dict[str, Any], watch: Any) -> None:
        """Stream the reply to the conversation into `reply`, shown as it comes (and as the guard lets it)."""
        try:
            for delta in self.llm.stream_chat(self.messages(), enable_thinking=self.thinking, **self.sampling):
                if watch is not None and watch.update(delta, False):  # shown as the guard lets it through
                    break
                self.show(delta, reply)
            if watch is not None:
                if watch.refusal is None:
                    tail = Delta()
                    watch.update(tail, True)
                    self.show(tail, reply)
                if watch.refusal:
                    self.out.write(f"\n(guard: {watch.refusal})")
        except KeyboardInterrupt:
            self.out.write("\n(interrupted)")
        self.out.write("\n")
        self.out.flush()

    def show(self, delta: Any, reply: dict[str, Any]) -> None:
        if delta.reasoning:
            self.out.write(f"{DIM}{delta.reasoning}{RESET}" if self.color else delta.reasoning)
            reply["reasoning"] = reply.get("reasoning", "") + delta.reasoning
        if delta.content:
            self.out.write(delta.content)
            reply["content"] += delta.content
        for call in delta.tool_calls:
            self.out.write(f"\n[tool call] {call.name}({call.arguments})")
            reply.setdefault("tool_calls", []).append(
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
        self.out.flush()

    def fit(self) -> bool:
        """Drop the oldest exchanges until prompt + max_tokens fits the context; False if nothing fits."""
        budget = self.context - self.sampling.get("max_tokens", 512)
        dropped = 0
        while len(self.llm.encode_prompt(self.llm.render(self.messages(), None, self.thinking))) > budget:
            if len(self.history) <= 1:
                self.say(f"(this message alone does not fit the {self.context}-token context; shorten it)")
                return False
            del self.history[:2]
            dropped += 1
        if dropped:
            self.say(f"(context full: dropped the {dropped} oldest exchange{'s' * (dropped > 1)})")
        return True

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def read_messages(stream: TextIO, prompt: bool, out: TextIO) -> Iterator[str]:
    """User inputs: lines, joined across trailing backslashes and \"\"\" blocks."""
    parts: list[str] = []
    block = False
    while True:
        if prompt:
            out.write("... " if parts else ">>> ")
            out.flush()
        line = stream.readline()
        if not line:
            if parts:
                yield "\n".join(parts)
            return
        line = line.rstrip("\n")
        if line.strip() == '"""':
            block = not block
            if not block:
                yield "\n".join(parts)
                parts = []
        elif block:
            parts.append(line)
        elif line.endswith("\\"):
            parts.append(line[:-1])
        else:
            parts.append(line)
            yield "\n".join(parts)
            parts = []


def run(session: ChatSession, stream: TextIO, interactive: bool) -> None:
    session.say(f"gemmakit chat: {session.llm.name}, {session.llm.describe()}. /help for commands.")
    if session.pending:
        names = ", ".join(Path(p["path"]).name for p in session.pending)
        session.say(f"({names} attached to your first message)")
    inputs = read_messages(stream, interactive, session.out)
    while True:
        try:
            text = next(inputs)
        except (StopIteration, KeyboardInterrupt, EOFError):
            session.out.write("\n" if interactive else "")
            return
        if not text.strip():
            continue
        if text.startswith("/") and not session.command(text.strip()):
            return
        if not text.startswith("/"):
            session.ask(text)
