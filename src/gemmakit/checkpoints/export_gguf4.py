"""Write a Gemma 4 text model as llama.cpp's gemma4 architecture: what its converter (convert_hf_to_gguf.py,
`Gemma4Model`) writes for the same checkpoint, so that llama.cpp's gemma4 loader and graph run it.

What differs from Gemma 3, and why each piece is written as it is:
- geometry per layer: full layers have their own head size (`key_length` / `value_length`, with the sliding
  layers' in the `_swa` keys), KV-head count (`head_count_kv` one per layer when K = V layers have their own)
  and MLP width (`feed_forward_length` one per layer for E2B's double-wide shared layers); the pattern is one
  flag per layer; `shared_kv_layers` tells llama.cpp which trailing layers reuse an earlier layer's cache;
- RoPE: full layers rotate only a fraction of their frequency pairs with the exponent over the whole head.
  llama.cpp's NeoX rope rotates all `rope.dimension_count` (= the full head) pairs, so the converter adds a
  `rope_freqs` tensor dividing each pair's frequency: 1 for the rotated pairs, 1e30 (no rotation) for the
  rest. Sliding layers rotate all of their `rope.dimension_count_swa`;
- norms multiply by w as stored (no 1 + w); the layer scalar is `layer_output_scale`, the router's learned
  scale `ffn_gate_inp.scale` and its per-expert scale `ffn_down_exps.scale` (llama.cpp scales each expert's
  output, which equals HF scaling its routing weight); the fused experts keep HF's layout, gate_up [E, 2I, H]
  and down [E, H, I], which is llama.cpp's [H, 2I, E] / [I, H, E] read fastest-first; PLE tables and
  projections take gguf's names. A K = V layer simply has no `attn_v` (llama.cpp then uses K as V), and a
  KV-shared layer no `attn_k` / `attn_v` / `attn_k_norm`;
- vocabulary: tokenizer model "gemma4", a BPE over whole characters with "▁" for spaces and `<0xNN>` byte
  fallback, which llama.cpp reproduces from the pieces and the merges in rank order; every score is -1000
  (BPE does not use them); special added tokens are control tokens, other added tokens and the channel and
  tool markers the converter keeps visible are user-defined. A tokenizer read from a gemma4 GGUF hands back
  that file's arrays unchanged.

What llama.cpp cannot be told is refused: RoPE scaling on a Gemma 4 model, a PLE table whose rows are not the
vocabulary's, and KV sharing laid out otherwise than in the releases (llama.cpp derives each shared layer's
source from its type instead of reading it).

`write_gemma4_gguf` takes a Config and a way to get each tensor by its HF name, so a file of a released model's
shape can be written without building the model (gguf_write.py says how the tensors stream).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import torch

from gemmakit.checkpoints.gguf_gemma4 import kv_sharing_disagreement
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
from gemmakit.config import FULL, SLIDING, Config

ARCH = gguf.MODEL_ARCH.GEMMA4
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Markers the converter types user-defined so that llama.cpp always renders them (its chat parser reads them).
VISIBLE = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                     "<tool_response|>", '<|"|>'})
_ROPE_OFF = 1e30  # a frequency divisor that leaves a pair unrotated


def write_gemma4_gguf(path: str | Path, config: Config,
                      tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
                      tokenizer: Any = None, dtype: str = "f16") -> Path:
    """Write a Gemma 4 GGUF at `path` from `config` and `tensors`, a mapping or a callable giving each tensor by
    its HF state-dict name (`hf_shapes(config)` lists the names and shapes), fetched once each, in file order,
    just before it is written. `tokenizer`: a gemmakit Tokenizer, or None for a placeholder byte vocabulary
    (a file for benchmarks; it does not tokenize text like Gemma). Returns `path`."""
    qtype, file_type = check_dtype(dtype)
    path = check_destination(path)
    check_config(config)
    shapes = hf_shapes(config)
    fetch = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    if isinstance(tensors, Mapping) and (odd := set(tensors) ^ set(shapes)):
        key = sorted(odd)[0]
        where = "is missing from the tensors" if key in shapes else f"has no place in {config.name}'s layout"
        raise ValueError(f"{key} {where} ({len(odd)} such names): the tensors and the config disagree")
    entries = tensor_plan(config, shapes, fetch, qtype)
    vocab = padded(placeholder_vocab() if tokenizer is None else bpe_vocab(tokenizer), config.vocab_size)
    if not vocab.merges:
        raise ValueError("the tokenizer has no BPE merges, and llama.cpp's gemma4 vocabulary cannot load without them")

    def metadata(w: gguf.GGUFWriter) -> None:
        add_hparams(w, config, file_type)
        add_vocab(w, vocab, tokenizer)

    return write_file(path, ARCH, metadata, entries)


def check_config(c: Config) -> None:
    """Refuse what llama.cpp's gemma4 architecture would run differently from the model."""
    if not c.is_gemma4:
        raise ValueError(f"{c.name} is not a Gemma 4 model")
    if c.rope_scaling_factor != 1.0:
        raise ValueError(f"{c.name}: RoPE scaling (factor {c.rope_scaling_factor}) on a Gemma 4 model has no "
                         "place in llama.cpp's gemma4 architecture")
    if (odd := kv_sharing_disagreement(c)) is not None:
        i, llama_source = odd
        raise ValueError(f"{c.name}: KV-shared layer {i} reads layer {c.kv_source(i)}'s keys and values, but "
                         f"llama.cpp's gemma4 would give it layer {llama_source}'s (it expects the last "
                         "non-shared layer to be full and the one before it sliding)")
    if c.hidden_size_per_layer_input and c.vocab_size_per_layer_input != c.vocab_size:
        raise ValueError(f"{c.name}: llama.cpp's gemma4 needs the PLE table to have one row per token "
                         f"({c.vocab_size}), not {c.vocab_size_per_layer_input}")


