"""Load a llama.cpp GGUF file into a `Gemma` model, through the `gguf` library.

Three things differ from an HF checkpoint, and each is undone here:
- names: gguf's own HF->GGUF tensor name map is inverted for the model's state-dict keys (no table of ours);
- Gemma 3 norms: llama.cpp's converter stores the effective multiplier 1 + w, so 1 is subtracted again to get
  back the zero-centred weight that the (1 + w) RMSNorm expects (Gemma 4 norms are stored as they are);
- quantization: block-quantized tensors are dequantized with vectorised torch code (`quants.py`). Loaded
  with `quantize="int4"`, 4-bit blocks keep their codes, and a file that mixes 4-bit blocks with wider ones
  (`quants.WIDE`: Q5_0 to Q8_0, where its quantizer judged a matrix sensitive or Q4_K did not fit the rows)
  keeps those linears at int8 instead of rounding them to 4 bits (on the embedded 270M: perplexity 30.4 ->
  25.8, one-row decode as fast). The tied embedding/head stays int4 whatever its type: it is most of the
  weights, and at int8 a one-row step reads twice the bytes for it and an 8-row step's head takes longer.
The config comes from the GGUF metadata; what a file does not store (the local RoPE theta, the layer
pattern, the attention scalar) takes the values llama.cpp itself assumes for Gemma 3.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import torch

from gemmakit.checkpoints.common import CheckpointError, Loader, RowSource
from gemmakit.checkpoints.gguf_reader import open_gguf, release_pages
from gemmakit.checkpoints.quants import FOUR_BIT, WIDE, dequantize, four_bit_codes
from gemmakit.config import FULL, SLIDING, Config, ConfigError, default_layer_types
from gemmakit.model import Gemma

_ARCHS = {"gemma3": gguf.MODEL_ARCH.GEMMA3}


_SHORT = 4096  # longer metadata arrays (the vocabulary, merges, scores) are never needed for the config


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Scalar and short-array metadata. Long arrays are left to the tokenizer: as Python lists, the 262k-entry
    vocabulary would cost far more memory than the file, and a hostile file could hold 16M-entry arrays."""
    out = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and int(f.parts[4][0]) > _SHORT:
            continue
        try:
            out[key] = f.contents()
        except Exception:  # noqa: S112 - an odd field we do not need must not block loading
            continue
    return out


# (lowest, highest) for the hyperparameters read from a file: generous next to the largest Gemma (62 layers,
# 5376 wide, 21504 FFN, 128k context), tight enough that a damaged value cannot make building the model (on
# the meta device, one module per layer) or its RoPE tables take hours.
_BOUNDS = {"block_count": (1, 1024), "embedding_length": (1, 1 << 16), "attention.head_count": (1, 1024),
           "attention.head_count_kv": (1, 1024), "attention.key_length": (1, 1 << 12),
           "feed_forward_length": (1, 1 << 18), "context_length": (1, 1 << 24),
           "attention.sliding_window": (1, 1 << 24)}
_MISSING = object()


class _Meta:
    """Typed access to `{arch}.*` metadata: a missing or mistyped value is a `CheckpointError` naming the key."""

    def __init__(self, meta: dict[str, Any], arch: str, path: str | Path):
        self.meta, self.arch, self.path = meta, arch, path

    def _get(self, key: str, default: Any) -> tuple[str, Any]:
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        value = self.meta.get(full, default)
        if value is _MISSING:
            raise CheckpointError(f"{self.path}: the GGUF metadata has no {full}, which gemmakit needs; the file "
                                  "is incomplete or was not written by llama.cpp's converter: re-convert it")
        return full, value

    def integer(self, key: str, default: Any = _MISSING) -> int:
        full, value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{self.path}: GGUF metadata {full} is {value!r}, not an integer; re-convert it")
        lo, hi = _BOUNDS.get(key, (0, 1 << 31))
        if not lo <= value <= hi:
            raise CheckpointError(f"{self.path}: GGUF metadata {full} = {value} is outside [{lo}, {hi}]; the file "
                                  "is damaged or not a Gemma model")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float | None:
        full, value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CheckpointError(f"{self.path}: GGUF metadata {full} is {value!r}, not a number; re-convert it")
        return float(value)


