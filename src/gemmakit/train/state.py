"""Training checkpoints: what `--resume` needs to continue a run as if it had never stopped.

A checkpoint is a directory `checkpoints/step-000050/` holding
- `trainer.json`: the step, the epoch and the position in it, counters, and the run's config;
- `trainable.safetensors`: the trained parameters only (LoRA weights, or the whole model when fine-tuning it);
- `optimizer.safetensors` + the optimizer's scalars in trainer.json (AdamW moments and step counts);
- the RNG states (dropout draws), inside `trainable.safetensors` under `rng/`.
Everything is safetensors or JSON: nothing is unpickled on resume. State dicts go through
`torch.distributed.checkpoint.state_dict`, which gathers FSDP-sharded tensors into whole ones and scatters them
back, so a checkpoint does not depend on how many processes wrote it.

Durability, in the order things go wrong:
- the directory is written under a hidden name (`.step-000050.partial`), fsynced file by file, and renamed
  into place (files.swap_dir), so neither a killed run nor a power cut leaves a complete-looking checkpoint of
  empty files; `tidy` removes what a killed save left, never a finished checkpoint;
- names are six digits as they always were, but ordered by their number: step-1000000 comes after
  step-999999 (names grow a digit there; older runs read back unchanged);
- `resume` takes the newest checkpoint that reads back whole and fits the model, and names each newer one it
  skipped and why (a run killed mid-save on a file system without ordered renames, a truncated copy);
- only rank 0 writes, and its failure (a full disk) is shared with every rank before anyone moves on, so all
  stop with the same message instead of the others waiting for rank 0 at the next step.
The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gemmakit.checkpoints.common import CheckpointError
from gemmakit.files import fsync_path, publish_mode, recover, swap_dir
from gemmakit.train.distributed import shared_error

PREFIX = "step-"
_NAME = re.compile(r"^step-(\d+)$")
_PARTIAL = re.compile(r"^\.step-\d+\.partial$")
_OLD = re.compile(r"^\.(step-\d+)\.old$")


def _options(strict: bool = True) -> StateDictOptions:
    distributed = dist.is_available() and dist.is_initialized()
    return StateDictOptions(full_state_dict=distributed, cpu_offload=distributed, strict=strict)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trained parameters as whole tensors (collective under FSDP: every rank must call it)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous() for k, v in get_model_state_dict(model, options=_options()).items()
            if k in names}


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer as whole tensors (collective under FSDP)."""
    return {k: v.detach().contiguous() for k, v in get_model_state_dict(model, options=_options()).items()}


def _flat_optimizer(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict]:
    tensors, scalars = {}, {}
    for name, entries in osd["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"{PREFIX}{step:06d}"


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    info: dict[str, Any], keep: int = 2, write: bool = True) -> Path:
    """Write checkpoint `step` under root/checkpoints (every rank calls it; only `write` ranks touch disk).
    A failure to write is a `CheckpointError` on every rank, saying what to do."""
    weights = trainable_state(model)
    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    final = checkpoint_dir(root, step)
    error, cause = None, None
    if write:  # under FSDP, only rank 0 receives the gathered state
        try:
            _write(final, step, weights, osd, info)
            for old in checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as e:  # whatever it is, the other ranks must hear of it (see shared_error)
            shutil.rmtree(final.parent / f".{final.name}.partial", ignore_errors=True)  # give the space back
            error, cause = _save_error(root, final, e), e
    error = shared_error(error)
    if error is not None:
        raise CheckpointError(error) from cause
    return final


def _save_error(root: Path, final: Path, e: Exception) -> str:
    what = f"could not write checkpoint {final} ({type(e).__name__}: {e})"
    if not isinstance(e, OSError | SafetensorError):
        return f"{what}; this is a bug in gemmakit: please report it with the traceback of rank 0"
    done = checkpoints(root)
    since = f"from {done[-1].name}" if done else "from the start"
    return (f"{what}. Earlier checkpoints are intact: free space on that disk (or move --out) and run again "
            f"with --resume, which continues {since}")


