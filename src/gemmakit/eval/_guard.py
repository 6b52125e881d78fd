"""The sandbox's in-process guard (see sandbox.py): read the nonce, install an audit hook, run the program,
print the nonce only if the program returned. Standard library only: it runs under `python -I`."""

import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.system", "os.fork",
            "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "subprocess.Popen", "os.kill", "os.killpg",
            "gc.get_referrers", "gc.get_objects", "gc.get_referents", "sys.settrace", "sys.setprofile"}
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}


def _main() -> None:
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    os.close(0)
    program = sys.argv[1]
    home = os.path.realpath(os.getcwd())

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an already-open descriptor
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == home or real.startswith(home + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None:
            mode, flags = args[1] or "", args[2] or 0
            if (any(c in str(mode) for c in "wax+") or flags & _WRITE_FLAGS) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]} is not allowed")
        elif event in _PATH_EVENTS and not inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.argv = [program]
    sys.addaudithook(hook)
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as e:
        print(f"the program called exit({e.code})", flush=True)
        raise SystemExit(1) from None
    sys.stdout.flush()
    print(f"\n{nonce}", flush=True)


_main()
