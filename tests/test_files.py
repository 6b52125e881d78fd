"""Atomic writes (gemmakit/files.py) leave whole files with the permissions an ordinary write would give.
Run: .venv/bin/python -m pytest tests/test_files.py
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gemmakit.files import umask, write_atomic, write_text_atomic


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
