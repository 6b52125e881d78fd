"""The code sandbox against programs that try to hurt, to escape or to cheat: each attempt is contained,
reported as that program's failure, and the next program runs normally. Every attack runs on each backend this
machine has (bubblewrap, util-linux unshare, and unshare made by root where we are root) and both as root and
as an unprivileged user (`nobody`, through setpriv, when the suite runs as root); combinations the machine
cannot make are skipped with the reason. The escapes are the proofs of issue 25 against the old audit-hook
guard, kept as tests that must now fail to escape or to forge.

Run: .venv/bin/python -m pytest tests/test_sandbox.py
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from gemmakit.eval import _box
from gemmakit.eval.sandbox import ENV, Limits, Outcome, SandboxUnavailable, check_function, describe, run_python

FAST = Limits(timeout=2.0, cpu_seconds=3)
ROOMY = Limits(timeout=10.0, cpu_seconds=3)  # for attacks that must fail by a limit, not the clock, on a busy machine
# Memory attacks are stopped by the memory limit: on a busy machine (another test worker beside them) the slow
# bomb once reached 3 CPU seconds first.
MEMORY = Limits(timeout=10.0, cpu_seconds=8)
CPU_BOUND = Limits(timeout=10.0, cpu_seconds=1)  # the CPU limit, not the clock, ends a busy loop
SRC = Path(__file__).resolve().parents[1] / "src"
PROJECT = SRC.parent
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from gemmakit.eval import sandbox
job = json.load(sys.stdin)
try:
    out = getattr(sandbox, job["fn"])(*job["args"], limits=sandbox.Limits(**job["limits"]))
except sandbox.SandboxUnavailable as e:
    print(json.dumps({"unavailable": str(e)}))
else:
    print(json.dumps({"passed": out.passed, "status": out.status, "output": out.output}))
"""


@dataclass
class Box:
    """Runs sandbox functions as `user` with backend `mode`: in this process for root, in a child process
    for the unprivileged user when the suite is root."""
    user: str
    mode: str

    def __call__(self, fn: str, *args: str, limits: Limits = FAST) -> Outcome:
        if self.user == "root" or os.geteuid() != 0:
            try:
                return {"run_python": run_python, "check_function": check_function}[fn](*args, limits=limits)
            except SandboxUnavailable as e:
                pytest.skip(f"{self.mode} cannot be made here as {self.user}: {e}")
        job = json.dumps({"fn": fn, "args": args, "limits": asdict(limits)})
        done = subprocess.run([*AS_NOBODY, "/usr/bin/python3", "-B", "-c", DRIVER, str(SRC)], input=job,
                              capture_output=True, text=True, timeout=60, cwd="/",
                              env={"PATH": "/usr/bin:/bin", ENV: self.mode})
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        if "unavailable" in out:
            pytest.skip(f"{self.mode} cannot be made here as {self.user}: {out['unavailable']}")
        return Outcome(out["passed"], out["status"], out["output"])


COMBOS = [(u, m) for u in ("root", "unprivileged") for m in ("bwrap", "unshare", "unshare-as-root")
          if not (u == "unprivileged" and m == "unshare-as-root")]


@pytest.fixture(params=COMBOS, ids=[f"{u}-{m}" for u, m in COMBOS])
def box(request, monkeypatch) -> Box:
    user, mode = request.param
    if user == "root" and os.geteuid() != 0:
        pytest.skip("the suite does not run as root")
    if user == "unprivileged" and os.geteuid() == 0 and not (shutil.which("setpriv") and os.access(
            "/usr/bin/python3", os.X_OK)):
        pytest.skip("no setpriv or /usr/bin/python3 to become nobody with")
    if mode == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    monkeypatch.setenv(ENV, mode)
    return Box(user, mode)


