"""Write a model as a Hugging Face directory that transformers (and gemmakit) load: config.json, safetensors
shards with an index, and the tokenizer (tokenizer.json + tokenizer_config.json with the chat template).

Parameter names are already HF's, so the state dict is written as it is; the output head is tied to the
embedding, as in the released checkpoints. A packed or quantized model is refused (its weights are no longer
plain tensors under their names): export from a model loaded as is, after `merge_lora` if it was adapted.
The directory is built next to its destination and renamed into place, so a crash never leaves half an
export behind, and an existing directory is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from gemmakit.files import fsync_path, fsync_tree, publish_mode
from gemmakit.media.towers import is_tower

SHARD_BYTES = 2 * 1024**3


def export_hf(model: nn.Module, directory: str | Path, tokenizer: Any = None, shard_bytes: int = SHARD_BYTES) -> Path:
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new directory (nothing is overwritten)")
    state = _plain_state(model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        dtype = next(iter(state.values())).dtype
        config = {**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_shards(state, tmp, shard_bytes)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
        publish_mode(tmp, directory)
        fsync_tree(tmp)  # else a power cut can leave a complete-looking directory of empty files
        os.replace(tmp, directory)
        fsync_path(directory.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from gemmakit.quantize import Int4Linear, Int8Linear, QuantizedEmbedding, QuantizedExperts
    from gemmakit.runtime.gemv import GemvLinear
    from gemmakit.runtime.packing import HalfLinear, PackedLinear
    from gemmakit.train.lora import LoRALinear

    kinds = (PackedLinear, HalfLinear, GemvLinear, LoRALinear, Int8Linear, Int4Linear, QuantizedEmbedding,
             QuantizedExperts)
    odd = [type(m).__name__ for m in model.modules() if isinstance(m, kinds)]
    if odd or getattr(model, "lm_head", None) is not None:
        raise ValueError(f"this model holds {sorted(set(odd)) or ['an untied head']} layers; export a model "
                         "loaded without packing or quantization (merge LoRA adapters first with merge_lora)")
    # The text model only: a multimodal model's towers are not part of a text checkpoint (export_gguf writes
    # Gemma 3's beside it as an mmproj, llama.cpp's split layout).
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not is_tower(k)}


def _write_shards(state: dict[str, torch.Tensor], directory: Path, shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(tokenizer: Any, directory: Path) -> None:
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    name = tokenizer.id_to_token
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": name(tokenizer.bos_id),
              "eos_token": name(tokenizer.eos_id), "add_bos_token": True, "add_eos_token": False}
    if tokenizer.pad_id is not None:
        config["pad_token"] = name(tokenizer.pad_id)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