def _write(final: Path, step: int, weights: dict[str, Tensor], osd: dict[str, Any], info: dict[str, Any]) -> None:
    opt_tensors, opt_info = _flat_optimizer(osd)
    weights["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        weights["rng/cuda"] = torch.cuda.get_rng_state()
    tidy(final.parent.parent)
    tmp = final.parent / f".{final.name}.partial"
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({**info, "step": step, "optimizer": opt_info}, indent=2))
    publish_mode(tmp, final)
    swap_dir(tmp, final)  # fsyncs the files, the folder and, after the rename, checkpoints/


def tidy(root: Path) -> None:
    """Clear what a run killed while saving left in root/checkpoints: unfinished `.partial` folders are
    deleted (never finished data), and a checkpoint moved aside for a re-save of its step is put back if
    nothing replaced it (files.recover). Only the writing rank calls it."""
    folder = root / "checkpoints"
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if _PARTIAL.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif m := _OLD.match(p.name):
            recover(folder / m.group(1))
    fsync_path(folder)


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first: ordered by step number, not by name."""
    folder = root / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _NAME.match(p.name)) and (p / "trainer.json").is_file()]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """(trainer.json, weights, optimizer tensors) of a checkpoint, checked to be whole and to fit `model`
    before anything is changed; a `CheckpointError` says what is wrong."""
    try:
        info = json.loads((path / "trainer.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:  # truncated, emptied, or not what the name says
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    problem = _mismatch(info, weights, opt_tensors, model)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    return info, weights, opt_tensors


def _mismatch(info: Any, weights: dict[str, Tensor], opt_tensors: dict[str, Tensor], model: nn.Module) -> str:
    opt = info.get("optimizer") if isinstance(info, dict) else None
    if not (isinstance(opt, dict) and isinstance(info.get("step"), int) and isinstance(opt.get("scalars"), dict)
            and isinstance(opt.get("param_groups"), list)):
        return "has a damaged trainer.json (no step or optimizer state)"
    if "rng/cpu" not in weights:
        return "has no RNG state"
    trained = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trained) - weights.keys())
    if missing:
        return (f"does not match this run's model: no {missing[:3]} (was it written with another --method or "
                "LoRA targets?)")
    odd = [n for n, shape in trained.items() if tuple(weights[n].shape) != shape]
    if odd:
        shape = list(weights[odd[0]].shape)
        return f"does not match this run's model: {odd[0]} is {shape}, not {list(trained[odd[0]])}"
    strays = [k for k in opt_tensors if k.rpartition("/")[0] not in trained]
    return f"has optimizer state for parameters this run does not train: {strays[:3]}" if strays else ""


def _apply(state: tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]], model: nn.Module,
           optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    info, weights, opt_tensors = state
    torch.set_rng_state(weights.pop("rng/cpu"))
    cuda_rng = weights.pop("rng/cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    set_model_state_dict(model, weights, options=_options(strict=False))
    opt_info = info.pop("optimizer")
    opt_state: dict[str, dict[str, Any]] = {}
    for key, value in [*opt_tensors.items(), *opt_info["scalars"].items()]:
        name, _, field = key.rpartition("/")
        opt_state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": opt_state, "param_groups": opt_info["param_groups"]},
                             options=_options())
    return info


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the model's trained parameters, the optimizer and the RNG; returns trainer.json."""
    return _apply(read_checkpoint(path, model), model, optimizer)


def resume(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer
           ) -> tuple[Path, dict[str, Any], list[str]] | None:
    """Restore the newest checkpoint under root that reads back whole and fits `model`: (its path, its
    trainer.json, why each newer one was skipped), or None when there is none at all. Every rank checks
    every candidate and they skip together (collective under FSDP). When none can be used this is an error,
    not a fresh start: a fresh start would write over the run's metrics."""
    found, skipped = checkpoints(root), []
    for path in reversed(found):
        try:
            state, error = read_checkpoint(path, model), None
        except CheckpointError as e:
            state, error = None, str(e)
        error = shared_error(error)
        if error is None and state is not None:
            return path, _apply(state, model, optimizer), skipped
        skipped.append(str(error))
    if not found:
        return None
    raise CheckpointError(f"none of the {len(found)} checkpoint(s) in {root / 'checkpoints'} can be resumed "
                          "from:\n  " + "\n  ".join(skipped) + "\nMove them out of the way (or pass another --out) "
                          "to start the run afresh, or resume with the settings the run was started with.")
