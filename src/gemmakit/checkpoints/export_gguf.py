"""Write a Gemma model as one GGUF file that llama.cpp runs (and gemmakit's own GGUF loader reads), through
the `gguf` library's `GGUFWriter`: no binary format of ours. This module holds the entry point and Gemma 3.

The file is what llama.cpp's converter would write for the same checkpoint, with three choices made explicit:
- names: gguf's own HF->GGUF tensor name map for GEMMA3 (the one `gguf.py` inverts to read), no table of ours;
  the head is tied, so there is no `output.weight`, and llama.cpp reuses the embedding, as for the releases;
- values: Gemma 3 norms are stored as the effective multiplier 1 + w and kept in f32 with every other 1-D
  tensor (llama.cpp's kernels expect f32 there); matrices take the asked type (f32, f16, bf16, q8_0 or q4_0, the
  last two through `gguf.quants`, with f16 for a matrix whose rows are not whole blocks, as the converter);
- hyperparameters: besides the converter's keys, the sliding/full pattern is written as one flag per layer and
  the local RoPE theta as `rope.freq_base_swa`, so llama.cpp runs the model's own pattern and thetas rather
  than its defaults. What llama.cpp cannot be told is checked instead: it derives the attention scale from the
  geometry, so a model whose `query_pre_attn_scalar` disagrees with that rule is refused.

The vocabulary is llama.cpp's SentencePiece description ("llama": pieces, scores, token types). A tokenizer
read from a GGUF hands back that file's exact arrays (`Tokenizer.gguf_source`). Otherwise the arrays are
derived from the byte-fallback BPE behind the tokenizer so that llama.cpp's SPM merging reproduces it: a
piece's score is minus the rank of the first BPE merge that makes it (llama.cpp merges the best-scored pair
first), special added tokens become control tokens, other added tokens user-defined ones (matched whole in the
raw text, as `tokenizers` does), `<0xNN>` pieces byte tokens.

Gemma 4 goes through export_gguf4.py (llama.cpp's gemma4 architecture, with its BPE vocabulary); both share
the streaming writer of gguf_write.py, which also holds what the two have in common: an existing file is
never overwritten, the file is written beside its destination and renamed into place, and a packed,
quantized or LoRA-wrapped model is refused as by `export_hf`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from gemmakit.checkpoints.export import _plain_state
from gemmakit.checkpoints.export_gguf4 import write_gemma4_gguf
from gemmakit.checkpoints.gguf_write import (
    SPECIAL_SCORE,
    Entry,
    Q,
    T,
    Vocab,
    add_special_ids,
    bpe_spec,
    check_destination,
    check_dtype,
    padded,
    source_metadata,
    tensor_type,
    write_file,
)
from gemmakit.config import SLIDING, Config

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def export_gguf(model: nn.Module, path: str | Path, tokenizer: Any, dtype: str = "f16") -> Path:
    """Write `model` (a plain Gemma 3 or Gemma 4) with `tokenizer`'s vocabulary as the GGUF file `path`
    (`dtype`: f32, f16, bf16, q8_0 or q4_0 for the matrices); returns it."""
    check_dtype(dtype)
    path = check_destination(path)
    if tokenizer is None:
        raise ValueError("a GGUF file carries its vocabulary, so export_gguf needs the model's tokenizer")
    config: Config = model.config
    if config.is_gemma4:
        return write_gemma4_gguf(path, config, _plain_state(model), tokenizer, dtype)
    check_config(config)
    state = _plain_state(model)
    qtype, file_type = check_dtype(dtype)
    entries = tensor_plan(state, config.num_hidden_layers, qtype)  # before any file: an unknown tensor fails here
    vocab = padded(gguf_vocab(tokenizer), config.vocab_size)

    def metadata(w: gguf.GGUFWriter) -> None:
        add_hparams(w, config, file_type)
        add_vocab(w, vocab, tokenizer)

    written = write_file(path, gguf.MODEL_ARCH.GEMMA3, metadata, entries)
    if config.media_type == "gemma3" and hasattr(model.model, "vision_tower"):
        export_mmproj(model, mmproj_path(written), "f32" if dtype == "f32" else "f16")
    return written


def mmproj_path(text_gguf: Path) -> Path:
    """Where the towers of `text_gguf` go: beside it, named as llama.cpp's releases name them."""
    return text_gguf.with_name(f"mmproj-{text_gguf.stem}.gguf")


def export_mmproj(model: nn.Module, path: Path, dtype: str) -> Path:
    """A Gemma 3 model's SigLIP tower and projector as llama.cpp's mmproj file."""
    from gemmakit.checkpoints.mmproj import write_mmproj
    from gemmakit.media.towers import is_tower

    mm = model.config.multimodal or {}
    towers = {k: v.detach() for k, v in model.state_dict().items() if is_tower(k)}
    return write_mmproj(path, mm.get("vision_config") or {}, towers, text_hidden_size=model.config.hidden_size,
                        mm_tokens_per_image=int(mm.get("mm_tokens_per_image", 256)), dtype=dtype)


