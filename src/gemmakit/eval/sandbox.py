"""Run model-written Python where it can burn its own time and memory and nothing else, and judge it with a
verdict it cannot forge. Every layer is there because an adversarial test (tests/test_sandbox.py) needs it.

**Isolation is the operating system's** (eval/_box.py builds it): each run is a process in fresh user, mount,
PID, network, IPC and UTS namespaces, made by bubblewrap when it is installed and by util-linux `unshare`
otherwise. Its file system is built from an allowlist: the system directories read-only, a new /proc that
shows only the box's own processes, the run's files read-only at /src, and a size-limited tmpfs at /box, the
only writable place. The home directory, the project, /etc and every host process are simply not there, and
there is no network interface to reach anything. Root runs it as `nobody`. Inside (eval/_inbox.py), a seccomp
filter refuses the syscalls that reach other processes, the kernel or new namespaces, and rlimits bound CPU,
memory, file size, open files and processes. The wall-clock timeout kills the whole box.

An earlier version put an audit hook inside the interpreter instead. Code in the same interpreter can always
undo such a hook (frames, monkeypatching, C functions with no audit event), which is why the boundary moved
to the kernel. Where no namespace can be made, `select` refuses with a message that names the opt-out,
$GEMMAKIT_SANDBOX=unsafe-none, which keeps the rlimits and seccomp and says loudly that it is unsafe.

**The verdict** (`check_function`) never comes from a process that ran candidate code. Whatever such a
process can produce, the candidate can produce first: an exit status (`os._exit(0)`), a marker on stdout,
a result file, a secret it was handed (it reads its own memory, and an HMAC key would be in that memory
too). So the candidate runs in one box and answers calls on a pipe, and the problem's test runs in a second
box with the entry point bound to a proxy. Answers cross as text rebuilt by `ast.literal_eval`, plain data
only, so no object of the candidate's (an `__eq__` that always says yes) reaches the test. The harness's exit
status, set by the kernel when the test's own code returns, is the verdict; the candidate cannot signal,
trace or write to the harness, which lives in another PID and mount namespace. The cost: arguments and
results must be plain data, which HumanEval's are.

`run_python` runs a whole program and reports its exit status: the program's own word, fine for running
code, never for scoring it.

Output is captured up to `max_output` bytes and the rest drained and dropped, so a flood cannot fill the
caller's memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gemmakit.eval._box import ENV, MODES, Backend, SandboxUnavailable, current, prepare, select

__all__ = ["ENV", "MODES", "Limits", "Outcome", "SandboxUnavailable", "check_function", "describe", "run_python",
           "select"]

GONE = 3  # _inbox.py's harness: the candidate ended before the test did
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/box", "TMPDIR": "/box"}


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    processes: int = 32
    max_output: int = 64 * 1024
    disk_bytes: int = 64 << 20  # the /box tmpfs: everything the program may write


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "timed out", or "failed: <why>"
    output: str = ""


def describe(backend: Backend | None = None) -> str:
    """One line for logs and reports: how code is isolated here."""
    b = backend or current()
    seccomp = "seccomp on" if b.seccomp else "no seccomp (libseccomp.so.2 not found)"
    if b.name == "unsafe-none":
        return f"UNSAFE: no isolation ({ENV}=unsafe-none), rlimits and {seccomp}"
    return f"{b.name}: user, mount, pid, net, ipc, uts namespaces, rlimits, {seccomp}"


class _Reader(threading.Thread):
    """Keeps the first `limit` bytes of a pipe and drains the rest."""

    def __init__(self, pipe: IO[bytes], limit: int):
        super().__init__(daemon=True)
        self.pipe, self.limit, self.data, self.dropped = pipe, limit, bytearray(), 0

    def run(self) -> None:
        while chunk := self.pipe.read(65536):
            room = max(self.limit - len(self.data), 0)
            self.data += chunk[:room]
            self.dropped += max(len(chunk) - room, 0)


class _Box:
    """One process in its own box: the run's directory, the process and what it printed."""

    def __init__(self, backend: Backend, role: str, files: dict[str, str], limits: Limits,
                 args: tuple[str, ...] = (), fds: tuple[int, ...] = ()):
        self.work = Path(tempfile.mkdtemp(prefix="gemmakit-sandbox-"))
        try:
            prepare(self.work, files)
            caps = f"{limits.cpu_seconds},{limits.memory_bytes},{limits.file_bytes},{limits.processes}"
            cmd = backend.command(self.work, limits.disk_bytes, [role, caps, *args])
            self.proc = subprocess.Popen(
                cmd, cwd=self.work / "box", env=_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=fds,
                preexec_fn=backend.preexec if backend.name == "unsafe-none" else None)
        except BaseException:
            shutil.rmtree(self.work, ignore_errors=True)
            raise
        self.reader = _Reader(self.proc.stdout, limits.max_output)
        self.reader.start()

    def wait(self, deadline: float) -> int | None:
        """The exit status, or None when the deadline passed first."""
        try:
            return self.proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> str:
        """Kill the whole box (a PID namespace's init takes every process along) and return its output."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=5)
        shutil.rmtree(self.work, ignore_errors=True)
        return bytes(self.reader.data).decode("utf-8", "replace")

    @property
    def note(self) -> str:
        return f" ({self.reader.dropped} more bytes of output dropped)" if self.reader.dropped else ""


def run_python(program: str, limits: Limits | None = None) -> Outcome:
    """Run `program` (a whole Python file) in a box; passed means it exited with status 0, which is the
    program's own claim (`os._exit(0)` makes it): score with check_function instead."""
    limits = limits or Limits()
    box = _Box(current(), "program", {"program.py": program}, limits)
    try:
        code = box.wait(time.monotonic() + limits.timeout)
    finally:
        output = box.close()
    if code is None:
        return Outcome(False, "timed out", output)
    if code == 0:
        return Outcome(True, "passed", output.rstrip())
    return Outcome(False, _failure(code, output) + box.note, output)