@pytest.fixture
def host() -> dict[str, str]:
    """Host-side bait, readable and writable by anyone so that only the sandbox can keep the program out: a
    world-writable directory holding an `.ssh` key and a Unix socket, a TCP listener, and a process (owned by
    the same user the box runs as) whose command line carries an API key."""
    root = Path(tempfile.mkdtemp(prefix="gemmakit-bait-"))
    key = f"sk-{secrets.token_hex(8)}"
    (root / ".ssh").mkdir()
    (root / ".ssh" / "id_ed25519").write_text(f"-----BEGIN OPENSSH PRIVATE KEY----- {key}\n")
    for path in (root, root / ".ssh"):
        path.chmod(0o777)
    (root / ".ssh" / "id_ed25519").chmod(0o644)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(root / "agent.sock"))
    (root / "agent.sock").chmod(0o777)
    tcp = socket.create_server(("127.0.0.1", 0))
    unix.listen()
    as_nobody = AS_NOBODY if os.geteuid() == 0 else []
    serve = subprocess.Popen([*as_nobody, sys.executable if not as_nobody else "/usr/bin/python3", "-c",
                              "import time; time.sleep(120)", "serve", "--api-key", key])
    try:
        yield {"dir": str(root), "key": key, "port": str(tcp.getsockname()[1]), "pid": str(serve.pid)}
        assert serve.poll() is None, "the box killed a host process"
        assert sorted(p.name for p in root.iterdir()) == [".ssh", "agent.sock"], "the box wrote on the host"
    finally:
        serve.kill()
        serve.wait()
        unix.close()
        tcp.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_correct_program_passes_and_a_wrong_one_fails(box):
    """The box runs ordinary code and reports its failures by their last line."""
    ok = box("run_python", "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('checked')\n")
    assert ok.passed and ok.status == "passed" and ok.output == "checked"
    bad = box("run_python", "assert 1 == 2, 'off by one'\n")
    assert not bad.passed and bad.status == "failed: AssertionError: off by one"