def config_from_gguf(reader: gguf.GGUFReader, path: str | Path = "") -> Config:
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch == "gemma4":
        raise CheckpointError(f"{path}: Gemma 4 GGUF files are not supported yet; load the HF safetensors "
                              "checkpoint directory instead")
    if not isinstance(arch, str) or arch not in _ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not a Gemma model gemmakit can load "
                              f"(supported: {', '.join(_ARCHS)})")
    m = _Meta(meta, arch, path)
    n_layers, hidden, heads = m.integer("block_count"), m.integer("embedding_length"), m.integer("attention.head_count")
    head_dim = m.integer("attention.key_length", hidden // heads)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None or len(embd.shape) != 2:
        raise CheckpointError(f"{path}: GGUF file has no 2-D token_embd.weight tensor; re-convert it")
    kw: dict[str, Any] = dict(
        name=str(meta.get("general.name", Path(path).stem)), family="gemma3", num_hidden_layers=n_layers,
        hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
        intermediate_size=m.integer("feed_forward_length"),
        num_key_value_heads=m.integer("attention.head_count_kv", heads),
        max_position_embeddings=m.integer("context_length", 131072),
        rms_norm_eps=m.number("attention.layer_norm_rms_epsilon", 1e-6),
        sliding_window=m.integer("attention.sliding_window", 512), rope_theta=m.number("rope.freq_base", 1e6),
        vocab_size=int(embd.shape[1]), layer_types=_layer_types(meta.get(f"{arch}.attention.sliding_window_pattern"),
                                                                n_layers),
        rope_local_base_freq=m.number("rope.freq_base_swa", 10_000.0),
        # llama.cpp scales Gemma 3 27B queries by (H / heads)**-0.5 and every other size by head_dim**-0.5.
        query_pre_attn_scalar=hidden // heads if n_layers == 62 else head_dim,
        final_logit_softcapping=m.number("final_logit_softcapping", None),
        bos_token_id=m.integer("tokenizer.ggml.bos_token_id", 2),
        eos_token_id=m.integer("tokenizer.ggml.eos_token_id", 1),
    )
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        kw["rope_scaling_factor"] = m.number("rope.scaling.factor", 1.0)
    try:
        return Config(**kw)
    except (ConfigError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _layer_types(pattern: Any, n_layers: int) -> list[str]:
    """The per-layer sliding flags a file may carry (gemmakit's exporter writes them), else the default."""
    if isinstance(pattern, list) and len(pattern) == n_layers:
        return [SLIDING if swa else FULL for swa in pattern]
    return default_layer_types(n_layers, last_full=False)  # llama.cpp's Gemma 3 rule, as transformers


def _dequantize(t: Any, data: Any, shape: tuple[int, ...], path: Path | str) -> torch.Tensor:
    try:
        return dequantize(data, t.tensor_type, shape)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor {t.name}: {e}") from e


def _codes(t: Any, shape: tuple[int, ...], path: Path | str) -> tuple[torch.Tensor, ...]:
    try:
        return four_bit_codes(t.data, t.tensor_type, shape)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor {t.name}: {e}") from e


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              quantize: str | None = None) -> Gemma:
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    loader = Loader(config, dtype, device, source=str(path), quantize=quantize)
    name_map = gguf.get_tensor_name_map(_ARCHS["gemma3"], config.num_hidden_layers)
    to_key = {name_map.get_name(k, try_suffixes=(".weight", "")): k for k in loader.expected}
    mixed = quantize == "int4" and any(t.tensor_type in FOUR_BIT for t in reader.tensors)
    for t in reader.tensors:
        key = to_key.get(t.name)
        if key is None:
            if t.name not in ("output.weight", "rope_freqs.weight"):  # a tied head / RoPE factors we compute
                loader.unexpected.append(t.name)
            continue
        shape = tuple(int(n) for n in reversed(t.shape))
        loader.check_shape(key, shape)
        if key == "model.embed_tokens.weight" and len(shape) == 2:
            # Read in row blocks: each row of a GGUF tensor is a whole number of quantization blocks.
            def rows(a: int, b: int, t=t, shape=shape) -> torch.Tensor:
                w = _dequantize(t, t.data[a:b], (b - a, shape[1]), path)
                row_bytes = t.n_bytes // shape[0]
                release_pages(reader, t.data_offset + a * row_bytes, (b - a) * row_bytes)
                return w

            loader.assign_rows(key, RowSource(shape, loader.dtype, loader.device, rows))
            continue
        if t.tensor_type in FOUR_BIT and loader.assign_int4_codes(key, lambda t=t, shape=shape: _codes(t, shape, path)):
            release_pages(reader, t.data_offset, t.n_bytes)
            continue
        w = _dequantize(t, t.data, shape, path)
        release_pages(reader, t.data_offset, t.n_bytes)
        if key.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma 3's (1 + w); the model applies the offset itself
        loader.assign(key, w, quantize="int8" if mixed and t.tensor_type in WIDE and w.ndim == 2 else None)
    return loader.finish()
