"""Training checkpoints: what `--resume` needs to continue a run as if it had never stopped.

A checkpoint is a directory `checkpoints/step-000050/` holding
- `trainer.json`: the step, the epoch and the position in it, counters, and the run's config;
- `trainable.safetensors`: the trained parameters only (LoRA weights, or the whole model when fine-tuning it);
- `optimizer.safetensors` + the optimizer's scalars in trainer.json (AdamW moments and step counts);
- the RNG states (dropout draws), inside `trainable.safetensors` under `rng/`.
Everything is safetensors or JSON: nothing is unpickled on resume. State dicts go through
`torch.distributed.checkpoint.state_dict`, which gathers FSDP-sharded tensors into whole ones and scatters them
back, so a checkpoint does not depend on how many processes wrote it.

The directory is written under a hidden temporary name and renamed into place: a run killed while saving
leaves the previous checkpoint as the latest. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gemmakit.files import publish_mode

PREFIX = "step-"


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


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    info: dict[str, Any], keep: int = 2, write: bool = True) -> Path:
    """Write checkpoint `step` under root/checkpoints (every rank calls it; only `write` ranks touch disk)."""
    weights = trainable_state(model)
    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    final = root / "checkpoints" / f"{PREFIX}{step:06d}"
    if not write:  # under FSDP, only rank 0 receives the gathered state
        return final
    opt_tensors, opt_info = _flat_optimizer(osd)
    weights["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        weights["rng/cuda"] = torch.cuda.get_rng_state()
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({**info, "step": step, "optimizer": opt_info}, indent=2))
    publish_mode(tmp, final)
    shutil.rmtree(final, ignore_errors=True)  # a step saved again after an interrupted resume
    os.replace(tmp, final)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = root / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "trainer.json").is_file())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the model's trained parameters, the optimizer and the RNG; returns trainer.json."""
    try:
        info = json.loads((path / "trainer.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is unreadable ({e}); delete it to resume from the one before") from e
    torch.set_rng_state(weights.pop("rng/cpu"))
    cuda_rng = weights.pop("rng/cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - weights.keys()
    if missing:
        raise ValueError(f"checkpoint {path} does not match this run's model: no {sorted(missing)[:3]} "
                         "(was it written with another --method or LoRA targets?)")
    set_model_state_dict(model, weights, options=_options(strict=False))
    opt_info = info.pop("optimizer")
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*opt_tensors.items(), *opt_info["scalars"].items()]:
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": opt_info["param_groups"]},
                             options=_options())
    return info
