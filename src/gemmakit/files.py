"""Atomic writes: a file is written beside its destination and renamed into place, so a crash or a full disk
never leaves half a file where a whole one was (saved chats, adapters, exported models, the tokenizer cache).

The temporary file (or folder) comes from `tempfile`, which creates it private (0600 / 0700) so no one reads
it half-written; safetensors writes its files 0600 as well. Before the rename it gets the permissions an
ordinary `open()` or `mkdir` would have given it (the process umask applied), or those of the file it
replaces: a model exported for a serving account, or a chat saved for a colleague, stays readable by whoever
could read any other file written there. Secrets (watermark keys) ask for 0600 explicitly.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (changing it races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: Path, replaces: Path, mode: int | None = None) -> None:
    """Give a finished temporary file or folder `path` the mode it would have had if written at `replaces`
    (or `mode`, e.g. 0o600 for a secret); a folder's contents get new files' modes too (safetensors also
    writes its files 0600)."""
    if mode is not None:
        os.chmod(path, mode)
        return
    mask = umask()
    if path.is_dir():
        for inner in path.rglob("*"):
            if not inner.is_symlink():
                os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~mask)
    fresh = (0o777 if path.is_dir() else 0o666) & ~mask
    os.chmod(path, stat.S_IMODE(replaces.stat().st_mode) if replaces.exists() else fresh)


def write_atomic(path: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call `write(tmp)` on a temporary file in `path`'s folder, then rename it to `path` (with `mode` if
    given, else the mode `publish_mode` picks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        publish_mode(Path(tmp), path, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode)
