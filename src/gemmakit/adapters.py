"""LoRA adapters served per request: several adapters beside one base model, chosen row by row.

(Contract for the runtime; the per-row LoRA modules and loading land with issue 28's adapter work.)
`adapter_names(model)` lists the attached adapters; a request names one, and before each forward pass the
runtime calls `set_rows(model, ids)` with each batch row's adapter index (-1: the base model alone).
"""

from __future__ import annotations

from torch import Tensor, nn


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters attached to `model`, in index order (none: an empty list)."""
    return list(getattr(model, "adapter_names", ()))


def set_rows(model: nn.Module, ids: Tensor | None) -> None:
    """Every per-row LoRA module of `model` applies adapter ids[i] to batch row i of the next forward pass."""
    for m in getattr(model, "row_adapters", ()):
        m.row_ids = ids