ATTACKS = {
    "infinite loop": ("while True:\n    pass\n", "timed out"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", "failed"),
    "process pool bomb": ("import multiprocessing as mp\n"
                          "ps = [mp.Process(target=print) for _ in range(500)]\n[p.start() for p in ps]\n", "failed"),
    "memory bomb": ("x = bytearray(16 * 1024**3)\n", "failed: MemoryError", MEMORY),
    "slow memory bomb": ("chunks = []\nwhile True:\n    chunks.append(' ' * 10**7)\n", "failed: MemoryError", MEMORY),
    "cpu burner": ("while True:\n    pass\n", "failed: CPU time limit (killed by SIGXCPU)", CPU_BOUND),
    "big file": ("open('big', 'wb').write(b'x' * (2 << 20))\n", "failed: OSError: [Errno 27] File too large", ROOMY),
    "disk bomb": ("for i in range(1000):\n    open(f'f{i}', 'wb').write(b'x' * ((1 << 20) - 1))\n", "failed"),
    "delete everything": ("import shutil\nshutil.rmtree('/usr')\n", "failed"),
    "output flood": ("while True:\n    print('x' * 10000)\n", "timed out"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_resource_attacks_are_contained_and_reported(box, name):
    """Time, memory, processes, disk and output are bounded, and the next program is unaffected."""
    program, status, *limits = ATTACKS[name]
    limits = limits[0] if limits else FAST
    t0 = time.monotonic()
    outcome = box("run_python", program, limits=limits)
    assert not outcome.passed and outcome.status.startswith(status), outcome.status
    assert time.monotonic() - t0 < limits.timeout + 10
    assert len(outcome.output) <= FAST.max_output
    assert Path("/usr/bin").is_dir()
    assert box("run_python", "assert sum(range(4)) == 6\n").passed


SIGNALLED = {
    "abort": ("import os\nos.abort()\n", "SIGABRT"),
    "its own SIGTERM": ("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\n", "SIGTERM"),
    "a null pointer": ("import ctypes\nctypes.string_at(0)\n", "SIGSEGV"),
}


@pytest.mark.parametrize("name", list(SIGNALLED))
def test_a_program_ended_by_a_signal_is_reported_by_its_name(box, name):
    """A signal ends the program as it would outside (no box runs it as its PID namespace's init, which the kernel
    shields from signals it has no handler for), and the status names the signal."""
    program, signal_name = SIGNALLED[name]
    outcome = box("run_python", program, limits=FAST)
    assert outcome.status == f"failed: killed by {signal_name}", outcome.status


def escapes(host: dict[str, str]) -> dict[str, str]:
    """The proofs of issue 25, each ending in a write outside the box or a read of a host secret."""
    d, target = host["dir"], f"{host['dir']}/escaped"
    return {
        # The hook only saw paths: a directory descriptor plus a relative name wrote anywhere.
        "dir_fd write": f"import os\nfd = os.open({d!r}, os.O_RDONLY)\n"
                        "os.write(os.open('escaped', os.O_CREAT | os.O_WRONLY, dir_fd=fd), b'x')\n",
        "dir_fd write from /": "import os\nfd = os.open('/', os.O_RDONLY)\n"
                               f"os.write(os.open({target[1:]!r}, os.O_CREAT | os.O_WRONLY, dir_fd=fd), b'x')\n",
        # The hook asked os.path.realpath whether a path was inside: the program could answer for it.
        "realpath monkeypatch": f"import os.path\nos.path.realpath = lambda p: '/box/ok'\nopen({target!r}, 'w')\n",
        # The hook's block list lived in a frame the program could reach and clear.
        "frame walk": "import sys\nf = sys._getframe()\nwhile f:\n"
                      "    [v.clear() for v in [*f.f_locals.values(), *f.f_globals.values()] if type(v) is set]\n"
                      "    f = f.f_back\n"
                      f"open({target!r}, 'w').write('x')\n",
        # A C function with no audit event started a process the hook never saw.
        "fork_exec": "import _posixsubprocess, os\n"
                     f"argv = [b'/bin/sh', b'-c', b'touch {target}; cat {d}/.ssh/id_ed25519']\n"
                     "_posixsubprocess.fork_exec(argv, argv, True, (), None, None, -1, -1, -1, -1, -1, -1,"
                     " *os.pipe(), False, False, -1, None, None, None, -1, None, False)\n"
                     "import time; time.sleep(0.3)\nraise SystemExit(1)\n",
        "ssh key": f"print(open({d + '/.ssh/id_ed25519'!r}).read())\n",
        "project": f"print(open({str(PROJECT / 'pyproject.toml')!r}).read())\n",
        "home": f"import os\nprint(os.listdir({str(Path.home())!r}))\n",
        "host process command lines": "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
                                      "        print(open(f'/proc/{p}/cmdline', 'rb').read())\n"
                                      "raise SystemExit(1)\n",
        "kill a host process": f"import os, signal\nos.kill({host['pid']}, signal.SIGKILL)\n",
        "pidfd_send_signal": f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({host['pid']}), 9)\n",
        "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nraise SystemExit(1)\n",
        "tcp to the host": f"import socket\nsocket.create_connection(('127.0.0.1', {host['port']}), timeout=1)\n",
        "unix socket on the host": "import socket\ns = socket.socket(socket.AF_UNIX)\n"
                                   f"s.connect({d + '/agent.sock'!r})\n",
    }


NAMES = list(escapes({"dir": "/x", "key": "k", "port": "1", "pid": "1"}))


@pytest.mark.parametrize("name", NAMES)
def test_escapes_fail(box, host, name):
    """Each escape fails inside the box: the host directory, key, processes and sockets are not there."""
    outcome = box("run_python", escapes(host)[name])
    assert not outcome.passed, outcome.output
    assert host["key"] not in outcome.output and "[tool." not in outcome.output
    assert not Path(host["dir"], "escaped").exists()


def test_the_parent_environment_does_not_leak(box, monkeypatch):
    """Only PATH, LANG, HOME and TMPDIR reach the program."""
    monkeypatch.setenv("GEMMAKIT_TEST_SECRET", "hunter2")
    outcome = box("run_python", "import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())\n")
    assert outcome.passed and "hunter2" not in outcome.output and "GEMMAKIT_TEST_SECRET" not in outcome.output


def test_the_box_sees_only_itself(box):
    """A fresh /proc with the box's own processes, no network but loopback, a read-only root and /dev (no
    tmpfs in memory to fill), and /box (with /tmp pointing to it) the only place to write."""
    program = ("import os\n"
               "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
               "assert len(pids) < 5 and str(os.getpid()) in pids, pids\n"
               "ifaces = [line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]]\n"
               "assert ifaces == ['lo'], ifaces\n"
               "open('/tmp/scratch', 'w').write('x')\nassert os.listdir('/box') == ['scratch']\n"
               "for path in ('/usr/x', '/x', '/etc/x', '/src/x', '/proc/x', '/dev/x', '/dev/shm/x'):\n"
               "    try:\n        open(path, 'w')\n    except OSError:\n        pass\n"
               "    else:\n        raise AssertionError(path)\n"
               "print(sorted(os.listdir('/')))\n")
    outcome = box("run_python", program)
    assert outcome.passed, outcome.output
    assert not {"root", "home", "work", "run", "sys", "var"} & set(ast.literal_eval(outcome.output))


def test_seccomp_refuses_namespaces_mounts_and_tracing(box):
    """Root of the box's user namespace holds no capability, and the filter refuses the syscalls that would
    reach the kernel or another process even if it did."""
    if not _box.select(box.mode).seccomp:
        pytest.skip("libseccomp.so.2 is not installed: no seccomp filter")
    program = ("import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "def refused(result):\n    assert result == -1 and ctypes.get_errno() == 1, ctypes.get_errno()\n"
               "refused(libc.unshare(0x10000000))  # CLONE_NEWUSER\n"
               "refused(libc.umount2(b'/src', 2))\n"
               "refused(libc.mount(b'none', b'/box', b'tmpfs', 0, None))\n"
               "child = os.fork()\nif child == 0:\n    time.sleep(5)\n    os._exit(0)\n"
               "refused(libc.ptrace(16, child, 0, 0))  # PTRACE_ATTACH to our own child: allowed without seccomp\n"
               "import socket\ntry:\n    socket.socket(socket.AF_INET)\nexcept PermissionError:\n    pass\n"
               "else:\n    raise AssertionError('AF_INET socket')\n"
               "print('refused')\n")
    outcome = box("run_python", program)
    assert outcome.passed and outcome.output == "refused", outcome.output


def test_children_die_with_the_box_and_are_nobody_outside(box):
    """A child started past every Python-level check (_posixsubprocess.fork_exec) is killed with the box,
    and while it lives its owner on the host is not root."""
    tag = f"{secrets.randbelow(10**6) + 10**6}.5"
    program = ("import _posixsubprocess, os, time\n"
               f"argv = [b'/bin/sleep', b'{tag}']\n"
               "_posixsubprocess.fork_exec(argv, argv, True, (), None, None, -1, -1, -1, -1, -1, -1,"
               " *os.pipe(), False, False, -1, None, None, None, -1, None, False)\n"
               "time.sleep(1.5)\n")
    seen: list[int] = []
    runner = threading.Thread(target=lambda: seen.append(box("run_python", program).passed))
    runner.start()
    uids = set()
    while runner.is_alive():
        uids |= _host_uids(tag)
        time.sleep(0.05)
    runner.join()
    assert seen == [True] and uids, "the child never ran"
    assert 0 not in uids
    time.sleep(0.5)
    assert not _host_uids(tag), "a child outlived its box"


def _host_uids(tag: str) -> set[int]:
    uids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                status = Path(f"/proc/{pid}/status").read_text()
                uids.add(int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2]))
        except (OSError, StopIteration):
            continue
    return uids


TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
FORGERIES = {
    "wrong answer": "def add(a, b):\n    return a - b\n",
    "os._exit(0) before the test": "import os\nos._exit(0)\ndef add(a, b):\n    return a - b\n",
    "os._exit(0) inside the call": "def add(a, b):\n    import os\n    print('passed')\n    os._exit(0)\n",
    "sys.exit(0) inside the call": "def add(a, b):\n    raise SystemExit(0)\n",
    # The nonce of the old guard sat in a frame; every frame and every file is searched for a secret here.
    "secrets from frames and files": (
        "import os, sys\n"
        "f = sys._getframe()\nwhile f:\n    print(f.f_locals)\n    f = f.f_back\n"
        "for top in os.listdir('/'):\n    if top not in ('proc', 'usr', 'sys') and not os.path.islink('/' + top):\n"
        "        for d, _, files in os.walk('/' + top):\n"
        "            print(d, files, ['found the test' for n in files if n == 'test.py'])\n"
        "for p in filter(str.isdigit, os.listdir('/proc')):\n    print(p, open(f'/proc/{p}/cmdline').read())\n"
        "def add(a, b):\n    print('passed')\n    os._exit(0)\n"),
    "an answer equal to everything": "class Yes:\n    def __eq__(self, other):\n        return True\n"
                                     "def add(a, b):\n    return Yes()\n",
    # Unforgeable is not unguessable: answers written ahead that are right are right answers.
    "a verdict written on every descriptor": "import os\nfor fd in range(1, 20):\n    try:\n"
                                             "        os.write(fd, b'passed\\n0\\nok\\n')\n"
                                             "    except OSError:\n        pass\ndef add(a, b):\n    return a - b\n",
    "kill the verdict": "import os, signal\ndef add(a, b):\n    for p in range(1, 400):\n        try:\n"
                        "            os.kill(p, signal.SIGKILL)\n        except OSError:\n            pass\n"
                        "    return a - b\n",
}


