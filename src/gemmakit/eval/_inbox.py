"""The sandbox's side inside the box (see sandbox.py), run as `python -I -S -B /src/_inbox.py ROLE LIMITS ...`
once the namespaces exist. It uses the standard library only (it runs on the system Python, the project's
virtual environment is not in the box) and must keep working on Python 3.8.

It first confines its own process, then plays one role:

- **program**: runs /src/program.py as `__main__`; the exit status is the program's own word.
- **candidate**: runs /src/program.py as `__main__`, then answers calls to its functions, one line per call on a
  pair of pipes: the request is `repr((name, args, kwargs))`, the answer `repr(("ok", value))` or
  `repr(("error", "Type: message"))`.
- **harness**: runs the problem's own code (/src/setup.py, then /src/test.py) with the entry point bound to a
  proxy that asks the candidate, which runs in another box. Answers are rebuilt with `ast.literal_eval`, so
  only plain data (numbers, strings, bytes, tuples, lists, dicts, sets, None) crosses: no object of the
  candidate's making (an `__eq__` that always says yes) reaches the test. Exit status 0 means the test ran
  to its end, and no candidate code ever ran in this process, so it cannot have been forged.
- **probe**: says whether the seccomp filter could be installed.

Confinement here is defense in depth; the boundary is the namespaces around the process:

- **seccomp** (through libseccomp with ctypes, where the library exists): syscalls that reach other
  processes, the kernel or new namespaces fail with EPERM (ptrace, process_vm_*, pidfd_getfd, mount,
  unshare, setns, bpf, io_uring, keyctl, module loading, ...), `clone` with a namespace flag too, `clone3`
  says ENOSYS (its flags cannot be inspected, and the C library falls back to `clone`), and `socket` works
  for AF_UNIX only. Syscalls of another architecture kill the process (libseccomp's default).
- **rlimits**: CPU seconds, address space, file size, open files, processes, no core dumps.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import os
import resource
import runpy
import socket
import sys
import traceback

ALLOW, KILL = 0x7FFF0000, 0x00000000
DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "mount", "umount2", "pivot_root",
          "chroot", "unshare", "setns", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick",
          "mount_setattr", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
          "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at",
          "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "syslog", "acct",
          "swapon", "swapoff", "reboot", "quotactl", "iopl", "ioperm", "personality", "lookup_dcookie",
          "fanotify_init", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "vhangup")
NEW_NAMESPACE = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
NE, MASKED_EQ = 1, 7  # libseccomp's enum scmp_compare
MAX_ANSWER = 4 << 20  # bytes in one answer line: more is a failure, not a memory bomb in the harness
SRC = os.path.dirname(os.path.abspath(__file__))  # /src in a box
GONE = 3  # the harness's exit status when the candidate ended or broke the protocol


class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def _errno(code: int) -> int:
    return 0x00050000 | code


def install_seccomp() -> bool:
    """Load the filter described above; False (and nothing loaded) where libseccomp is missing."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_Cmp)]
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        return False

    def rule(action: int, name: str, *cmps: _Cmp) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # unknown on this architecture: nothing to deny
            lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), (_Cmp * len(cmps))(*cmps) if cmps else None)

    for name in DENIED:
        rule(_errno(errno.EPERM), name)
    for flag in NEW_NAMESPACE:
        rule(_errno(errno.EPERM), "clone", _Cmp(0, MASKED_EQ, flag, flag))
    rule(_errno(errno.ENOSYS), "clone3")
    rule(_errno(errno.EPERM), "socket", _Cmp(0, NE, socket.AF_UNIX, 0))
    ok = lib.seccomp_load(ctx) == 0
    lib.seccomp_release(ctx)
    return ok


