"""Load a llama.cpp GGUF file into a `Gemma` model, through the `gguf` library.

Three things differ from an HF checkpoint, and each is undone here:
- names: gguf's own HF->GGUF tensor name map is inverted for the model's state-dict keys (no table of ours);
- Gemma 3 norms: llama.cpp's converter stores the effective multiplier 1 + w, so 1 is subtracted again to get
  back the zero-centred weight that the (1 + w) RMSNorm expects (Gemma 4 norms are stored as they are);
- quantization: block-quantized tensors are dequantized with vectorised torch code (`quants.py`). Loaded
  with `quantize="int4"`, 4-bit blocks keep their codes, and a file of 4.5 bits a weight or fewer that keeps
  some matrices wider (`quants.WIDE`: Q5_0 to Q8_0, where its quantizer judged a matrix sensitive or Q4_K did
  not fit the rows) keeps those linears at int8 instead of rounding them to 4 bits (docs/performance.md,
  "Quantization", has the perplexities). Types below 4.5 bits or not affine (Q2_K, Q3_K, IQ*, TQ*, MXFP4) are
  decoded to float and quantized in the model's mode; `model.weights_note` says what became of each type.
  The tied embedding/head stays int4 whatever its type: it is most of the weights, and at int8 a one-row step
  reads twice the bytes for it and an 8-row step's head takes longer. Stored as 4-bit blocks, it keeps its
  codes too, and so do a layer's Q4 experts (Google's QAT releases are Q4_0 throughout).
The config comes from the GGUF metadata; what a Gemma 3 file does not store (the local RoPE theta, the layer
pattern, the attention scalar) takes the values llama.cpp itself assumes for Gemma 3. Gemma 4 files
("gemma4") spread more of the config over per-layer arrays and the tensors themselves; gguf_gemma4.py reads
them as llama.cpp does, and names the tensors gguf's map leaves out. Large tables (the vocabulary, E2B/E4B's
per-layer table) are read a block of rows at a time, every tensor's file pages released once read.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from gemmakit.checkpoints.common import CheckpointError, Loader, RowSource
from gemmakit.checkpoints.gguf_gemma4 import check_kv_sharing, gemma4_config, gemma4_tensor_name, shared_kv_names
from gemmakit.checkpoints.gguf_reader import open_gguf, release_pages
from gemmakit.checkpoints.quants import FOUR_BIT, WIDE, dequantize, describe, four_bit_codes
from gemmakit.config import FULL, SLIDING, Config, ConfigError, default_layer_types
from gemmakit.model import Gemma
from gemmakit.quantize import EXPERT_MATRICES, Int4Linear, QuantizedEmbedding, QuantizedExperts
from gemmakit.quantize_codes import cpu_int4_layout, int4_kernel_operands, int4_problem, pack_nibbles

_ARCHS = {"gemma3": gguf.MODEL_ARCH.GEMMA3, "gemma4": gguf.MODEL_ARCH.GEMMA4}


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
           "attention.sliding_window": (1, 1 << 24), "attention.key_length_swa": (1, 1 << 12),
           "attention.shared_kv_layers": (0, 1024), "embedding_length_per_layer_input": (0, 1 << 12),
           "expert_count": (0, 1024), "expert_used_count": (1, 1024), "expert_feed_forward_length": (1, 1 << 18)}
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
        return self._check_int(*self._get(key, default), key)

    def _check_int(self, full: str, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{self.path}: GGUF metadata {full} is {value!r}, not an integer; re-convert it")
        lo, hi = _BOUNDS.get(key, (0, 1 << 31))
        if not lo <= value <= hi:
            raise CheckpointError(f"{self.path}: GGUF metadata {full} = {value} is outside [{lo}, {hi}]; the file "
                                  "is damaged or not a Gemma model")
        return value

    def per_layer(self, key: str, n_layers: int, default: Any = _MISSING) -> list[int]:
        """An integer per layer, stored as one scalar for all or as an array of `n_layers` entries."""
        full, value = self._get(key, default)
        if not isinstance(value, list):
            return [self._check_int(full, value, key)] * n_layers
        if len(value) != n_layers:
            raise CheckpointError(f"{self.path}: GGUF metadata {full} has {len(value)} entries for {n_layers} "
                                  "layers (block_count); the file is damaged: re-convert it")
        return [self._check_int(full, v, key) for v in value]

    def flags(self, key: str, n_layers: int) -> list[bool]:
        """A bool per layer (an array of `n_layers` entries)."""
        full, value = self._get(key, _MISSING)
        if not isinstance(value, list) or len(value) != n_layers or not all(isinstance(v, bool) for v in value):
            raise CheckpointError(f"{self.path}: GGUF metadata {full} must be {n_layers} booleans (one per layer), "
                                  f"not {str(value)[:80]}; the file is damaged: re-convert it")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float | None:
        full, value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CheckpointError(f"{self.path}: GGUF metadata {full} is {value!r}, not a number; re-convert it")
        if isinstance(value, float) and float(np.float32(value)) == value:
            return float(str(np.float32(value)))  # the decimal the converter wrote (1e-06, not 9.99999997e-07)
        return float(value)


def config_from_gguf(reader: gguf.GGUFReader, path: str | Path = "") -> Config:
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in _ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not a Gemma model gemmakit can load "
                              f"(supported: {', '.join(_ARCHS)})")
    m = _Meta(meta, arch, path)
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise CheckpointError(f"{path}: GGUF file has no 2-D token_embd.weight tensor; re-convert it")
    kw = gemma4_config(m, tensors, path) if arch == "gemma4" else _gemma3_config(m, meta, arch)
    eos: int | list[int] = m.integer("tokenizer.ggml.eos_token_id", 1)
    eot = m.integer("tokenizer.ggml.eot_token_id", eos)
    kw.update(name=str(meta.get("general.name", Path(path).stem)), vocab_size=int(embd.shape[1]),
              bos_token_id=m.integer("tokenizer.ggml.bos_token_id", 2),
              eos_token_id=eos if eot == eos else [eos, eot])
    try:
        config = Config(**kw)
    except (ConfigError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    if config.is_gemma4:
        check_kv_sharing(config, path)
    return config


def _gemma3_config(m: _Meta, meta: dict[str, Any], arch: str) -> dict[str, Any]:
    n_layers, hidden, heads = m.integer("block_count"), m.integer("embedding_length"), m.integer("attention.head_count")
    head_dim = m.integer("attention.key_length", hidden // heads)
    kw: dict[str, Any] = dict(
        family="gemma3", num_hidden_layers=n_layers,
        hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
        intermediate_size=m.integer("feed_forward_length"),
        num_key_value_heads=m.integer("attention.head_count_kv", heads),
        max_position_embeddings=m.integer("context_length", 131072),
        rms_norm_eps=m.number("attention.layer_norm_rms_epsilon", 1e-6),
        sliding_window=m.integer("attention.sliding_window", 512), rope_theta=m.number("rope.freq_base", 1e6),
        layer_types=_layer_types(meta.get(f"{arch}.attention.sliding_window_pattern"), n_layers),
        rope_local_base_freq=m.number("rope.freq_base_swa", 10_000.0),
        # llama.cpp scales Gemma 3 27B queries by (H / heads)**-0.5 and every other size by head_dim**-0.5.
        query_pre_attn_scalar=hidden // heads if n_layers == 62 else head_dim,
        final_logit_softcapping=m.number("final_logit_softcapping", None),
    )
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        kw["rope_scaling_factor"] = m.number("rope.scaling.factor", 1.0)
    return kw


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


_TABLES = ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight")  # read in row blocks
_BLOCK_BYTES = 64 << 20  # float32 bytes of one row block of a table


def _tensor_keys(config: Config, expected: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """{GGUF tensor name: state-dict key} and the names a file may hold that are deliberately not loaded."""
    names = gguf.get_tensor_name_map(_ARCHS[config.family], config.num_hidden_layers)
    skip = {"output.weight", "rope_freqs.weight"}  # a tied head / RoPE factors the model computes itself
    if config.is_gemma4:
        to_key = {gemma4_tensor_name(names, k): k for k in expected}
        skip |= shared_kv_names(config.num_hidden_layers, config.first_kv_shared_layer)
    else:
        to_key = {names.get_name(k, try_suffixes=(".weight", "")): k for k in expected}
    to_key.pop(None, None)  # type: ignore[call-overload]  # a key gguf cannot name is reported missing
    return to_key, skip


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              quantize: str | None = None) -> Gemma:
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    loader = Loader(config, dtype, device, source=str(path), quantize=quantize)
    to_key, skip = _tensor_keys(config, loader.expected)
    # A file quantized to 4 bits or fewer whose quantizer kept some matrices wider (Q4_K_M's Q6_K ones, IQ4_XS's
    # Q5_K ones) meant those as sensitive: under int4 they go to int8 rather than to 4 bits.
    mixed = quantize == "int4" and any(t.tensor_type not in WIDE for t in reader.tensors)
    experts = _ExpertCodes(loader)
    for t in reader.tensors:
        key = to_key.get(t.name)
        if key is None:
            if t.name not in skip:
                loader.unexpected.append(t.name)
            continue
        shape = tuple(int(n) for n in reversed(t.shape))
        loader.check_shape(key, shape)
        if key in _TABLES and len(shape) == 2:
            source = RowSource(shape, loader.dtype, loader.device, _row_reader(reader, t, shape, path))
            if key == "model.embed_tokens.weight":
                if not _tied_head_codes(loader, reader, t, shape, path):
                    loader.assign_rows(key, source)  # quantizing: straight from the row blocks
            else:
                loader.assign(key, _read_table(source))
            continue
        if experts.take(key, t, shape, path):
            release_pages(reader, t.data_offset, t.n_bytes)
            continue
        if t.tensor_type in FOUR_BIT and loader.assign_int4_codes(key, lambda t=t, shape=shape: _codes(t, shape, path)):
            release_pages(reader, t.data_offset, t.n_bytes)
            continue
        w = _dequantize(t, t.data, shape, path)
        release_pages(reader, t.data_offset, t.n_bytes)
        if not config.is_gemma4 and key.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma 3's (1 + w); the model applies the offset itself
        loader.assign(key, w, quantize="int8" if mixed and t.tensor_type in WIDE and w.ndim == 2 else None)
    experts.decode()  # a layer whose other experts matrix never came: loaded as it is, finish() names the other
    model = loader.finish()
    # What became of each stored type (kept as codes, int8, decoded to float): the verbose load line.
    model.weights_note = f"{Path(path).name}: " + describe(Counter(t.tensor_type for t in reader.tensors), quantize)
    return model


class _ExpertCodes:
    """Under quantize="int4", a layer's experts stored as 4-bit blocks run on those codes, not on a re-fit of
    their dequantized values (the experts are nearly all of a 26B-A4B's bytes; Google's QAT files are Q4_0).
    `QuantizedExperts.from_int4_codes` takes both matrices at once, so the first one's codes wait for the
    second; if that one is not 4-bit (or the kernel refuses a shape), the waiting codes are decoded and both
    load the ordinary way."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.pending: dict[str, dict[str, tuple[tuple[int, ...], tuple[torch.Tensor, ...]]]] = {}

    def take(self, key: str, t: Any, shape: tuple[int, ...], path: str | Path) -> bool:
        """True when `key`'s tensor was taken (held or placed); False: load it as usual."""
        module, _, name = key.rpartition(".")
        if self.loader.quantize != "int4" or name not in EXPERT_MATRICES or len(shape) != 3:
            return False
        E, N, K = shape
        partner_loaded = any(f"{module}.{n}" in self.loader.loaded for n in EXPERT_MATRICES)
        if t.tensor_type not in FOUR_BIT or int4_problem(N, K, 32, self.loader.device) or partner_loaded:
            self.decode(module)
            return False
        codes = tuple(c.to(self.loader.device) for c in _codes(t, (E * N, K), path))
        held = self.pending.setdefault(module, {})
        held[name] = (shape, codes)
        if len(held) == len(EXPERT_MATRICES):
            parent, _, child = module.rpartition(".")
            stacks = {n: c for n, (_, c) in self.pending.pop(module).items()}
            setattr(self.loader.model.get_submodule(parent), child, QuantizedExperts.from_int4_codes(stacks, E))
            self.loader.loaded.update(f"{module}.{n}" for n in EXPERT_MATRICES)
        return True

    def decode(self, module: str | None = None) -> None:
        """Load the codes waiting in `module` (all modules: None) the ordinary way."""
        if module is None:
            for m in list(self.pending):
                self.decode(m)
            return
        for name, (shape, (q, scale, zero)) in self.pending.pop(module, {}).items():
            group = q.shape[1] // scale.shape[1]
            w = q * scale.repeat_interleave(group, -1) + zero.repeat_interleave(group, -1)
            self.loader.assign(f"{module}.{name}", w.view(shape))


