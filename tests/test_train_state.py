"""Training checkpoints (gemmakit/train/state.py) stay usable through what goes wrong while saving: step
numbers past six digits, truncated or emptied checkpoints, leftovers of a run killed mid-save.
Run: .venv/bin/python -m pytest tests/test_train_state.py
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.checkpoints import CheckpointError
from gemmakit.train.state import checkpoints, resume, save_checkpoint, tidy


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(root, step: int, keep: int = 10) -> dict[str, torch.Tensor]:
    model, optimizer = _trained(step)
    save_checkpoint(root, step, model, optimizer, {"note": step}, keep=keep)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoints_are_ordered_by_step_past_six_digits(tmp_path):
    """step-1000000 is newer than step-999999 (a name sort put it first, and pruning deleted the newest)."""
    for step in (50, 999_999, 1_000_000):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-999999", "step-1000000"]
    model, optimizer = _trained(7)
    path, info, skipped = resume(tmp_path, model, optimizer)
    assert path.name == "step-1000000" and info["step"] == 1_000_000 and not skipped


def test_resume_falls_back_to_the_newest_checkpoint_that_reads_back(tmp_path):
    """A truncated newest checkpoint and an emptied one (a power cut before fsync) are skipped and named."""
    want = _save(tmp_path, 3)
    _save(tmp_path, 6)
    _save(tmp_path, 9)
    cut = tmp_path / "checkpoints" / "step-000009" / "trainable.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    (tmp_path / "checkpoints" / "step-000006" / "optimizer.safetensors").write_bytes(b"")
    model, optimizer = _trained(42)
    path, info, skipped = resume(tmp_path, model, optimizer)
    assert path.name == "step-000003" and info["step"] == 3
    assert len(skipped) == 2 and "step-000009" in skipped[0] and "step-000006" in skipped[1]
    assert all("unreadable" in why for why in skipped)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k])


def test_no_usable_checkpoint_is_an_error_that_says_what_to_do(tmp_path):
    """Checkpoints of another model are not silently replaced by a fresh start."""
    _save(tmp_path, 3)
    other = torch.nn.Linear(4, 8)
    with pytest.raises(CheckpointError, match=r"(?s)none of the 1 checkpoint.*step-000003 does not match.*"
                                              r"weight is \[4, 4\], not \[8, 4\].*another --out"):
        resume(tmp_path, other, torch.optim.AdamW(other.parameters()))
    assert resume(tmp_path / "fresh", other, torch.optim.AdamW(other.parameters())) is None


def test_leftovers_of_a_killed_save_are_cleared_without_losing_a_checkpoint(tmp_path):
    """An unfinished .partial folder is deleted; a checkpoint moved aside for a re-save of its step, with
    nothing in its place, is put back; a stale copy next to its replacement is deleted."""
    _save(tmp_path, 3)
    _save(tmp_path, 6)
    folder = tmp_path / "checkpoints"
    (folder / ".step-000009.partial").mkdir()
    (folder / ".step-000009.partial" / "trainable.safetensors").write_bytes(b"half")
    (folder / "step-000006").rename(folder / ".step-000006.old")
    (folder / ".step-000003.old").mkdir()
    tidy(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003", "step-000006"]
    _save(tmp_path, 6)  # saving a step again swaps it in
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000003", "step-000006"]
