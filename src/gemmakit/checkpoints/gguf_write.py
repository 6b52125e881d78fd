"""The part of GGUF export that does not depend on the architecture: choosing each tensor's type, and writing
a file through the `gguf` library's `GGUFWriter` one tensor at a time.

Why streaming: `GGUFWriter.add_tensor` keeps every converted tensor until the file is closed, which for a
26B model is a second copy of it in memory. Here every tensor's info goes into the header first (its size
follows from its shape and type alone), then each tensor is fetched, converted and written in turn and let go,
so the memory on top of the source model is about one converted tensor. The conversion itself walks the rows
in chunks, so a bf16 source never exists whole as f32 either. Float types are rounded by torch straight into
the output (to nearest even, the same bytes as `gguf.quants`, several times faster), Q8_0 and Q4_0 by `gguf.quants`.
A fetch may produce its tensor on the spot (a benchmark writes random weights of a released shape without
building the model).

Types follow llama.cpp's converter: 1-D tensors, norms, scales and the MoE router stay f32 (llama.cpp's
kernels expect f32 there); other matrices take the asked type, and a matrix whose rows are not whole Q8_0
blocks falls back to f16. The file is written beside its destination and renamed into place, and an existing
file is never overwritten.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from gemmakit.files import write_atomic

Q = gguf.GGMLQuantizationType
T = gguf.TokenType
# --gguf-type -> (the type of matrices, the file type llama.cpp reports)
DTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
          "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
SPECIAL_SCORE = -1000.0  # what the converter gives control / user-defined / padding tokens
_CHUNK = 1 << 22  # elements converted at a time
# float GGUF types -> (the numpy dtype holding them, the torch dtype viewing that memory)
_FLOATS = {Q.F32: (np.float32, torch.float32), Q.F16: (np.float16, torch.float16), Q.BF16: (np.int16, torch.bfloat16)}


@dataclass
class Vocab:
    """A GGUF vocabulary: one piece, score and token type per id (and BPE merges for llama.cpp's gemma4)."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int | None = None
    merges: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """One tensor of the file: its GGUF name, shape (PyTorch order), type, and how to get it."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    fetch: Callable[[], torch.Tensor]
    shift: float = 0.0  # added before conversion (Gemma 3 norms store 1 + w)
    source: str = ""  # the HF name it comes from, for errors


def check_dtype(dtype: str) -> tuple[Q, gguf.LlamaFileType]:
    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF type {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_destination(path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new file name (nothing is overwritten)")
    return path


def tensor_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """The converter's choice: f32 for what llama.cpp reads only as f32, else `qtype` where rows fit it."""
    if len(shape) <= 1 or name.endswith(("norm.weight", ".scale")) or ".ffn_gate_inp." in name:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def write_file(path: Path, arch: gguf.MODEL_ARCH, metadata: Callable[[gguf.GGUFWriter], None],
               entries: list[Entry]) -> Path:
    """Write `entries` (after `metadata` adds the key/values) as the GGUF file `path`, atomically."""

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            metadata(w)
            for e in entries:
                shape = gguf.quant_shape_to_byte_shape(e.shape, e.qtype)
                w.add_tensor_info(e.name, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=e.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for e in entries:
                w.write_tensor_data(convert(e))
        finally:
            w.close()

    write_atomic(path, write)
    return path


def convert(e: Entry) -> np.ndarray:
    """`e`'s tensor in its GGUF type, converted a chunk of rows at a time into one output array."""
    t = e.fetch().detach()
    if tuple(t.shape) != e.shape:
        raise ValueError(f"{e.source or e.name}: got a tensor of shape {tuple(t.shape)}, expected {e.shape}")
    rows = t.reshape(-1, e.shape[-1] if e.shape else 1)
    step = max(1, _CHUNK // rows.shape[1])
    if e.qtype in _FLOATS:
        # Float types through torch, which rounds to nearest even as gguf.quants does, straight into the output
        # (no temporary per chunk) and on every thread.
        out = np.empty(tuple(rows.shape), _FLOATS[e.qtype][0])
        target = torch.from_numpy(out).view(_FLOATS[e.qtype][1])
        for r in range(0, rows.shape[0], step):
            chunk = rows[r:r + step]
            target[r:r + step].copy_(chunk.float() + e.shift if e.shift else chunk)
        return out
    blocks: np.ndarray | None = None  # block types through gguf.quants itself
    for r in range(0, rows.shape[0], step):
        a = rows[r:r + step].to("cpu", torch.float32).numpy()
        q = gguf.quants.quantize(a + e.shift if e.shift else a, e.qtype)
        if blocks is None:
            blocks = np.empty((rows.shape[0], *q.shape[1:]), q.dtype)
        blocks[r:r + step] = q
    assert blocks is not None
    return blocks


def padded(vocab: Vocab, vocab_size: int) -> Vocab:
    """Pad to the embedding's rows as the converter does ([PADi], unused): llama.cpp sizes the embedding by
    the token list."""
    n = len(vocab.tokens)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    pad = range(n, vocab_size)
    return Vocab(vocab.tokens + [f"[PAD{i}]" for i in pad], vocab.scores + [SPECIAL_SCORE] * len(pad),
                 vocab.types + [int(T.UNUSED)] * len(pad), vocab.unk_id, vocab.merges)


def add_special_ids(w: gguf.GGUFWriter, tokenizer: Any, unk_id: int | None) -> None:
    """Special token ids and flags, and the chat template, as the converter writes them for Gemma."""
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    if unk_id is not None:
        w.add_unk_token_id(unk_id)
    if tokenizer.pad_id is not None:
        w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)  # llama.cpp's SPM default is to prepend a space; Gemma does not
    if template := getattr(tokenizer, "chat_template", None):
        w.add_chat_template(template)


def source_metadata(tokenizer: Any) -> dict[str, Any] | None:
    """The metadata of the GGUF `tokenizer` was read from (`Tokenizer.gguf_source`), if that file is still there
    and unchanged: an export then writes that file's own vocabulary arrays instead of deriving them again."""
    source = getattr(tokenizer, "gguf_source", None)
    if source is None or not Path(source[0]).is_file():
        return None
    from gemmakit.tokenizer import read_gguf_metadata

    meta, digest = read_gguf_metadata(Path(source[0]))
    return meta if digest == source[1] else None


def bpe_spec(tokenizer: Any, vocabulary: str) -> tuple[dict[str, Any], list[str], dict[int, Any], int | None]:
    """(model spec, piece of each id, added tokens by id, unk id) of the byte-fallback BPE behind `tokenizer`,
    refused if it is another kind: llama.cpp's `vocabulary` (named in the error) can stand only for that."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ValueError(f"llama.cpp's {vocabulary} vocabulary can stand only for a byte-fallback BPE tokenizer "
                         f"like Gemma's, not a {model.get('type')} one")
    tokens = [tokenizer.backend.id_to_token(i) for i in range(tokenizer.vocab_size)]
    if None in tokens:
        raise ValueError(f"token id {tokens.index(None)} has no text; the tokenizer cannot be written to GGUF")
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    unk_id = tokenizer.backend.token_to_id(model["unk_token"]) if model.get("unk_token") else None
    return model, tokens, added, unk_id
