"""A text GGUF plus its `mmproj` GGUF (llama.cpp's split layout) -> the same multimodal model an HF directory gives.

The mmproj holds the towers and their configs (read by mmproj.py under HF names); what an HF checkpoint's
top-level config.json adds besides is rebuilt here:
- the placeholder ids, looked up by their text in the text GGUF's own vocabulary (`<start_of_image>`,
  `<image_soft_token>`, `<|image|>`, `<|audio|>` ...), so a re-numbered vocabulary still lines up; the
  released ids are the fallback when a vocabulary lacks one (the Gemma 3 soft-token id lies past the
  262144-entry table of some files; prompt.py writes such an id as pad, which is what the reference reads);
- Gemma 4's `use_bidirectional_attention`: GGUF text metadata does not record it; the released configs set
  "vision" exactly on the models without per-layer embeddings (26B-A4B, 31B), so that is what is assumed.

The towers are built on the meta device and each tensor is placed as it is read, like the rest of the model;
they stay in float (the text model may be quantized).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemmakit.checkpoints.common import CheckpointError, place
from gemmakit.checkpoints.hf import tower_alias
from gemmakit.checkpoints.mmproj import GEMMA3, read_mmproj
from gemmakit.media.towers import attach_towers, is_tower

# config.json field -> (token text, released id)
_G3_TOKENS = {"boi_token_index": ("<start_of_image>", 255999), "eoi_token_index": ("<end_of_image>", 256000),
              "image_token_index": ("<image_soft_token>", 262144)}
_G4_TOKENS = {"boi_token_id": ("<|image>", 255999), "eoi_token_id": ("<image|>", 258882),
              "image_token_id": ("<|image|>", 258880), "video_token_id": ("<|video|>", 258884),
              "boa_token_id": ("<|audio>", 256000), "eoa_token_index": ("<audio|>", 258883),
              "audio_token_id": ("<|audio|>", 258881)}


def find_mmproj(text_gguf: Path) -> Path | None:
    """The one `mmproj*.gguf` beside a text GGUF (how llama.cpp's releases ship them), or None."""
    found = sorted(p for p in text_gguf.parent.glob("mmproj*.gguf") if p.is_file() and p != text_gguf)
    return found[0] if len(found) == 1 else None


def attach_mmproj(model: nn.Module, path: str | Path, tokenizer: Any) -> None:
    """Give `model` (loaded from a text GGUF) the towers of the mmproj at `path`, in the model's dtype."""
    path = Path(path)
    contents = read_mmproj(path)
    c = model.config
    vision = contents.projectors.get("vision")
    family = "gemma3" if vision == GEMMA3 else "gemma4"
    if family != c.family:
        raise CheckpointError(f"{path} holds {'/'.join(contents.projectors.values())} towers, which belong to a "
                              f"{family} model, but the text model is {c.family}; use the mmproj released with it")
    if contents.text_hidden_size != c.hidden_size:
        raise CheckpointError(f"{path} projects into width {contents.text_hidden_size}, but the text model is "
                              f"{c.hidden_size} wide; this mmproj belongs to another model size")
    tokens = _G3_TOKENS if family == "gemma3" else _G4_TOKENS
    mm: dict[str, Any] = {k: v for k, v in contents.hf_config().items() if k != "text_config"}
    mm.update(model_type=family, **{field: _token_id(tokenizer, text, default) for field, (text, default)
                                    in tokens.items()})
    if family == "gemma4" and not c.hidden_size_per_layer_input:
        c.use_bidirectional_attention = "vision"
    c.multimodal = mm
    with torch.device("meta"):
        attach_towers(model)
    norm = model.model.norm.weight  # the decoder's float dtype, whatever its linears were quantized to
    dtype, device = norm.dtype, norm.device
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_tower(k)}
    loaded = set()
    for key, tensor in contents.items():
        name = tower_alias("model." + key, expected)
        if name not in expected:
            raise CheckpointError(f"{path}: tensor {key} has no place in gemmakit's {family} towers; the mmproj "
                                  "and the tower config disagree")
        place(model, name, tensor.reshape(expected[name]).to(device=device, dtype=dtype))
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tower tensor(s), e.g. {', '.join(missing[:3])}")


def _token_id(tokenizer: Any, text: str, default: int) -> int:
    found = tokenizer.token_to_id(text) if tokenizer is not None else None
    return default if found is None else int(found)

