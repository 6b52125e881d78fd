"""Atomic writes (gemmakit/files.py) leave whole files with the permissions an ordinary write would give.
Run: .venv/bin/python -m pytest tests/test_files.py
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gemmakit.files import cache_dir, umask, write_atomic, write_text_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def with_umask():
    """`os.umask` to set the test's umask; the process's own is restored after the test."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, with_umask, mask):
    """tempfile creates 0600 files; the published file follows the umask like any other (0644 under 022)."""
    with_umask(mask)
    assert umask() == mask
    write_text_atomic(tmp_path / "chat.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    assert mode(tmp_path / "chat.json") == mode(tmp_path / "plain.json") == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "plain.json"]  # no temporary left


def test_a_replaced_file_keeps_its_mode_and_a_failed_write_keeps_the_old_file(tmp_path, with_umask):
    with_umask(0o022)
    target = tmp_path / "thresholds.json"
    target.write_text("old")
    target.chmod(0o640)
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o640

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["thresholds.json"]


def test_an_exported_model_directory_is_as_readable_as_a_made_one(tmp_path, with_umask):
    """export_hf builds the directory in a private temporary folder (0700); the published one is 0755 under
    umask 022, so another account (a server, a container) can read the model."""
    from gemmakit.checkpoints import load_model
    from gemmakit.checkpoints.export import export_hf
    from tests.helpers import hf_model, tiny

    with_umask(0o022)
    hf_model(tiny("gemma3")).save_pretrained(tmp_path / "base")
    export_hf(load_model(tmp_path / "base"), tmp_path / "out")
    assert mode(tmp_path / "out") == 0o755
    assert {mode(p) for p in (tmp_path / "out").iterdir()} == {0o644}


def test_a_training_checkpoint_is_published_with_ordinary_modes(tmp_path, with_umask):
    import torch

    from gemmakit.train.state import save_checkpoint

    with_umask(0o022)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    final = save_checkpoint(tmp_path, 3, model, optimizer, {"note": "test"})
    assert mode(final) == 0o755 and {mode(p) for p in final.iterdir()} == {0o644}
    assert {p.name for p in final.iterdir()} == {"trainable.safetensors", "optimizer.safetensors", "trainer.json"}


TRACED = """
import sys, torch
from pathlib import Path
from gemmakit.files import write_text_atomic
from gemmakit.train.state import save_checkpoint
root = Path(sys.argv[1])
write_text_atomic(root / "chat.json", "{}")
model = torch.nn.Linear(4, 4)
save_checkpoint(root, 3, model, torch.optim.AdamW(model.parameters()), {})
"""


def _syscalls(tmp_path: Path) -> list[tuple[str, str]]:
    """(call, its path arguments) for each fsync and rename a real process made while saving (strace -y
    names the file behind each descriptor)."""
    import re
    import shutil
    import subprocess
    import sys

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    log = tmp_path / "strace.log"
    root = tmp_path / "out"
    root.mkdir()
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2", "-o",
                    str(log), sys.executable, "-c", TRACED, str(root)], check=True, capture_output=True)
    calls = []
    for line in log.read_text().splitlines():
        m = re.search(r"(fsync|fdatasync|rename\w*)\((.*)\) += 0", line)
        if m and str(root) in m.group(2):
            calls.append((m.group(1), m.group(2)))
    return calls


def test_saved_files_and_checkpoints_are_fsynced_before_and_after_their_rename(tmp_path):
    """A rename that reaches the disk before the data leaves, after a power cut, a complete-looking file of
    zeros: the data is fsynced before the rename, and the folder (the new name) after it."""
    calls = _syscalls(tmp_path)
    root = tmp_path / "out"

    def first(call: str, *parts: str) -> int:
        return next(i for i, (c, args) in enumerate(calls) if c.startswith(call) and all(p in args for p in parts))

    chat = first("rename", f'{root}/chat.json"')
    assert first("fsync", ".chat.json.", ".tmp>") < chat < first("fsync", f"<{root}>")
    swap = first("rename", '.step-000003.partial"', '/step-000003"')
    for name in ("trainable.safetensors", "optimizer.safetensors", "trainer.json"):
        assert first("fsync", f".step-000003.partial/{name}>") < swap
    assert first("fsync", ".step-000003.partial>") < swap < first("fsync", f"<{root}/checkpoints>")


def test_a_folder_swap_cut_short_is_recovered(tmp_path):
    """swap_dir keeps the replaced folder as .NAME.old until the new one is in: a leftover .old next to the
    folder is stale and deleted (it used to block every later swap); one alone is the user's copy, put back."""
    from gemmakit.files import leftover, recover, swap_dir

    final = tmp_path / "adapter"
    final.mkdir()
    (final / "v").write_text("1")
    leftover(final).mkdir()
    (leftover(final) / "v").write_text("0")
    new = tmp_path / ".adapter.partial"
    new.mkdir()
    (new / "v").write_text("2")
    swap_dir(new, final)
    assert (final / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    final.rename(leftover(final))  # killed between the two renames of a swap
    recover(final)
    assert (final / "v").read_text() == "2" and not leftover(final).exists()


def test_every_cache_follows_one_rule(tmp_path, monkeypatch):
    """GEMMAKIT_CACHE_DIR, else $XDG_CACHE_HOME/gemmakit, else ~/.cache/gemmakit; inductor's kernels (a folder
    per ISA) are kept under the same root as the rest."""
    from gemmakit.runtime.compiled import inductor_cache_dir

    monkeypatch.delenv("GEMMAKIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("kernels") == tmp_path / "home" / ".cache" / "gemmakit" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("tokenizers") == tmp_path / "xdg" / "gemmakit" / "tokenizers"
    monkeypatch.setenv("GEMMAKIT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir("test-reference") == tmp_path / "mine" / "test-reference"
    assert Path(inductor_cache_dir()).parent == (tmp_path / "mine" / "inductor").resolve()


def test_the_c_kernels_are_built_into_the_same_cache(tmp_path, monkeypatch):
    """gemmakit's C++ kernels follow the rule too (they used to follow XDG_CACHE_HOME only, so
    GEMMAKIT_CACHE_DIR left them behind). torch's builder is stood in for: only where it is told to build."""
    import torch.utils.cpp_extension

    from gemmakit.runtime import gemv

    asked = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: asked.append(Path(kw["build_directory"])))
    monkeypatch.setattr(gemv, "_registered", True)  # no ops are built here to register
    monkeypatch.setenv("GEMMAKIT_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gemv._build()
    assert len(asked) == 1 and asked[0].parent == tmp_path / "mine" / "kernels" and asked[0].is_dir()
