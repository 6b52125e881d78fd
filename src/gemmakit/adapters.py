"""LoRA adapters served per request: several adapters beside one base model, chosen row by row.

Why un-merged. Merging an adapter (train/lora.merge_lora) costs nothing per token but gives a model that is
that adapter only; serving several fine-tunes of one base that way takes a model copy each and one batch per
adapter. Here the base weights stay as loaded, in whatever layout the runtime gave them (oneDNN-packed,
int8 / int4, bf16 upcast: runtime/packing.py, quantize.py), and each targeted linear is wrapped in a
`RowLoRA` that adds, for batch row i, scale_a * (x A_a^T) B_a^T of the adapter a that row asked for (nothing
for -1, the base). One decode step serves rows on different adapters and rows on none together; the adapters
cost their own small weights and, per step, a rank-r product per adapter present.

How rows find their adapter. `attach_adapters` reads each PEFT directory with the training code's reader
(train/lora.read_adapter: same files, same key names), checks every tensor against the module it adapts, and
only then wraps anything (a bad adapter leaves the model untouched). Adapters may differ in rank, alpha and
targets: a module keeps the adapters that target it, by index. The runtime calls `set_rows(model, ids)`
before every forward pass (runtime/steps.py): the rows are grouped by adapter once there, not in every one of
the hundreds of wrapped linears, which then take either one product for a batch on a single adapter (a
prefill, or every row alike) or one gathered product per adapter present, added back to its rows. Grouping
rather than gathering stacked per-row A/B keeps each product at the adapter's own rank and reads each adapter
once per step. Modules are wrapped in place, so attaching after an engine is built works as well as before
(before is better: the engine's memory forecast then counts the adapters).

Compiled decode steps are not used with adapters: the compiled full-batch step runs padded rows the ids do
not describe, and the grouping changes from step to step, which a graph would recompile for. The server and
`gemmakit serve` turn compile off (saying so) when adapters are attached; a RowLoRA handed a batch that does
not match its ids refuses it rather than guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.runtime.plan import model_dtype_device
from gemmakit.train.lora import read_adapter

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters attached to `model`, in index order (none: an empty list)."""
    return list(getattr(model, "adapter_names", ()))


@dataclass(frozen=True)
class Rows:
    """One forward pass's rows by adapter, worked out once for every RowLoRA: `uniform` is the adapter of every
    row when they share one (-1: the base), else None and `groups` maps each adapter present to its rows."""

    count: int
    uniform: int | None
    groups: dict[int, Tensor]


def set_rows(model: nn.Module, ids: Tensor | None) -> None:
    """Every per-row LoRA module of `model` applies adapter ids[i] to batch row i of the next forward pass."""
    rows = None if ids is None else _group(ids)
    for m in getattr(model, "row_adapters", ()):
        m.row_ids, m.rows = ids, rows


def _group(ids: Tensor) -> Rows:
    values = ids.tolist()
    present = sorted(set(values))
    if len(present) == 1:
        return Rows(len(values), present[0], {})
    groups = {a: torch.tensor([i for i, v in enumerate(values) if v == a], device=ids.device)
              for a in present if a >= 0}
    return Rows(len(values), None, groups)


class _Pair(nn.Module):
    """One adapter's weights at one linear: A [r, in], B [out, r] with the scale alpha / r folded in."""

    def __init__(self, a: Tensor, b: Tensor, scale: float):
        super().__init__()
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b * scale)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


def _lora(pair: _Pair, x: Tensor, dtype: torch.dtype) -> Tensor:
    """(x A^T) (scale B)^T, in `dtype` (called directly rather than as a module: hundreds of calls a step)."""
    out = F.linear(F.linear(x, pair.lora_A), pair.lora_B)
    return out if out.dtype == dtype else out.to(dtype)


