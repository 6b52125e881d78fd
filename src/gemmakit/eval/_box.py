"""How a box is made (see sandbox.py for what it must hold): the command line that starts one process in fresh
namespaces, for each way this machine offers, and the probe that picks one.

- **bwrap** (bubblewrap, when on PATH): the well-kept tool, preferred. `--unshare-all` (user, mount, PID,
  network, IPC, UTS and cgroup namespaces), `--die-with-parent`, `--new-session`, every capability dropped.
- **unshare** (util-linux, on nearly every Linux): the same namespaces made by `unshare`, and the file system
  built by the short shell script SETUP below, because `unshare` alone cannot build a new root. Before it runs
  the program it drops every capability and sets no_new_privs with `setpriv`, so root inside the user
  namespace cannot unmount what hides the host.
- **unshare-as-root**, the fallback of `unshare` for root where unprivileged user namespaces are off: root
  makes the namespaces without a user namespace and the script becomes `nobody` before the program runs.
- **unsafe-none**, only when asked for by name: no namespaces at all, rlimits and seccomp only. Anything the
  user running gemmakit can read, the program can read; it is for machines without user namespaces whose
  owners accept that.

Both real backends build the same file system from nothing (an allowlist, so a secret we did not think of is
hidden too): the system directories (/usr, /bin, /lib*, /sbin) read-only, /etc/ld.so.cache, the device nodes
null, zero, full, random and urandom, a fresh /proc for the new PID namespace, the run's files read-only at
/src, and a size-limited tmpfs at /box, the working directory and the only writable place (/tmp points to it).
The root is read-only. Home directories, the project, /etc, /sys, /run, /dev/shm and every other process are
not there. When gemmakit runs as root the box is entered as `nobody` (setpriv, before the namespaces), so the
program is an unprivileged user outside as well; where unprivileged user namespaces are off, root makes the
namespaces itself and becomes `nobody` inside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ENV = "GEMMAKIT_SANDBOX"
MODES = ("auto", "bwrap", "unshare", "unshare-as-root", "unsafe-none")
NOBODY = 65534
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
BECOME_NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups")
INBOX = Path(__file__).with_name("_inbox.py")

# Runs as root of the new user (or, for root, the real) namespaces, in the new mount namespace, before the
# program. $1: the run's directory (src/ holds its files, root/ is an empty mount point), $2: the size of /box
# in bytes, $3: a Python prefix outside /usr to show read-only ("" for none), $4: setpriv's user switch ("" to
# stay), then the command. Each mount is private to the namespace and vanishes with it.
# The program is not the PID namespace's init: the kernel drops signals that init has no handler for (a
# program's own abort() or SIGTERM would not end it). The script execs, without privileges, a second shell
# that stays as init and runs the program as its child, as bwrap does; `exit $?` keeps that shell from
# exec'ing the program in its place. A program killed by a signal ends it with 128 + the signal's number,
# which unshare passes on as its exit status (util-linux's unshare re-raising a child's signal on itself
# failed for SIGXCPU). When the program ends, init ends and the kernel kills whatever the program left.
SETUP = r"""
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
W=$1 SIZE=$2 PY=$3 BECOME=$4
shift 4
R=$W/root
mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev gemmakit-root "$R"
for d in usr bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"
    elif [ -d "/$d" ]; then mkdir "$R/$d"; mount --bind -o ro,nosuid,nodev "/$d" "$R/$d"; fi
