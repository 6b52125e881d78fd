"""Write a Gemma 4 GGUF the way llama.cpp's converter (convert_hf_to_gguf.py, `Gemma4Model`) lays one out.

This is the test side's independent picture of the format, written from llama.cpp's converter and loader
(conversion/gemma.py, src/models/gemma4.cpp, src/llama-vocab.cpp), not from gemmakit's exporter: if the two
disagreed with each other, only llama.cpp running this file (tests/test_gguf_gemma4.py) can say which is right.
What the converter does, and so what is done here:

- metadata: the generic TextModel keys, Gemma 3's overrides, then Gemma 4's: `key_length` is the *global*
  head size and `key_length_swa` the sliding one, `sliding_window_pattern` is one bool per layer,
  `head_count_kv` becomes a per-layer array when the config has num_global_key_value_heads,
  `feed_forward_length` a per-layer array when use_double_wide_mlp is on, `rope.dimension_count` is the whole
  global head (proportional RoPE is carried by the `rope_freqs` tensor instead), plus shared_kv_layers,
  embedding_length_per_layer_input, expert_feed_forward_length, final_logit_softcapping;
- tensors: names from gguf's own map for MODEL_ARCH.GEMMA4, in the checkpoint's (sorted) order after the
  generated `rope_freqs` (ones for rotated pairs, 1e30 for the others); norms stored as they are;
  `layer_scalar` and the fused experts get a `.weight` suffix; the router's `scale` becomes
  `ffn_gate_inp.scale` and `per_expert_scale` becomes `ffn_down_exps.scale`; `lm_head` is dropped (tied);
- vocabulary: tokenizer model "gemma4" (llama.cpp's SentencePiece-style BPE) with the tokenizer.json pieces,
  a -1000 score for each, BYTE/CONTROL/NORMAL types as gguf's LlamaHfVocab gives them, the seven tokens
  Gemma 4's converter marks USER_DEFINED, the BPE merges, and no `tokenizer.ggml.pre` key.

`qtype` picks the tensor types: F32/F16 as `--outtype`, or Q8_0/Q4_0 as llama-quantize would (one- and
three-element-wide vectors stay F32, the router stays F32, and matrices whose rows are not whole 32-value
blocks fall back to F16). `wide` names tensors to keep at Q8_0 in a Q4_0 file, as "dynamic" quants do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

T = gguf.GGMLQuantizationType

# Gemma 4's special tokens at their real ids (all of them fit in a 1000-entry vocabulary but the image and
# audio markers, which live past 255999).
SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 46: "<|tool>", 47: "<tool|>",
            48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
            98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>"}
# What Gemma4Model.set_vocab turns from CONTROL into USER_DEFINED, so that a chat parser sees them as text.
VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
           '<|"|>'}
BYTES_AT = 238  # <0x00>..<0xFF> are ids 238..493 in Gemma 4's vocabulary

CORPUS = """The quick brown fox jumps over the lazy dog. A model reads text as tokens, and tokens are pieces.
Gemma runs on a laptop; it answers questions, writes code and counts: 1, 2, 3, 10, 42, 100, 2026.
def add(a, b):
    return a + b

    indented   with  runs   of spaces	and	tabs.
Über café naïve résumé — “quotes” and ‘single’ ones… 日本語のテキスト and 中文 text, emoji 🙂.
<|turn>user
Hello there!<turn|>
<|turn>model
Hi! How can I help you today?<turn|>


"""

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
                 "\n{{ m['content'] | trim }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n"
                 "{% endif %}")


def build_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small BPE vocabulary laid out like Gemma 4's: specials at their
    ids, byte pieces at 238..493, pieces trained on CORPUS (spaces as "▁", split at newline runs) elsewhere."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    free = [i for i in range(vocab_size) if i not in SPECIALS and not BYTES_AT <= i < BYTES_AT + 256]
    trainer_tok = Tokenizer(BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    # The specials are added tokens, as in Gemma's tokenizer.json: the corpus is cut around them, never merged
    # into them, and they take no trained id.
    trainer = BpeTrainer(vocab_size=len(free) + len(SPECIALS), show_progress=False,
                         special_tokens=list(SPECIALS.values()))
    trainer_tok.train_from_iterator([CORPUS] * 3, trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    trained = [p for p in sorted(model["vocab"], key=model["vocab"].get) if p not in SPECIALS.values()]
    if len(trained) > len(free):
        raise ValueError(f"the trained vocabulary has {len(trained)} pieces for {len(free)} free ids")
    tokens = [f"<unused{i}>" for i in range(vocab_size)]  # ids the corpus did not fill: never produced
    types = [gguf.TokenType.NORMAL] * vocab_size
    for i, piece in SPECIALS.items():
        tokens[i] = piece
        types[i] = gguf.TokenType.USER_DEFINED if piece in VISIBLE else gguf.TokenType.CONTROL
    for b in range(256):
        tokens[BYTES_AT + b], types[BYTES_AT + b] = f"<0x{b:02X}>", gguf.TokenType.BYTE
    for i, piece in zip(free, trained, strict=False):
        tokens[i] = piece
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    if len(set(tokens)) != len(tokens):
        raise ValueError("the vocabulary has duplicate pieces")
    return tokens, [int(t) for t in types], merges


def _gguf_names(hf: dict[str, Any], n_layers: int) -> dict[str, str]:
    """HF checkpoint name -> GGUF tensor name, as Gemma4Model.filter_tensors/modify_tensors rename them."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_layers)
    out = {}
    for key in sorted(hf):
        if key == "lm_head.weight":
            continue
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith("router.scale"):
            out[key] = f"blk.{layer}.ffn_gate_inp.scale"
        elif key.endswith("router.per_expert_scale"):
            out[key] = f"blk.{layer}.ffn_down_exps.scale"
        else:
            name = key if key.endswith(".weight") else key + ".weight"  # layer_scalar, experts.*_proj
            mapped = names.get_name(name, try_suffixes=(".weight",))
            if mapped is None:
                raise KeyError(f"gguf has no GEMMA4 name for {key}")
            out[key] = mapped
    return out


