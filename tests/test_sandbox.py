"""The code sandbox against programs that try to hurt: each attempt is contained, reported as that program's
failure, and the next program runs normally. Run: .venv/bin/python -m pytest tests/test_sandbox.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gemmakit.eval.sandbox import Limits, box_command, run_python

FAST = Limits(timeout=2.0, cpu_seconds=3)


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('checked')\n", FAST)
    assert ok.passed and ok.status == "passed" and ok.output == "checked"
    bad = run_python("assert 1 == 2, 'off by one'\n", FAST)
    assert not bad.passed and bad.status == "failed: AssertionError: off by one"


ATTACKS = {
    "infinite loop": ("while True:\n    pass\n", "timed out"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", "failed"),
    "process pool bomb": ("import multiprocessing as mp\n"
                          "ps = [mp.Process(target=print) for _ in range(500)]\n[p.start() for p in ps]\n", "failed"),
    "memory bomb": ("x = bytearray(16 * 1024**3)\n", "failed: MemoryError"),
    "slow memory bomb": ("chunks = []\nwhile True:\n    chunks.append(' ' * 10**7)\n", "failed: MemoryError"),
    "write outside": ("open('/tmp/gemmakit-escape.txt', 'w').write('x')\n", "failed: PermissionError"),
    "delete outside": ("import shutil\nshutil.rmtree('/tmp')\n", "failed: PermissionError"),
    "socket": ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n", "failed: PermissionError"),
    "subprocess": ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", "failed: PermissionError"),
    "ctypes": ("import ctypes\nctypes.CDLL(None).fork()\n", "failed"),
    "os._exit": ("import os\nos._exit(0)\n", "failed: the program exited before its checks finished"),
    "sys.exit(0)": ("import sys\nsys.exit(0)\n", "failed: the program called exit(0)"),
    "output flood": ("while True:\n    print('x' * 10000)\n", "timed out"),
    "forged pass": ("print('passed')\nimport os\nos._exit(0)\n", "failed"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_are_contained_and_reported(name):
    program, status = ATTACKS[name]
    t0 = time.monotonic()
    outcome = run_python(program, FAST)
    assert not outcome.passed and outcome.status.startswith(status), outcome.status
    assert time.monotonic() - t0 < FAST.timeout + 5
    assert len(outcome.output) <= FAST.max_output
    assert not Path("/tmp/gemmakit-escape.txt").exists() and Path("/tmp").is_dir()
    assert run_python("assert sum(range(4)) == 6\n", FAST).passed  # the next sample is unaffected


def test_the_parent_environment_does_not_leak(monkeypatch):
    monkeypatch.setenv("GEMMAKIT_TEST_SECRET", "hunter2")
    outcome = run_python("import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())\n", FAST)
    assert outcome.passed and "hunter2" not in outcome.output and "GEMMAKIT_TEST_SECRET" not in outcome.output


def test_the_working_directory_is_private_and_removed():
    outcome = run_python("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n", FAST)
    assert outcome.passed
    box = Path(outcome.output.strip())
    assert box.name.startswith("gemmakit-sandbox-") and not box.exists()


def test_forked_children_die_with_the_box():
    """A child that outlives its parent (double fork through the C library, past the audit hook) is killed
    when the box ends: the PID namespace's init takes it along, or the process group is killed."""
    marker = Path("/tmp") / f"gemmakit-orphan-{os.getpid()}"
    program = ("import _posixsubprocess, os, sys\n"
               f"argv = [b'/bin/sh', b'-c', b'echo started; sleep 3; touch {marker}']\n"
               "try:\n"
               "    _posixsubprocess.fork_exec(argv, argv, True, (), None, None, -1, -1, -1, -1, -1, -1,"
               " *os.pipe(), False, False, -1, None, None, None, -1, None, False)\n"
               "except Exception as e:\n"
               "    print('no spawn:', type(e).__name__)\n")
    outcome = run_python(program + "import time\ntime.sleep(0.5)\n", FAST)
    if "no spawn" in outcome.output:
        pytest.skip(f"this Python's _posixsubprocess.fork_exec takes other arguments: {outcome.output}")
    assert "started" in outcome.output  # the hook was bypassed: only the box's end can stop the child
    time.sleep(4)
    assert not marker.exists()


@pytest.mark.skipif(not box_command()[0], reason="no namespaces on this machine (the guard still holds)")
def test_namespaces_isolate_network_and_processes():
    program = ("import os\n"
               "ifaces = [line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]]\n"
               "assert ifaces == ['lo'], ifaces\n"
               "assert os.getpid() < 10, os.getpid()\n"
               "print(os.getuid())\n")
    outcome = run_python(program, FAST)
    assert outcome.passed, outcome.status
    if os.geteuid() == 0:
        assert outcome.output == "65534"  # not root inside: the process limit binds
