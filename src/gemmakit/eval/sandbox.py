"""Run model-written Python in a box: a separate process that can burn its own time and memory, and nothing
else. Every layer below is there because one of the adversarial tests (tests/test_sandbox.py) gets past the
others on some machine.

- **Process**: `python -I` (no environment variables read, no user site) on a program file in a fresh
  temporary directory, with an empty environment (PATH and LANG only: the caller's secrets never reach it)
  and that directory as its working directory; the directory is removed afterwards.
- **Limits** (setrlimit in the child): CPU seconds, address space, file size, open files, no core dumps, and a
  process count, which binds because the program runs as `nobody` when we are root.
- **Namespaces**, where `unshare` works (root, or unprivileged user namespaces): a new network namespace (no
  interface but a down loopback: nothing to connect to) and a new PID namespace whose init is killed with the
  box, taking every process the program forked with it. Without them the guard below still blocks sockets
  and the whole process group is killed.
- **Guard** (`_guard.py`, run before the program): an audit hook that refuses sockets, new processes
  (fork, exec, subprocess, os.system), writes outside the working directory, ctypes, and frame or
  garbage-collector introspection. It is defense in depth, not the boundary: code can always burn CPU.
- **Verdict**: a run passes only when the guard prints a one-time nonce after the program returns. The
  nonce arrives on stdin, which is closed before the program starts, so `os._exit(0)` half-way, or a
  program that prints "passed", is a failure.
- **Output** is captured up to `max_output` bytes and the rest drained and dropped, so a flood cannot fill the
  caller's memory; the wall-clock timeout kills the process group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NOBODY = 65534
_GUARD = Path(__file__).with_name("_guard.py")


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    processes: int = 32
    max_output: int = 64 * 1024


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "timed out", or "failed: <why>"
    output: str = ""


@cache
def box_command() -> tuple[list[str], str]:
    """(the `unshare` prefix, the Python interpreter) that work together on this machine, tried once. The
    interpreter must be one `nobody` can execute: a virtual environment under /root is not, so the system
    Python 3 stands in (HumanEval-style programs need only the standard library). ([], sys.executable)
    where no namespace can be made."""
    pythons = [sys.executable, os.path.realpath(sys.executable), shutil.which("python3", path="/usr/bin:/bin")]
    base = ["unshare", "--fork", "--pid", "--net", "--kill-child"]
    prefixes = [base + ["--setuid", str(NOBODY), "--setgid", str(NOBODY)]] if os.geteuid() == 0 else []
    prefixes.append(base + ["--map-root-user"])
    if shutil.which("unshare"):
        for prefix in prefixes:
            for python in filter(None, pythons):
                try:
                    probe = subprocess.run([*prefix, python, "-I", "-c", "pass"], capture_output=True, timeout=20)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if probe.returncode == 0:
                    return prefix, python
    return [], sys.executable


def _limit(limits: Limits, drop_root: bool) -> None:
    """Runs in the child between fork and exec."""
    import resource

    for kind, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                        (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, 64),
                        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, limits.processes)):
        resource.setrlimit(kind, (value, value))
    if drop_root:  # no unshare to do it: become nobody here, so the process limit binds
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


class _Reader(threading.Thread):
    """Keeps the first `limit` bytes of a pipe and drains the rest."""

    def __init__(self, pipe, limit: int):
        super().__init__(daemon=True)
        self.pipe, self.limit, self.data, self.dropped = pipe, limit, bytearray(), 0

    def run(self) -> None:
        while chunk := self.pipe.read(65536):
            room = self.limit - len(self.data)
            self.data += chunk[:max(room, 0)]
            self.dropped += max(len(chunk) - max(room, 0), 0)


def run_python(program: str, limits: Limits | None = None) -> Outcome:
    """Run `program` (a whole Python file) in the box and say whether it ran to the end without error."""
    limits = limits or Limits()
    box = Path(tempfile.mkdtemp(prefix="gemmakit-sandbox-"))
    try:
        (box / "program.py").write_text(program, encoding="utf-8")
        shutil.copy(_GUARD, box / "_guard.py")
        prefix, python = box_command()
        root = os.geteuid() == 0
        if root:
            os.chown(box, NOBODY, NOBODY)
        nonce = secrets.token_hex(16)
        cmd = [*prefix, python, "-I", str(box / "_guard.py"), str(box / "program.py")]
        proc = subprocess.Popen(cmd, cwd=box, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: _limit(limits, root and not prefix))
        reader = _Reader(proc.stdout, limits.max_output)
        reader.start()
        try:
            proc.stdin.write(nonce.encode() + b"\n")
            proc.stdin.close()
        except BrokenPipeError:  # it died at once; the verdict says why
            pass
        try:
            code = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            code = None
        _kill(proc)
        reader.join(timeout=5)
        return _verdict(code, bytes(reader.data).decode("utf-8", "replace"), nonce, reader.dropped)
    finally:
        shutil.rmtree(box, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole session (with a PID namespace its init's death takes the rest along)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _verdict(code: int | None, output: str, nonce: str, dropped: int) -> Outcome:
    marker = f"\n{nonce}\n"
    if code is None:
        return Outcome(False, "timed out", output)
    if code == 0 and marker in f"\n{output}":
        return Outcome(True, "passed", output.replace(nonce, "").rstrip())
    note = f" ({dropped} more bytes of output dropped)" if dropped else ""
    if code < 0 or code >= 128:
        signum = -code if code < 0 else code - 128
        return Outcome(False, f"failed: killed by {signal.Signals(signum).name}{note}", output)
    last = output.strip().splitlines()[-1] if output.strip() else f"exit status {code}"
    if code == 0:
        last = "the program exited before its checks finished"
    return Outcome(False, f"failed: {last[:200]}{note}", output)