def hf_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of `config`'s model by HF state-dict name, with its shape, from the model code itself
    built on the meta device (no memory)."""
    from gemmakit.model import Gemma

    with torch.device("meta"):
        model = Gemma(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def gguf_name(key: str, names: gguf.TensorNameMap) -> str:
    """The converter's GGUF name for an HF key (it appends ".weight" to the bare layer_scalar and experts)."""
    if key.endswith(".router.scale"):
        return names.get_name(key.removesuffix(".scale") + ".proj") + ".scale"  # blk.N.ffn_gate_inp.scale
    if key.endswith(".router.per_expert_scale"):
        return names.get_name(key.removesuffix("router.per_expert_scale") + "experts.down_proj") + ".scale"
    if not key.endswith(".weight"):
        key += ".weight"
    name = names.get_name(key, try_suffixes=(".weight",))
    if name is None:
        raise ValueError(f"parameter {key} has no GGUF name in llama.cpp's gemma4 architecture")
    return name


def tensor_plan(config: Config, shapes: dict[str, tuple[int, ...]], fetch: Callable[[str], torch.Tensor],
                qtype: Q) -> list[Entry]:
    """`rope_freqs` (the proportional-RoPE divisors of full layers), then every model tensor in model order."""
    names = gguf.get_tensor_name_map(ARCH, config.num_hidden_layers)
    plan = []
    if FULL in config.layer_types:
        freqs = rope_freqs(config)
        plan.append(Entry("rope_freqs.weight", tuple(freqs.shape), Q.F32, lambda: freqs))
    for key, shape in shapes.items():
        name = gguf_name(key, names)
        plan.append(Entry(name, shape, tensor_type(name, shape, qtype), lambda key=key: fetch(key), source=key))
    return plan