class RowLoRA(nn.Module):
    """`base_layer` (any linear: nn.Linear, PackedLinear, Int8Linear, ...) plus, row by row, the LoRA of the
    adapter that row asked for (`set_rows`). `adapters` holds the adapters that target this module, keyed by
    their index in the model's `adapter_names`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()  # registered (moves with the model); `_pairs` is the same, by int index
        self._pairs: dict[int, _Pair] = {}
        self.row_ids: Tensor | None = None
        self.rows: Rows | None = None

    def add(self, index: int, a: Tensor, b: Tensor, scale: float) -> None:
        self.adapters[str(index)] = self._pairs[index] = _Pair(a, b, scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        rows = self.rows
        if rows is None or not self._pairs:
            return y
        if x.dim() < 2 or x.shape[0] != rows.count:
            raise RuntimeError(f"per-row LoRA: a batch of {x.shape[0] if x.dim() > 1 else 1} rows, but set_rows gave "
                               f"{rows.count} adapter ids (compiled steps pad the batch: run adapters with compile "
                               "off)")
        if rows.uniform is not None:
            pair = self._pairs.get(rows.uniform)
            return y if pair is None else y + _lora(pair, x, y.dtype)
        for index, at in rows.groups.items():  # y is the base layer's fresh output: added to in place
            if (pair := self._pairs.get(index)) is not None:
                y.index_put_((at,), _lora(pair, x.index_select(0, at), y.dtype), accumulate=True)
        return y

    def extra_repr(self) -> str:
        return f"adapters={sorted(self._pairs)}"


def attach_adapters(model: nn.Module, adapters: Mapping[str, str | Path]) -> list[str]:
    """Load the PEFT adapters `{name: directory}` beside `model`'s weights, as `RowLoRA` modules around the
    linears they target, whatever those linears are; returns every attached name, in index order (a request
    picks one by index through `set_rows`). All are checked before the model is touched."""
    names = adapter_names(model)
    for name in adapters:
        check_name(name)
        if name in names:
            raise ValueError(f"an adapter named {name!r} is already attached")
    dtype, device = model_dtype_device(model)
    loaded = [(len(names) + k, name, _read(model, name, Path(d))) for k, (name, d) in enumerate(adapters.items())]
    wrapped = list(getattr(model, "row_adapters", ()))
    for index, _, layers in loaded:
        for path, (a, b, scale) in layers.items():
            module = model.get_submodule(path)
            if not isinstance(module, RowLoRA):
                parent, _, child = path.rpartition(".")
                module = RowLoRA(module)
                setattr(model.get_submodule(parent), child, module)
                wrapped.append(module)
            module.add(index, a.to(device, dtype), b.to(device, dtype), scale)
    model.row_adapters = wrapped
    model.adapter_names = names + list(adapters)
    set_rows(model, None)
    return list(model.adapter_names)


def check_name(name: str) -> None:
    """An adapter name is what a request puts in `model`: letters, digits and . _ : / - (no spaces)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : / - (it is the `model` a "
                         "request names), starting with a letter or digit")


def _read(model: nn.Module, name: str, directory: Path) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{module path: (A, B, scale)} of one adapter, every tensor checked against the module it adapts."""
    try:
        config, weights = read_adapter(directory)
    except ValueError as e:
        raise ValueError(f"adapter {name!r}: {e}") from None
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"adapter {name!r} ({directory}): per-module {key} is not supported; save it with one "
                             "rank and alpha")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    if not paths:
        raise ValueError(f"adapter {name!r} ({directory}) holds no LoRA weights")
    out = {}
    for path in paths:
        have = {k.removeprefix(path + ".") for k in weights if k.startswith(path + ".lora_")}
        if have != {"lora_A.weight", "lora_B.weight"}:
            raise ValueError(f"adapter {name!r}: {path} has {sorted(have)}, not lora_A.weight and lora_B.weight")
        module = _module(model, path)
        if module is None or not hasattr(module, "in_features"):
            raise ValueError(f"adapter {name!r} adapts {path}, which is not a linear layer of this model (an "
                             "adapter for another model?)")
        a, b = weights[f"{path}.lora_A.weight"], weights[f"{path}.lora_B.weight"]
        want = ([r, module.in_features], [module.out_features, r])
        if [list(a.shape), list(b.shape)] != list(map(list, want)):
            raise ValueError(f"adapter {name!r}: {path} has A {list(a.shape)} and B {list(b.shape)}; this model "
                             f"with r={r} needs A {want[0]} and B {want[1]}")
        out[path] = (a, b, alpha / r)
    return out


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module.base_layer if isinstance(module, RowLoRA) else module


def parse_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=DIR` specs (`gemmakit serve --adapter`) as {name: directory}, each directory checked to hold a PEFT
    adapter's two files, so a typo fails before any model loads."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, eq, directory = spec.partition("=")
        if not eq or not name or not directory:
            raise ValueError(f"--adapter {spec!r}: give NAME=DIR (requests pick it with \"model\": NAME); to fold "
                             "one adapter into the weights instead, use `gemmakit merge --adapter DIR`")
        check_name(name)
        if name in out:
            raise ValueError(f"--adapter {name!r} is given twice")
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise ValueError(f"--adapter {name}={directory}: no such directory")
        missing = [f for f in _ADAPTER_FILES if not (path / f).is_file()]
        if missing:
            raise ValueError(f"--adapter {name}={directory}: not a PEFT LoRA adapter (no {' or '.join(missing)})")
        out[name] = path
    return out