def check_config(config: Config) -> None:
    """Refuse what llama.cpp's gemma3 architecture would run differently from the model."""
    if config.family != "gemma3" or config.partial_rotary_factor != 1.0 or config.global_head_dim not in (
            None, config.head_dim):
        raise ValueError(f"{config.name}: only Gemma 3 geometry (one head_dim, full rotary) fits llama.cpp's gemma3")
    # llama.cpp stores no attention scale: it takes (hidden / heads)**-0.5 for the 62-layer 27B, else
    # head_dim**-0.5 (llama-model gemma3.cpp), which is what every released Gemma 3 uses.
    heads = config.num_attention_heads
    llama_scale = (config.hidden_size // heads if config.num_hidden_layers == 62 else config.head_dim) ** -0.5
    if not math.isclose(config.attention_scale, llama_scale, rel_tol=1e-6):
        raise ValueError(f"{config.name}: attention scale {config.attention_scale:.6g} (query_pre_attn_scalar "
                         f"{config.query_pre_attn_scalar}) differs from the {llama_scale:.6g} llama.cpp derives "
                         "from the geometry, so llama.cpp would run another model")


def add_hparams(w: gguf.GGUFWriter, c: Config, file_type: gguf.LlamaFileType) -> None:
    w.add_name(c.name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_sliding_window(c.sliding_window)
    # One flag per layer: llama.cpp's default (every 6th layer full) differs from a pattern whose last
    # layer is forced full when the layer count is not a multiple of 6.
    w.add_sliding_window_pattern([kind == SLIDING for kind in c.layer_types])
    w.add_rope_freq_base(c.rope_theta)  # full layers
    w.add_rope_freq_base_swa(c.rope_local_base_freq)
    if c.rope_scaling_factor != 1.0:  # llama.cpp scales only the full layers, as Gemma 3 does
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_plan(state: dict[str, torch.Tensor], n_layers: int, qtype: Q) -> list[Entry]:
    """Every tensor under its GGUF name, in the model's order; norms store the multiplier 1 + w."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layers)
    plan = []
    for key, t in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ""))
        if name is None:
            raise ValueError(f"parameter {key} has no GGUF name in llama.cpp's gemma3 architecture")
        shape = tuple(t.shape)
        shift = 1.0 if name.endswith("norm.weight") else 0.0
        plan.append(Entry(name, shape, tensor_type(name, shape, qtype), lambda t=t: t, shift, key))
    return plan


def add_vocab(w: gguf.GGUFWriter, vocab: Vocab, tokenizer: Any) -> None:
    w.add_tokenizer_model("llama")  # llama.cpp's SentencePiece vocabulary, as for every Gemma 1-3 GGUF
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    add_special_ids(w, tokenizer, vocab.unk_id)


# ---------------------------------------------------------------------------------------------
# The vocabulary: the source GGUF's arrays when there is one, else derived from the BPE.


def gguf_vocab(tokenizer: Any) -> Vocab:
    meta = source_metadata(tokenizer)
    if meta is not None and "tokenizer.ggml.scores" in meta and "tokenizer.ggml.token_type" in meta:
        return Vocab(list(meta["tokenizer.ggml.tokens"]), meta["tokenizer.ggml.scores"].tolist(),
                     meta["tokenizer.ggml.token_type"].tolist(), meta.get("tokenizer.ggml.unknown_token_id"))
    return vocab_of_backend(tokenizer)


def vocab_of_backend(tokenizer: Any) -> Vocab:
    """Pieces, scores and types under which llama.cpp's SPM tokenizer splits text as the BPE does."""
    model, tokens, added, unk_id = bpe_spec(tokenizer, "SentencePiece")
    ranks = merge_ranks(model.get("merges") or [])
    vocab = Vocab([], [], [], unk_id)
    for i, piece in enumerate(tokens):
        text, kind, score = _entry(piece, added.get(i), ranks, i == unk_id)
        vocab.tokens.append(text)
        vocab.types.append(kind)
        vocab.scores.append(score)
    return vocab


def merge_ranks(merges: list[Any]) -> dict[str, int]:
    """Each piece's best merge rank (merges are [left, right] pairs, or "left right" in older files)."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        ranks.setdefault(left + right, rank)
    return ranks


def _entry(piece: str, added: dict[str, Any] | None, ranks: dict[str, int], unk: bool) -> tuple[str, int, float]:
    if added is not None and added["special"]:
        return piece, T.CONTROL, SPECIAL_SCORE
    if added is not None:
        # A normalized added token matches after spaces became "▁"; llama.cpp matches user-defined tokens in
        # the raw text, before that escape, so it gets the spelling with real spaces.
        text = piece.replace("\u2581", " ") if added.get("normalized") else piece
        return text, T.USER_DEFINED, SPECIAL_SCORE
    if unk:
        return piece, T.UNKNOWN, SPECIAL_SCORE
    if _BYTE_PIECE.fullmatch(piece):
        return piece, T.BYTE, 0.0
    # Pieces no merge makes (single characters) rank below every merge; llama.cpp only scores merge results.
    return piece, T.NORMAL, -float(ranks.get(piece, len(ranks)))