def check_function(program: str, test: str, entry_point: str, setup: str = "",
                   limits: Limits | None = None) -> Outcome:
    """Judge `program`'s function `entry_point` with `test`, which defines `check(candidate)` and may use the
    helpers of `setup` (HumanEval's prompt). The program runs in one box, the test in another; passed is
    True only when the test's own code returned (see the module docstring)."""
    limits = limits or Limits()
    backend = current()
    requests, answers = os.pipe(), os.pipe()  # (read, write) each: harness -> candidate, candidate -> harness
    boxes: list[_Box] = []
    try:
        boxes.append(_Box(backend, "candidate", {"program.py": program}, limits,
                          (str(requests[0]), str(answers[1])), (requests[0], answers[1])))
        boxes.append(_Box(backend, "harness", {"setup.py": setup, "test.py": test}, limits,
                          (entry_point, str(requests[1]), str(answers[0])), (requests[1], answers[0])))
    finally:
        for fd in (*requests, *answers):  # only the boxes may hold the pipes: EOF must mean the peer is gone
            os.close(fd)
        if len(boxes) < 2:
            for box in boxes:
                box.close()
    candidate, harness = boxes
    code = harness.wait(time.monotonic() + limits.timeout)
    candidate_code = candidate.wait(time.monotonic() + 0.5) if code == GONE else candidate.proc.poll()
    program_output, test_output = candidate.close(), harness.close()
    if code is None:
        return Outcome(False, "timed out", program_output)
    if code == 0:
        return Outcome(True, "passed", program_output.rstrip())
    if code == GONE:
        status = "failed: the candidate ended before the test did" if candidate_code is None \
            else _failure(candidate_code, program_output)
    else:
        status = _failure(code, test_output)
    return Outcome(False, status + candidate.note, f"{program_output}\n--- test ---\n{test_output}".strip())


CPU_LIMIT = "failed: CPU time limit (killed by SIGXCPU)"


def _failure(code: int, output: str) -> str:
    if code < 0 or code >= 128:
        signum = -code if code < 0 else code - 128
        if signum == signal.SIGXCPU:
            return CPU_LIMIT
        with contextlib.suppress(ValueError):
            return f"failed: killed by {signal.Signals(signum).name}"
    if code == 0:
        return "failed: the program exited before its checks finished"
    last = output.strip().splitlines()[-1] if output.strip() else f"exit status {code}"
    return f"failed: {last[:200]}"