done
if [ -n "$PY" ]; then mkdir -p "$R$PY"; mount --bind -o ro,nosuid,nodev "$PY" "$R$PY"; fi
mkdir "$R/etc" "$R/dev" "$R/proc" "$R/src" "$R/box" "$R/.old"
cp /etc/ld.so.cache "$R/etc/" 2>/dev/null || true
for n in null zero full random urandom; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
ln -s /proc/self/fd "$R/dev/fd"
ln -s box "$R/tmp"
mount --bind -o ro,nosuid,nodev "$W/src" "$R/src"
mount -t tmpfs -o "mode=1777,size=$SIZE,nosuid,nodev" gemmakit-box "$R/box"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -o remount,bind,ro,nosuid,nodev "$R"
cd "$R"
pivot_root . .old
umount -l /.old
cd /box
exec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all $BECOME -- /bin/sh -c '"$@"; exit $?' init "$@"
"""


class SandboxUnavailable(RuntimeError):
    """No operating-system isolation can be had here, and the user did not opt out of it."""


@dataclass(frozen=True)
class Backend:
    name: str  # "bwrap", "unshare", "unshare-as-root" or "unsafe-none"
    python: str  # the interpreter run in the box
    python_prefix: str  # its installation, shown read-only in the box ("" when it lives under /usr)
    seccomp: bool = False  # whether the probe could install the filter

    def command(self, work: Path, disk_bytes: int, args: list[str]) -> list[str]:
        """The command line that runs `python _inbox.py *args` in a new box made of `work` (see prepare)."""
        inbox = str(work / "src" / "_inbox.py") if self.name == "unsafe-none" else "/src/_inbox.py"
        inner = [self.python, "-I", "-S", "-B", inbox, *args]
        become = ["setpriv", *BECOME_NOBODY, "--"] if os.geteuid() == 0 else []
        if self.name == "bwrap":
            return [*become, "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                    *_bwrap_system(self.python_prefix), "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc",
                    "--ro-bind", str(work / "src"), "/src", "--size", str(disk_bytes), "--perms", "1777",
                    "--tmpfs", "/box", "--symlink", "box", "/tmp", "--chdir", "/box", "--remount-ro", "/",
                    *inner]
        if self.name in ("unshare", "unshare-as-root"):
            as_root = self.name == "unshare-as-root"
            user = [] if as_root else ["--user", "--map-root-user"]
            setup = [str(work), str(disk_bytes), self.python_prefix, " ".join(BECOME_NOBODY) if as_root else ""]
            return [*([] if as_root else become), "unshare", *user, "--mount", "--pid", "--net", "--ipc", "--uts",
                    "--fork", "--kill-child", "--", "/bin/sh", "-c", SETUP, "gemmakit-box", *setup, *inner]
        return inner

    def preexec(self) -> None:
        """Runs in the child before exec: without namespaces, root still becomes nobody."""
        if self.name == "unsafe-none" and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)


def _bwrap_system(python_prefix: str) -> list[str]:
    out: list[str] = []
    for d in SYSTEM_DIRS:
        path = Path("/", d)
        if path.is_symlink():
            out += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            out += ["--ro-bind", str(path), str(path)]
    if python_prefix:
        out += ["--ro-bind", python_prefix, python_prefix]
    return out + ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]


def prepare(work: Path, files: dict[str, str]) -> None:
    """Lay out a run's directory: src/ (the files and _inbox.py, read-only in the box), root/ (the mount point
    of the new root) and box/ (the working directory, for unsafe-none only). Readable by nobody."""
    for name in ("src", "root", "box"):
        (work / name).mkdir()
    for name, text in files.items():
        (work / "src" / name).write_text(text, encoding="utf-8")
    shutil.copy(INBOX, work / "src" / "_inbox.py")
    work.chmod(0o711)
    (work / "src").chmod(0o755)
    for f in (work / "src").iterdir():
        f.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(work / "box", NOBODY, NOBODY)


def _python() -> tuple[str, str]:
    """(interpreter, prefix to show): the system Python 3 when there is one, for it needs nothing outside
    /usr; else this interpreter, with its installation made visible read-only."""
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3", ""
    real = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return real, "" if prefix.startswith("/usr/") else prefix


def _candidates(mode: str) -> list[str]:
    names = []
    if mode in ("auto", "bwrap") and shutil.which("bwrap"):
        names.append("bwrap")
    if mode in ("auto", "unshare") and shutil.which("unshare") and shutil.which("setpriv"):
        names.append("unshare")
    if mode in ("auto", "unshare", "unshare-as-root") and os.geteuid() == 0 and shutil.which("unshare"):
        names.append("unshare-as-root")
    return names


def _probe(backend: Backend) -> tuple[bool, str]:
    """Run the probe role in a box made by `backend`: (it worked, what it said)."""
    work = Path(tempfile.mkdtemp(prefix="gemmakit-probe-"))
    try:
        prepare(work, {})
        cmd = backend.command(work, 1 << 20, ["probe", f"10,{1 << 30},{1 << 20},32"])
        try:
            run = subprocess.run(cmd, capture_output=True, timeout=30, cwd=work / "box",
                                 env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, preexec_fn=backend.preexec)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        said = (run.stdout + run.stderr).decode("utf-8", "replace").strip()
        return run.returncode == 0 and said.startswith("seccomp="), said
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unavailable_message(mode: str, tried: dict[str, str]) -> str:
    why = "; ".join(f"{name}: {said[-300:] or 'failed'}" for name, said in tried.items()) or "neither found"
    return (f"No sandbox for model-written code can be made here (mode {mode!r}; {why}). It needs bubblewrap "
            "(`bwrap`) or util-linux `unshare` with user namespaces: install bubblewrap, or enable "
            "unprivileged user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, "
            "or the container's seccomp/AppArmor profile), and a Python 3 the sandbox user can run (/usr/bin/python3, "
            "or one installed outside home directories). To run the code anyway with rlimits and seccomp "
            f"only, able to read whatever you can read, set {ENV}=unsafe-none (or `gemmakit eval --sandbox "
            "unsafe-none`).")


@cache
def select(mode: str) -> Backend:
    """The first backend `mode` allows that passes the probe on this machine; tried once per mode."""
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {MODES}, got {mode!r}")
    python, prefix = _python()
    if mode == "unsafe-none":
        backend = Backend("unsafe-none", python, prefix)
        ok, said = _probe(backend)
        warnings.warn(f"{ENV}=unsafe-none: model-written code runs WITHOUT operating-system isolation; it can "
                      "read every file this user can and reach the network.", RuntimeWarning, stacklevel=3)
        print(f"gemmakit: WARNING: sandbox disabled ({ENV}=unsafe-none)", file=sys.stderr)
        return Backend("unsafe-none", python, prefix, seccomp=ok and "seccomp=on" in said)
    tried = {}
    for name in _candidates(mode):
        ok, said = _probe(Backend(name, python, prefix))
        if ok:
            return Backend(name, python, prefix, seccomp="seccomp=on" in said)
        tried[name] = said
    raise SandboxUnavailable(unavailable_message(mode, tried))


def current() -> Backend:
    """The backend $GEMMAKIT_SANDBOX asks for (auto when unset)."""
    return select(os.environ.get(ENV, "auto") or "auto")
