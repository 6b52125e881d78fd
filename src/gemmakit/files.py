"""Atomic, durable writes: a file is written beside its destination and renamed into place, so a crash or a
full disk never leaves half a file where a whole one was (saved chats, adapters, exported models, the
tokenizer cache, training checkpoints).

A rename alone is atomic only against crashes of the process: after a power cut, the file system may have
persisted the rename but not the data, leaving a complete-looking file of zeros or of length 0. So the new
data is `fsync`ed before the rename, and the folder holding the name after it (`fsync_tree`, `fsync_path`).
`swap_dir` replaces a whole folder (a fine-tuned adapter or model) and recovers from a swap cut short.
`cache_dir` says where gemmakit's caches live (what it writes for itself rather than for the user).

The temporary file (or folder) comes from `tempfile`, which creates it private (0600 / 0700) so no one reads
it half-written; safetensors writes its files 0600 as well. Before the rename it gets the permissions an
ordinary `open()` or `mkdir` would have given it (the process umask applied), or those of the file it
replaces: a model exported for a serving account, or a chat saved for a colleague, stays readable by whoever
could read any other file written there. Secrets (watermark keys) ask for 0600 explicitly.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """Where gemmakit keeps one kind of cache ("tokenizers", "inductor", "kernels", "test-reference"): under
    GEMMAKIT_CACHE_DIR where it is set, else $XDG_CACHE_HOME/gemmakit, else ~/.cache/gemmakit. One rule for
    every cache, so setting the variable (to measure a cold start, or to keep caches off a small home) moves
    them all. Not created here: each writer makes its own folder when it first writes."""
    root = os.environ.get("GEMMAKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "gemmakit"
    return Path(root).expanduser() / kind


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


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """`fsync_path` every file and folder under `path`, deepest first, then `path` itself."""
    if path.is_dir():
        for inner in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if not inner.is_symlink():
                fsync_path(inner)
    fsync_path(path)


def write_atomic(path: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call `write(tmp)` on a temporary file in `path`'s folder, then rename it to `path` (with `mode` if
    given, else the mode `publish_mode` picks), durably (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        publish_mode(Path(tmp), path, mode)
        fsync_tree(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def leftover(final: Path) -> Path:
    """Where `swap_dir` keeps the folder it replaces until the new one is in place."""
    return final.with_name(f".{final.name}.old")


def recover(final: Path) -> None:
    """Undo what a `swap_dir` cut short left: its copy of the replaced folder is put back when nothing took
    its place (the user's only copy), and deleted when the new folder did arrive."""
    old = leftover(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)


def swap_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final`, durably. An existing `final` is moved aside and deleted
    only once `tmp` has taken its name, so at every instant one of them is whole on disk."""
    recover(final)
    fsync_tree(tmp)
    if final.exists():
        final.rename(leftover(final))
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(leftover(final), ignore_errors=True)


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode)