def set_limits(cpu: int, memory: int, file_size: int, processes: int) -> None:
    # The CPU limit's hard value is a second above its soft one: at the soft limit the kernel sends SIGXCPU,
    # which ends the program and names the limit in its status; at the hard one, SIGKILL (for a program that
    # ignores SIGXCPU). Equal, the kernel sends SIGKILL alone and the status would not say why.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, file_size),
                        (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, processes)):
        resource.setrlimit(kind, (value, value))


def serve(namespace: dict, requests: int, answers: int) -> None:
    """The candidate's loop: answer each call until the harness closes its end."""
    with open(requests, encoding="utf-8") as rq, open(answers, "w", encoding="utf-8") as out:
        for line in rq:
            name, args, kwargs = ast.literal_eval(line)
            try:
                answer = ("ok", namespace[name](*args, **kwargs))
            except Exception as e:  # the test decides what an error means
                answer = ("error", f"{type(e).__name__}: {e}")
            out.write(repr(answer) + "\n")
            out.flush()


class CandidateError(Exception):
    """The candidate raised (the test sees it like any exception) or answered with something unreadable."""


class CandidateGone(BaseException):
    """The candidate's process ended or its pipe closed: no test can pass after that."""


def proxy(name: str, rq, ans):
    def call(*args, **kwargs):
        request = repr((name, args, kwargs))
        try:
            ast.literal_eval(request)
        except (ValueError, SyntaxError, RecursionError):
            raise TypeError("the test passed arguments that are not plain data") from None
        try:
            rq.write(request + "\n")
            rq.flush()
        except (BrokenPipeError, OSError):
            raise CandidateGone from None
        line = ans.readline(MAX_ANSWER)
        if not line.endswith("\n"):
            raise CandidateGone
        try:
            kind, value = ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            raise CandidateError("the candidate answered with something that is not plain data") from None
        if kind == "error" and isinstance(value, str):
            raise CandidateError(value)
        if kind != "ok":
            raise CandidateError("the candidate broke the call protocol")
        return value

    call.__name__ = name
    return call


def _compile_setup(source: str):
    """The problem's prompt ends in the entry point's docstring, a complete function; one that stops at the
    signature gets a `pass` body so that its helpers can still be defined."""
    try:
        return compile(source, "setup.py", "exec")
    except SyntaxError:
        return compile(source.rstrip("\n") + "\n    pass\n", "setup.py", "exec")


def _read(name: str) -> str:
    with open(os.path.join(SRC, name), encoding="utf-8") as f:
        return f.read()


def harness(entry_point: str, requests: int, answers: int) -> int:
    """Run the problem's own code against the candidate; the exit status is the verdict."""
    try:
        with open(requests, "w", encoding="utf-8") as rq, open(answers, encoding="utf-8") as ans:
            return _run_test(entry_point, rq, ans)
    except BrokenPipeError:  # closing flushed a request to a candidate that is gone
        return GONE


def _run_test(entry_point: str, rq, ans) -> int:
    namespace: dict = {"__name__": "__problem__"}
    try:
        exec(_compile_setup(_read("setup.py")), namespace)
        exec(compile(_read("test.py"), "test.py", "exec"), namespace)
        namespace[entry_point] = proxy(entry_point, rq, ans)
        namespace["check"](namespace[entry_point])
    except CandidateGone:
        print("the candidate ended before the test did", flush=True)
        return GONE
    except BaseException:
        traceback.print_exc(limit=-2)
        return 1
    return 0


def main(argv: list) -> int:
    role, limits = argv[1], [int(x) for x in argv[2].split(",")]
    seccomp = install_seccomp()
    set_limits(*limits)
    if role == "probe":
        print(f"seccomp={'on' if seccomp else 'off'}")
        return 0
    if role == "harness":
        return harness(argv[3], int(argv[4]), int(argv[5]))
    sys.argv = ["program.py"]
    sys.path.insert(0, SRC)
    namespace = runpy.run_path(os.path.join(SRC, "program.py"), run_name="__main__")
    if role == "candidate":
        serve(namespace, int(argv[3]), int(argv[4]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