def test_a_correct_function_passes_check(box):
    """check_function passes an honest function and says why a wrong one fails."""
    outcome = box("check_function", "def add(a, b):\n    return a + b\n", TEST, "add")
    assert outcome.passed and outcome.status == "passed", outcome
    broken = box("check_function", "def add(a, b):\n    return len(\n", TEST, "add")
    assert not broken.passed and broken.status.startswith("failed: SyntaxError"), broken.status
    slow = box("check_function", "def add(a, b):\n    while True:\n        pass\n", TEST, "add")
    assert slow.status == "timed out"


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_pass_cannot_be_forged(box, name):
    """The verdict is the test's own process returning, which no candidate code runs in or reaches."""
    # ROOMY: a forgery that walks the box's files must be judged, not cut off by the clock of a busy machine.
    outcome = box("check_function", FORGERIES[name], TEST, "add", limits=ROOMY)
    assert not outcome.passed and outcome.status.startswith("failed"), outcome.status
    assert "found the test" not in outcome.output


def test_run_python_exit_status_is_the_programs_own_word(box):
    """run_python reports the exit status, which the program controls: that is why scoring uses check_function."""
    assert box("run_python", "import os\nos._exit(0)\nraise AssertionError\n").passed


def test_no_isolation_refuses_loudly_unless_opted_out(monkeypatch, tmp_path):
    """With neither bwrap nor unshare on PATH, auto refuses and names the opt-out, which works and warns."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="GEMMAKIT_SANDBOX=unsafe-none"):
        _box.select.__wrapped__("auto")
    with pytest.raises(ValueError, match="must be one of"):
        _box.select.__wrapped__("none")
    with pytest.warns(RuntimeWarning, match="WITHOUT operating-system isolation"):
        backend = _box.select.__wrapped__("unsafe-none")
    assert describe(backend).startswith("UNSAFE")
    monkeypatch.setenv(ENV, "unsafe-none")
    assert run_python("print(6 * 7)\n", FAST).output == "42"