def rope_freqs(c: Config) -> torch.Tensor:
    """One divisor per frequency pair of a full layer's head: 1 where the model rotates, 1e30 where not."""
    head = c.global_head_dim or c.head_dim
    rotated = int(c.partial_rotary_factor * head // 2)
    return torch.tensor([1.0] * rotated + [_ROPE_OFF] * (head // 2 - rotated), dtype=torch.float32)


def add_hparams(w: gguf.GGUFWriter, c: Config, file_type: gguf.LlamaFileType) -> None:
    L = c.num_hidden_layers
    full_head = c.global_head_dim or c.head_dim
    w.add_name(c.name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(L)
    widths = [c.layer_intermediate(i) for i in range(L)]
    w.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
    w.add_head_count(c.num_attention_heads)
    # The converter writes one count per layer when full layers have their own (K = V models).
    kv = [c.layer_kv_heads(i) for i in range(L)]
    w.add_head_count_kv(kv if c.attention_k_eq_v and c.num_global_key_value_heads else c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(full_head)
    w.add_value_length(full_head)
    w.add_key_length_swa(c.head_dim)
    w.add_value_length_swa(c.head_dim)
    w.add_rope_dimension_count(full_head)  # the rest of the pairs are switched off by rope_freqs
    w.add_rope_dimension_count_swa(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_freq_base_swa(c.rope_local_base_freq)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([kind == SLIDING for kind in c.layer_types])
    w.add_shared_kv_layers(c.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input)
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if c.enable_moe_block:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k_experts)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------
# The vocabulary: llama.cpp's "gemma4" BPE (pieces, types and merges).


def add_vocab(w: gguf.GGUFWriter, vocab: Vocab, tokenizer: Any) -> None:
    w.add_tokenizer_model("gemma4")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    if tokenizer is None:
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
        return
    add_special_ids(w, tokenizer, vocab.unk_id)


def bpe_vocab(tokenizer: Any) -> Vocab:
    meta = source_metadata(tokenizer)
    if meta is not None and meta.get("tokenizer.ggml.model") == "gemma4" and "tokenizer.ggml.merges" in meta:
        n = len(meta["tokenizer.ggml.tokens"])
        scores = meta["tokenizer.ggml.scores"].tolist() if "tokenizer.ggml.scores" in meta else [SPECIAL_SCORE] * n
        return Vocab(list(meta["tokenizer.ggml.tokens"]), scores, meta["tokenizer.ggml.token_type"].tolist(),
                     meta.get("tokenizer.ggml.unknown_token_id"), list(meta["tokenizer.ggml.merges"]))
    return vocab_of_backend(tokenizer)


def vocab_of_backend(tokenizer: Any) -> Vocab:
    """Pieces, types and merges of the `tokenizers` BPE behind `tokenizer`, as the converter lists them."""
    model, tokens, added, unk_id = bpe_spec(tokenizer, "gemma4")
    types = [_token_type(piece, added.get(i), i == unk_id) for i, piece in enumerate(tokens)]
    return Vocab(tokens, [SPECIAL_SCORE] * len(tokens), types, unk_id, merge_strings(model.get("merges") or []))


def _token_type(piece: str, added: dict[str, Any] | None, unk: bool) -> int:
    if piece in VISIBLE:
        return int(T.USER_DEFINED)
    if unk or (added is not None and added["special"]):
        return int(T.CONTROL)
    if added is not None:
        return int(T.USER_DEFINED)
    return int(T.BYTE if _BYTE_PIECE.fullmatch(piece) else T.NORMAL)


def merge_strings(merges: list[Any]) -> list[str]:
    """Merges as llama.cpp reads them, "left right"; a space inside a piece is written as U+0120, as the
    converter does (llama.cpp splits each merge at its first space)."""
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
            continue
        out.append(" ".join(part.replace(" ", "\u0120") for part in merge))
    return out


def placeholder_vocab() -> Vocab:
    """<pad>, <eos>, <bos>, <unk>, the 256 byte pieces and "▁▁" (one merge, which llama.cpp requires)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", "\u2581\u2581"]
    types = [int(T.CONTROL)] * 4 + [int(T.BYTE)] * 256 + [int(T.NORMAL)] * 2
    return Vocab(tokens, [SPECIAL_SCORE] * len(tokens), types, 3, ["\u2581 \u2581"])