_HEAD_ROWS = 8192  # rows of codes decoded at once: whole blocks of every int4 packing's row period


def _tied_head_codes(loader: Loader, reader: gguf.GGUFReader, t: Any, shape: tuple[int, ...],
                     path: str | Path) -> bool:
    """Under quantize="int4", a 4-bit token_embd (Google's QAT files are Q4_0 throughout) becomes the int4 head
    and the lookup table on the file's own codes, as `quantize_tied_head` would build them from a re-fit: the
    head packs them for the kernel and the table reads the head's packing in place where the CPU layout
    allows (else a nibble copy). Decoded a row block at a time, never as a float table. False when this does
    not apply."""
    V, K = shape
    if loader.quantize != "int4" or t.tensor_type not in FOUR_BIT or int4_problem(V, K, 32, loader.device):
        return False
    layout = cpu_int4_layout(K) if loader.device.type == "cpu" else None
    if layout is not None and V % layout[0].shape[0]:
        layout = None  # a vocabulary that is not whole blocks of the packing's row period
    packed, sz, nibbles, group, row_bytes = [], [], [], 32, t.n_bytes // V
    for a in range(0, V, _HEAD_ROWS):
        b = min(a + _HEAD_ROWS, V)
        try:
            q, scale, zero = (c.to(loader.device) for c in four_bit_codes(t.data[a:b], t.tensor_type, (b - a, K)))
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor {t.name}: {e}") from e
        p, s, group = int4_kernel_operands(q, scale, zero)
        packed.append(p)
        sz.append(s)
        if layout is None:
            nibbles.append(pack_nibbles(q))  # QuantizedEmbedding's order: even column high
        release_pages(reader, t.data_offset + a * row_bytes, (b - a) * row_bytes)
    model, head = loader.model, torch.cat(packed)
    model.lm_head = Int4Linear(head, torch.cat(sz, dim=1), group, V, K)
    model.model.embed_tokens = QuantizedEmbedding(head if layout is not None else torch.cat(nibbles),
                                                  model.lm_head.scales_and_zeros, loader.dtype,
                                                  model.model.embed_tokens.padding_idx, group, layout)
    loader.loaded.add("model.embed_tokens.weight")
    return True


def _row_reader(reader: gguf.GGUFReader, t: Any, shape: tuple[int, ...], path: str | Path) -> Any:
    """Rows [a, b) of a 2-D tensor, dequantized; each row of a GGUF tensor is a whole number of blocks, and
    the file pages read are released at once."""
    def rows(a: int, b: int) -> torch.Tensor:
        w = _dequantize(t, t.data[a:b], (b - a, shape[1]), path)
        row_bytes = t.n_bytes // shape[0]
        release_pages(reader, t.data_offset + a * row_bytes, (b - a) * row_bytes)
        return w

    return rows


def _read_table(source: RowSource) -> torch.Tensor:
    """A whole table in the loader's dtype, filled a row block at a time: E2B's per-layer table is 262144 x
    8960, and dequantizing it in one go would hold it in float32 on top of the result."""
    out = torch.empty(source.shape, dtype=source.dtype, device=source.device)
    step = max(1, _BLOCK_BYTES // (4 * source.shape[1]))
    for a, block in zip(range(0, source.shape[0], step), source.split(step), strict=True):
        out[a:a + block.shape[0]] = block
    return out
