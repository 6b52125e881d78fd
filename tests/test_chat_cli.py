"""`gemmakit chat` end to end on the real 270M: through a pseudo-terminal (as a person types) and a pipe.
Run: .venv/bin/python -m pytest tests/test_chat_cli.py
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.usefixtures("default_model")
CHAT = [sys.executable, "-m", "gemmakit.cli", "chat", "--max-tokens", "32"]


class Terminal:
    """A child process on a pseudo-terminal, read in the chunks it writes."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        # A terminal program gets Ctrl-C; a test run started in the background (`cmd &`) has SIGINT ignored,
        # and the child would inherit that, so the default disposition is restored for it.
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(slave)
        self.text, self.pos, self.chunks = "", 0, []

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """The output from where the last read stopped up to and including `marker`."""
        deadline = time.monotonic() + timeout
        while (end := self.text.find(marker, self.pos)) < 0:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.text[self.pos:]!r}"
            if select.select([self.master], [], [], 1.0)[0]:
                self.chunks.append(os.read(self.master, 4096).decode("utf-8", "replace"))
                self.text += self.chunks[-1]
        out, self.pos = self.text[self.pos:end + len(marker)], end + len(marker)
        return out

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=30)
        os.close(self.master)
        return code


def test_terminal_chat_streams_a_sensible_answer():
    """Typed at a terminal, 'What is the capital of France?' gets a streamed answer containing Paris."""
    term = Terminal(CHAT)
    term.read_until(">>> ")
    assert "base model" in term.text  # the user is told how the model is being prompted
    term.send("What is the capital of France?")
    term.read_until("France?")  # the terminal's echo of the question
    before = len(term.chunks)
    assert "Paris" in term.read_until(">>> ")
    pieces = [c for c in term.chunks[before:] if c.strip(">\r\n ")]
    assert len(pieces) >= 2, "the answer arrived in one piece, not streamed"
    term.send("/exit")
    assert term.close() == 0


def test_piped_chat_with_commands(tmp_path):
    """With a pipe (no TTY): multi-line input, /system, /save and a second question all work."""
    script = "\n".join(['"""', "What is the capital", "of France?", '"""', "/save " + str(tmp_path / "c.json"),
                        "/reset", "/think on", "/nonsense", "Who wrote Romeo and Juliet?", ""])
    out = subprocess.run(CHAT, input=script, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "(conversation cleared)" in out.stdout
    assert "no thinking mode" in out.stdout and "unknown command /nonsense" in out.stdout
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "What is the capital\nof France?"


def test_history_is_trimmed_to_the_context_window():
    """When the conversation outgrows --context, the oldest exchanges go, with a notice."""
    questions = ["What is the capital of France?", "What is the capital of Italy?",
                 "What is the capital of Spain?", "What is the capital of Germany?"]
    out = subprocess.run([*CHAT, "--max-tokens", "16", "--context", "140"], input="\n".join(questions) + "\n",
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "context full: dropped" in out.stdout


def test_generate_chat_json():
    """`gemmakit generate --chat --json` prints one JSON object with the reply and its accounting."""
    out = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "--chat", "--json", "--max-tokens",
                          "24", "What is the capital of France?"], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert "Paris" in reply["content"] and reply["finish_reason"] in ("stop", "length")
    assert reply["tool_calls"] == [] and reply["completion_tokens"] > 0


def test_ctrl_c_stops_the_answer_not_the_chat():
    """SIGINT while an answer streams ends that answer; the chat goes on and answers the next question."""
    # A budget far beyond what streams before the signal lands, even when this test process is starved of CPU
    # and reads the pseudo-terminal late (400 tokens once all arrived before the test looked).
    term = Terminal([*CHAT, "--max-tokens", "3000"])
    try:
        term.read_until(">>> ")
        term.send("Count from 1 to 200, separated by commas.")
        term.read_until("commas.")
        term.read_until("1")  # the answer has started streaming (it begins with a number)
        term.proc.send_signal(signal.SIGINT)
        term.read_until("(interrupted)", timeout=300)
        term.read_until(">>> ")
        term.send("What is the capital of France?")
        term.read_until("France?")
        assert "Paris" in term.read_until(">>> ")
        term.send("/exit")
        assert term.close() == 0
    finally:  # a failed run must not leave a 3000-token answer generating behind it
        if term.proc.poll() is None:
            term.proc.kill()
