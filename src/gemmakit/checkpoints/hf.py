"""Load a Hugging Face model directory (config.json + safetensors shards) into a `Gemma` model.

The model is built on the meta device and each tensor is streamed in from its shard and assigned in place, so
at no point are two copies of the weights in memory. Names map one to one: the only edits are prefix
normalisation (multimodal checkpoints nest the text model under `model.language_model.`) and tensors gemmakit
deliberately does not use (the tied `lm_head`, and the K/V weights that older Gemma 4 checkpoints still carry
for KV-shared layers). The vision / audio towers of a multimodal checkpoint load beside the text model
(media/towers.py); a text-only config skips them. Weights are read only through safetensors: a directory with only
pickled `.bin` files is refused, never unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gemmakit.checkpoints.common import CheckpointError, Loader, RowSource, check_bounds, check_size
from gemmakit.config import Config, ConfigError
from gemmakit.media.gemma4_unified import normalise_unified_key
from gemmakit.model import Gemma

_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."))
_UNUSED = re.compile(r"^(lm_head\.|model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.|"
                     r"(model\.)?(vision_tower|audio_tower|multi_modal_projector|embed_vision|embed_audio)\.)")


_TOWERS = re.compile(r"^(vision_tower|audio_tower|multi_modal_projector|embed_vision|embed_audio|vision_embedder)\.")


def normalise_key(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    if _TOWERS.match(key):  # released Gemma 3 checkpoints keep the towers at the top level
        return "model." + key
    return key


def tower_alias(key: str, expected: dict[str, Any]) -> str:
    """The name a tower tensor has in gemmakit when the checkpoint spells it another way transformers also
    reads: SigLIP saved by transformers 5.x without its `vision_model.` level, the 12B's older embedder names."""
    if key in expected or not key.startswith("model."):
        return key
    rest = key[len("model."):]
    for candidate in (rest.replace("vision_tower.", "vision_tower.vision_model.", 1), normalise_unified_key(rest)):
        if "model." + candidate in expected:
            return "model." + candidate
    return key


MAX_JSON = 64 << 20  # config.json and the shard index are kilobytes; a bigger one is damaged or hostile


def read_json(path: Path, limit: int = MAX_JSON) -> Any:
    """A checkpoint's JSON file, refused before reading when larger than `limit` (json holds ~10x in memory)."""
    check_size(path, limit, "re-download the checkpoint")
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from e


def _roots(path: Path) -> list[Path]:
    """Where a checkpoint's files may live: the directory itself, and for a Hugging Face cache snapshot
    (models--org--name/snapshots/<rev>/, whose files are symlinks to ../../blobs/<hash>) its blobs folder."""
    real = path.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def contained(path: Path, name: Any) -> Path:
    """`path / name` for a file named by the index, refused unless it is a plain relative name whose real
    location (symlinks followed) is a regular file inside the checkpoint: an index must not make gemmakit
    read /etc/shadow, a file in another directory, or block forever on a FIFO or a device."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{path}: the shard index names {name!r}; shards must be files inside the model "
                              "directory. The index is damaged or hostile: re-download the checkpoint")
    f = path / name
    try:
        real = f.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{f} cannot be resolved ({e}); replace it with the downloaded shard") from e
    if not any(real.is_relative_to(root) for root in _roots(path)):
        raise CheckpointError(f"{f} leads to {real}, outside the model directory {path}; gemmakit reads shards "
                              "only from inside it. Copy the real file into the directory instead of linking it")
    if real.exists() and not real.is_file():
        raise CheckpointError(f"{f} is not a regular file; replace it with the downloaded shard")
    return f


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist and to lie inside it before anything
    is loaded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map); re-download it")
        odd = next((v for v in weight_map.values() if not isinstance(v, str)), None)
        if odd is not None:
            contained(path, odd)  # refuses it, with the message
        files = [contained(path, name) for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path} is missing {len(missing)} shard(s) listed in its index: "
                                  f"{', '.join(missing[:5])}. Download the complete checkpoint.")
        return files
    files = [contained(path, f.name) for f in sorted(path.glob("*.safetensors"))]
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


def read_config(path: Path) -> Config:
    """config.json, with its sizes checked before `Config` builds per-layer lists from them."""
    d = read_json(path / "config.json")
    text = d.get("text_config") if isinstance(d, dict) else None
    check_bounds(text if isinstance(text, dict) else d if isinstance(d, dict) else {}, str(path / "config.json"))
    try:
        config = Config.from_hf(d, name=path.resolve().name or "custom")
        if config.multimodal is not None:
            config.multimodal["preprocessor"] = read_preprocessor(path)
        return config
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    except (TypeError, KeyError, ValueError, AttributeError, ZeroDivisionError) as e:  # a value of the wrong type
        raise CheckpointError(f"{path / 'config.json'} does not describe a model gemmakit can build "
                              f"({type(e).__name__}: {e}); re-download it") from e


def read_preprocessor(path: Path) -> dict[str, Any]:
    """The image processor's settings a multimodal checkpoint ships (`preprocessor_config.json`, or the
    `image_processor` part of a newer `processor_config.json`): pan-and-scan, Gemma 4's soft-token budget."""
    out: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (path / name).is_file():
            d = read_json(path / name, limit=1 << 20)
            if isinstance(d, dict):
                out.update(d.get("image_processor") if isinstance(d.get("image_processor"), dict) else d)
    return out


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            quantize: str | None = None) -> Gemma:
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; point gemmakit at a Hugging Face model directory")
    config = read_config(path)
    loader = Loader(config, dtype, device, source=str(path), quantize=quantize)
    files = shard_files(path)
    for raw, key, tensor_slice in iter_tensors(files):
        key = tower_alias(key, loader.expected)
        if key in loader.expected:
            try:
                shape = tuple(tensor_slice.get_shape())
                loader.check_shape(key, shape)
                loader.check_dtype(key, tensor_slice.get_dtype())
                if key == "model.embed_tokens.weight":  # row blocks: quantizing never holds the whole table
                    source = RowSource(shape, loader.dtype, loader.device, lambda a, b, s=tensor_slice: s[a:b])
                    loader.assign_rows(key, source)
                else:  # a scalar (a tower's clip bound) cannot be sliced
                    loader.assign(key, tensor_slice[:] if shape else tensor_slice[...])
            except SafetensorError as e:
                raise CheckpointError(f"cannot read {raw} from {path} ({e}); the file may be truncated") from e
        elif not (_UNUSED.match(key) or loader.is_ignorable(key)):
            loader.unexpected.append(raw)
    return loader.finish()
