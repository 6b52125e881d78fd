"""Load a Hugging Face model directory (config.json + safetensors shards) into a `Gemma` model.

The model is built on the meta device and each tensor is streamed in from its shard and assigned in place, so
at no point are two copies of the weights in memory. Names map one to one: the only edits are prefix
normalisation (multimodal checkpoints nest the text model under `model.language_model.`) and tensors gemmakit
deliberately does not use (the tied `lm_head`, the vision/audio towers, and the K/V weights that older Gemma 4
checkpoints still carry for KV-shared layers). Weights are read only through safetensors: a directory with only
pickled `.bin` files is refused, never unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gemmakit.checkpoints.common import CheckpointError, Loader, RowSource
from gemmakit.config import Config, ConfigError
from gemmakit.model import Gemma

_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."))
_UNUSED = re.compile(r"^(lm_head\.|model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.|"
                     r"(model\.)?(vision_tower|audio_tower|multi_modal_projector|embed_vision|embed_audio)\.)")


def normalise_key(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist before anything is loaded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path} is missing {len(missing)} shard(s) listed in its index: "
                                  f"{', '.join(missing[:5])}. Download the complete checkpoint.")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds only pickled PyTorch weights; gemmakit never unpickles checkpoints. "
                              "Convert them to safetensors first (e.g. transformers' save_pretrained).")
    raise CheckpointError(f"no *.safetensors files in {path}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(checkpoint name, gemmakit name, lazily loaded tensor getter result) for every tensor in every shard."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, normalise_key(key), st.get_slice(key)
        except SafetensorError as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it may be truncated. "
                                  "Re-download it.") from e


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            quantize: str | None = None) -> Gemma:
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; point gemmakit at a Hugging Face model directory")
    try:
        config = Config.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    loader = Loader(config, dtype, device, source=str(path), quantize=quantize)
    files = shard_files(path)
    for raw, key, tensor_slice in iter_tensors(files):
        if key in loader.expected:
            try:
                shape = tuple(tensor_slice.get_shape())
                loader.check_shape(key, shape)
                if key == "model.embed_tokens.weight":  # row blocks: quantizing never holds the whole table
                    source = RowSource(shape, loader.dtype, loader.device, lambda a, b, s=tensor_slice: s[a:b])
                    loader.assign_rows(key, source)
                else:
                    loader.assign(key, tensor_slice[:])
            except SafetensorError as e:
                raise CheckpointError(f"cannot read {raw} from {path} ({e}); the file may be truncated") from e
        elif not (_UNUSED.match(key) or loader.is_ignorable(key)):
            loader.unexpected.append(raw)
    return loader.finish()