def _tensor_type(name: str, a: np.ndarray, qtype: T, wide: tuple[str, ...]) -> T:
    if a.ndim == 1 or name.startswith("rope_freqs") or ".ffn_gate_inp." in name or qtype in (T.F32,):
        return T.F32
    if qtype == T.F16:
        return T.F16
    if a.shape[-1] % 32:
        return T.F16
    return T.Q8_0 if any(w in name for w in wide) else qtype


def write_gemma4_gguf(path: str | Path, hf_config: dict[str, Any], state: dict[str, torch.Tensor],
                      qtype: T = T.F32, wide: tuple[str, ...] = (), vocab: tuple | None = None,
                      skip_keys: tuple[str, ...] = (), extra: tuple[tuple[str, Any], ...] = (),
                      arch: str = "gemma4") -> dict[str, torch.Tensor]:
    """Write `state` (an HF Gemma4ForCausalLM state dict) with `hf_config` (its config.json dict) as a Gemma 4
    GGUF. Returns {HF key: the tensor as stored, dequantized}, to build the model the file describes.
    `skip_keys` leaves out metadata (GGUFWriter method names without add_), `extra` adds (method, value)
    calls at the end (overwriting), and `arch` renames the architecture: for damaged-file tests."""
    h = hf_config
    n_layers = h["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), arch)
    _write_hparams(w, h, n_layers, skip_keys)
    for method, value in extra:
        getattr(w, f"add_{method}")(value)
    tokens, types, merges = vocab or build_vocab(h["vocab_size"])
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * len(tokens))
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_add_space_prefix(False)

    stored: dict[str, torch.Tensor] = {}
    full = h["rope_parameters"]["full_attention"]
    n_rot = int(h["global_head_dim"] * full["partial_rotary_factor"] / 2)
    freqs = np.array([1.0] * n_rot + [1e30] * (h["global_head_dim"] // 2 - n_rot), dtype=np.float32)
    tensors = [("", "rope_freqs.weight", freqs)]
    tensors += [(key, name, state[key].detach().float().numpy()) for key, name in _gguf_names(state, n_layers).items()]
    for key, name, a in tensors:
        kind = _tensor_type(name, a, qtype, wide)
        if kind in (T.F32, T.F16):
            data = a.astype(np.float32 if kind == T.F32 else np.float16)
            w.add_tensor(name, data)
            back = data.astype(np.float32)
        else:
            data = gguf.quants.quantize(a, kind)
            w.add_tensor(name, data, raw_dtype=kind)
            back = gguf.quants.dequantize(data, kind).reshape(a.shape)
        if key:
            stored[key] = torch.from_numpy(np.ascontiguousarray(back))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _write_hparams(w: gguf.GGUFWriter, h: dict[str, Any], n_layers: int, skip: tuple[str, ...]) -> None:
    """The keys in the order the converter's set_gguf_parameters chain writes them (later calls overwrite)."""
    swa = [t == "sliding_attention" for t in h["layer_types"]]
    rope = h["rope_parameters"]
    first_shared = n_layers - h["num_kv_shared_layers"]
    calls: list[tuple[str, Any]] = [
        ("block_count", n_layers), ("context_length", h["max_position_embeddings"]),
        ("embedding_length", h["hidden_size"]), ("feed_forward_length", h["intermediate_size"]),
        ("head_count", h["num_attention_heads"]), ("head_count_kv", h["num_key_value_heads"]),
        ("rope_freq_base", rope["full_attention"]["rope_theta"]),
        ("rope_freq_base_swa", rope["sliding_attention"]["rope_theta"]),
        ("layer_norm_rms_eps", h["rms_norm_eps"]),
    ]
    if h.get("num_experts"):
        calls += [("expert_count", h["num_experts"]), ("expert_used_count", h["top_k_experts"])]
    calls += [("key_length", h["head_dim"]), ("value_length", h["head_dim"]), ("file_type", 0)]
    if h.get("final_logit_softcapping"):
        calls.append(("final_logit_softcapping", h["final_logit_softcapping"]))
    calls += [("sliding_window", h["sliding_window"]), ("shared_kv_layers", h["num_kv_shared_layers"]),
              ("embedding_length_per_layer_input", h.get("hidden_size_per_layer_input") or 0),
              ("sliding_window_pattern", swa), ("key_length", h["global_head_dim"]),
              ("value_length", h["global_head_dim"]), ("key_length_swa", h["head_dim"]),
              ("value_length_swa", h["head_dim"])]
    if h.get("moe_intermediate_size"):
        calls.append(("expert_feed_forward_length", h["moe_intermediate_size"]))
    if h.get("use_double_wide_mlp"):
        n_ff = h["intermediate_size"]
        calls.append(("feed_forward_length", [n_ff if i < first_shared else 2 * n_ff for i in range(n_layers)]))
    if h.get("num_global_key_value_heads") is not None:
        calls.append(("head_count_kv", [h["num_key_value_heads"] if s else h["num_global_key_value_heads"]
                                        for s in swa]))
    calls += [("rope_dimension_count", h["global_head_dim"]), ("rope_dimension_count_swa", h["head_dim"])]
    w.add_name(h.get("_name", "tiny-gemma4"))
    for method, value in calls:
        if method not in skip:
            getattr(w, f"add_{method}")(value)
