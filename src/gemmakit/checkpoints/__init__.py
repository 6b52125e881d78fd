"""Checkpoint loading: HF safetensors directories and GGUF files, behind one `load_model` call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gemmakit.checkpoints.common import MAX_TOKENIZER_JSON, CheckpointError, check_size, return_freed_memory
from gemmakit.checkpoints.default import default_model_path
from gemmakit.flags import normalize_quantize
from gemmakit.model import Gemma

__all__ = ["CheckpointError", "default_model_path", "load_model", "load_model_and_tokenizer", "resolve"]


def resolve(path: str | Path | None) -> Path:
    """The checkpoint a user means: the embedded default when no path is given."""
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"no such model path: {p} (give an HF model directory or a .gguf file)")
    return p


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantize: str | None = None) -> Gemma:
    """Load an HF model directory or a GGUF file (default: the embedded Gemma 3 270M). `quantize` ("int8",
    "int4") quantizes module by module while loading (quantize.py), never holding the full-precision model."""
    quantize = normalize_quantize(quantize)
    p = resolve(path)
    if p.is_dir():
        from gemmakit.checkpoints.hf import load_hf

        model = load_hf(p, dtype, device, quantize)
    elif p.suffix == ".gguf" or _magic(p) == b"GGUF":
        from gemmakit.checkpoints.gguf import load_gguf

        model = load_gguf(p, dtype, device, quantize)
    else:
        raise CheckpointError(f"{p} is neither a model directory nor a GGUF file")
    return_freed_memory()
    return model


def load_model_and_tokenizer(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", quantize: str | None = None,
                             mmproj: str | Path | bool | None = None):
    """(model, tokenizer) for a checkpoint: an HF directory's tokenizer.json, or the vocabulary a GGUF carries.
    `mmproj`: for a GGUF, llama.cpp's tower file to attach (None: the one `mmproj*.gguf` beside it, if any;
    False: none)."""
    from gemmakit.tokenizer import Tokenizer

    p = resolve(path)
    if p.is_dir():  # refused before minutes of model loading, not after
        check_size(p / "tokenizer.json", MAX_TOKENIZER_JSON, "re-download the checkpoint's tokenizer.json")
    model = load_model(p, dtype, device, quantize)
    try:
        tokenizer = Tokenizer.from_file(p) if p.is_dir() else Tokenizer.from_gguf(p)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # damaged vocabulary metadata
        raise CheckpointError(f"{p}: its tokenizer cannot be loaded ({type(e).__name__}: {e}); re-download or "
                              "re-convert the checkpoint") from e
    _check_special_ids(tokenizer, p)
    if not p.is_dir() and mmproj is not False:
        from gemmakit.checkpoints.gguf_media import attach_mmproj, find_mmproj

        towers = find_mmproj(p) if mmproj in (None, True) else Path(mmproj).expanduser()
        if mmproj is True and towers is None:
            raise CheckpointError(f"no single mmproj*.gguf beside {p}; pass the tower file's path")
        if towers is not None:
            attach_mmproj(model, towers, tokenizer)
    return_freed_memory()  # reading a 262k-entry GGUF vocabulary leaves much freed heap behind
    return model, tokenizer


def _check_special_ids(tokenizer: Any, p: Path) -> None:
    """BOS/EOS/PAD ids come from the file: each must be a token of the vocabulary."""
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(tokenizer, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < tokenizer.vocab_size):
            raise CheckpointError(f"{p}: the tokenizer's {name} is {value!r}, not a token id below "
                                  f"{tokenizer.vocab_size}; the file is damaged: re-download or re-convert it")


def _magic(p: Path) -> bytes:
    with p.open("rb") as f:
        return f.read(4)
