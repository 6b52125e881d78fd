"""The Gemma 4 side of GGUF loading: the config from `gemma4.*` metadata and the tensor names.

llama.cpp's converter (convert_hf_to_gguf.py, `Gemma4Model`) does not write a config.json; it spreads the
config over metadata keys and a few facts over the tensors themselves, and llama.cpp's loader
(`llama_model_gemma4::load_arch_hparams`, src/models/gemma4.cpp) reads them back the same way. So do we:

- sliding vs full layers: `attention.sliding_window_pattern`, one bool per layer (true = sliding);
- head sizes: `attention.key_length` is the *global* (full-layer) head, `attention.key_length_swa` the sliding
  one; value lengths must equal them (llama.cpp refuses the file otherwise);
- KV heads: `attention.head_count_kv`, a scalar or one entry per layer (full layers of 26B/31B/12B have fewer);
- K = V: full layers of those models store no `attn_v`; llama.cpp then uses the K projection as V, and so
  does `attention_k_eq_v`;
- FFN width: `feed_forward_length`, a scalar or one entry per layer (E2B's KV-shared layers are 2x wide);
- `attention.shared_kv_layers`, `embedding_length_per_layer_input` (PLE width, 0 = none), `expert_count`,
  `expert_used_count`, `expert_feed_forward_length`, `final_logit_softcapping`, `rope.freq_base` (full) and
  `rope.freq_base_swa` (sliding);
- proportional RoPE: the converter writes `rope.dimension_count` = the whole global head and a `rope_freqs`
  tensor of per-pair frequency divisors, 1 for the rotated pairs and 1e30 for the rest (angle ~0: cos 1,
  sin 0). That is exactly gemmakit's proportional RoPE with partial_rotary_factor = rotated pairs / all pairs
  (the exponent runs over the whole head in both), so the factor is read from the tensor, and a tensor
  holding any other divisors is refused rather than approximated.

Tensor names are gguf's own GEMMA4 map; what the map lacks is the converter's renaming of the router's
scales (`router.scale` -> `ffn_gate_inp.scale`, `per_expert_scale` -> `ffn_down_exps.scale`) and the
`.weight` it appends to `layer_scalar` and the fused experts. Norms are stored as they are (no 1 + w).
"""

from __future__ import annotations

import re
from typing import Any

import gguf
import numpy as np

from gemmakit.checkpoints.common import CheckpointError
from gemmakit.config import FULL, SLIDING, Config

_UNROTATED = 1e20  # a rope_freqs divisor at least this large leaves a pair unrotated (the converter writes 1e30)


def gemma4_config(m: Any, tensors: dict[str, Any], path: Any) -> dict[str, Any]:
    """Config kwargs for a Gemma 4 file. `m` is gguf.py's typed metadata reader, `tensors` the file's tensors
    by name. Anything the model cannot represent is a CheckpointError naming the key."""
    n = m.integer("block_count")
    layer_types = [SLIDING if swa else FULL for swa in m.flags("attention.sliding_window_pattern", n)]
    full = [i for i, kind in enumerate(layer_types) if kind == FULL]
    n_shared = m.integer("attention.shared_kv_layers", 0)
    if n_shared >= n:
        raise CheckpointError(f"{path}: gemma4.attention.shared_kv_layers = {n_shared} leaves no layer with its "
                              f"own K/V in a {n}-layer model; the file is damaged: re-convert it")
    heads = _one(m, "attention.head_count", m.per_layer("attention.head_count", n), range(n))
    head_dim, global_head_dim = m.integer("attention.key_length_swa"), m.integer("attention.key_length")
    for key, want in (("attention.value_length_swa", head_dim), ("attention.value_length", global_head_dim),
                      ("rope.dimension_count_swa", head_dim), ("rope.dimension_count", global_head_dim)):
        if m.integer(key, want) != want:
            raise CheckpointError(f"{path}: gemma4.{key} = {m.integer(key)} but Gemma 4 needs {want} there (the "
                                  "matching key length); gemmakit cannot run this file: re-convert it")
    kv = m.per_layer("attention.head_count_kv", n, heads)
    kv_swa = _one(m, "attention.head_count_kv", kv, [i for i in range(n) if i not in full] or full)
    kv_full = _one(m, "attention.head_count_kv", kv, full or range(n))
    k_eq_v = _k_eq_v(tensors, full, n - n_shared, path)
    if kv_full != kv_swa and not k_eq_v:
        raise CheckpointError(f"{path}: gemma4.attention.head_count_kv gives full layers {kv_full} KV heads and "
                              f"sliding ones {kv_swa}, which gemmakit supports only with K = V (no attn_v)")
    ff = m.per_layer("feed_forward_length", n)
    double = _double_wide(ff, n - n_shared, path)
    ple = m.integer("embedding_length_per_layer_input")
    n_experts = m.integer("expert_count", 0)
    kw: dict[str, Any] = dict(
        family="gemma4", num_hidden_layers=n, layer_types=layer_types, num_attention_heads=heads,
        hidden_size=m.integer("embedding_length"), head_dim=head_dim, global_head_dim=global_head_dim,
        num_key_value_heads=kv_swa, num_global_key_value_heads=kv_full if k_eq_v else None,
        attention_k_eq_v=k_eq_v, intermediate_size=ff[0], use_double_wide_mlp=double,
        num_kv_shared_layers=n_shared, hidden_size_per_layer_input=ple,
        sliding_window=m.integer("attention.sliding_window"),
        rms_norm_eps=m.number("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=m.integer("context_length", 131072),
        rope_theta=m.number("rope.freq_base", 1e6),
        partial_rotary_factor=_partial_rotary(tensors.get("rope_freqs.weight"), global_head_dim, path),
        final_logit_softcapping=m.number("final_logit_softcapping", None),
    )
    kw["rope_local_base_freq"] = m.number("rope.freq_base_swa", kw["rope_theta"])  # llama.cpp's default
    if n_experts:
        kw.update(enable_moe_block=True, num_experts=n_experts, top_k_experts=m.integer("expert_used_count"),
                  moe_intermediate_size=m.integer("expert_feed_forward_length"))
    if ple:
        table = tensors.get("per_layer_token_embd.weight")
        if table is None or len(table.shape) != 2:
            raise CheckpointError(f"{path}: gemma4.embedding_length_per_layer_input is {ple} but the file has no "
                                  "2-D per_layer_token_embd.weight tensor; re-convert it")
        kw["vocab_size_per_layer_input"] = int(table.shape[1])
    return kw


def _one(m: Any, key: str, values: list[int], layers: Any) -> int:
    """The one value `values` holds over `layers`; gemmakit has one such size per layer type."""
    seen = {values[i] for i in layers}
    if len(seen) != 1:
        raise CheckpointError(f"{m.path}: gemma4.{key} differs between layers of one type ({sorted(seen)}); "
                              "gemmakit supports one value per layer type")
    return seen.pop()


def _k_eq_v(tensors: dict[str, Any], full: list[int], first_shared: int, path: Any) -> bool:
    """K = V on full layers: their (non-shared) attn_v tensors are all absent."""
    own = [i for i in full if i < first_shared]
    has_v = {f"blk.{i}.attn_v.weight" in tensors for i in own}
    if len(has_v) > 1:
        raise CheckpointError(f"{path}: some full-attention layers have attn_v.weight and some do not; the file "
                              "is incomplete: re-convert it")
    return bool(own) and not has_v.pop()


def _double_wide(ff: list[int], first_shared: int, path: Any) -> bool:
    if all(f == ff[0] for f in ff):
        return False
    if all(f == (ff[0] if i < first_shared else 2 * ff[0]) for i, f in enumerate(ff)):
        return True
    raise CheckpointError(f"{path}: gemma4.feed_forward_length {ff} is neither one width nor E2B's pattern (2x on "
                          "the KV-shared layers); gemmakit cannot build this model")


def _partial_rotary(t: Any, global_head_dim: int, path: Any) -> float:
    """The share of rotated pairs that a `rope_freqs` tensor encodes (1.0 without one: all pairs rotate)."""
    if t is None:
        return 1.0
    pairs = global_head_dim // 2
    try:
        f = np.asarray(t.data, dtype=np.float32).reshape(-1) if t.tensor_type == gguf.GGMLQuantizationType.F32 else None
    except ValueError:
        f = None
    if f is None or f.size != pairs:
        raise CheckpointError(f"{path}: rope_freqs.weight should be {pairs} F32 values (one per pair of the "
                              f"{global_head_dim}-wide global head); re-convert the file")
    rotated = int(np.sum(f == 1.0))
    if not (np.all(f[:rotated] == 1.0) and np.all(f[rotated:] >= _UNROTATED)):
        raise CheckpointError(f"{path}: rope_freqs.weight is not proportional RoPE (ones, then >= 1e20 for "
                              "unrotated pairs); gemmakit does not run other RoPE frequency factors")
    return rotated / pairs


def kv_sharing_disagreement(config: Config) -> tuple[int, int] | None:
    """A GGUF does not say which layer a KV-shared layer reads: llama.cpp gives a sliding one the last-but-one
    non-shared layer and a full one the last (right for the released E2B/E4B, whose last two non-shared layers
    are sliding then full). The first shared layer where the model's rule (the last non-shared layer of the
    same type) differs, as (layer, the layer llama.cpp reads), or None where both agree."""
    first = config.first_kv_shared_layer
    for i in range(first, config.num_hidden_layers):
        theirs = first - (2 if config.layer_types[i] == SLIDING else 1)
        if config.kv_source(i) != theirs:
            return i, theirs
    return None


def check_kv_sharing(config: Config, path: Any) -> None:
    """Refuse a file whose KV sharing llama.cpp reads otherwise than the model: it does not describe one model."""
    if (odd := kv_sharing_disagreement(config)) is not None:
        i, theirs = odd
        raise CheckpointError(f"{path}: KV-shared layer {i} would read layer {theirs}'s K/V in llama.cpp but "
                              f"layer {config.kv_source(i)}'s here (gemma4.attention.shared_kv_layers = "
                              f"{config.num_kv_shared_layers} with this sliding_window_pattern); the file "
                              "does not describe one model: re-convert it")


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def gemma4_tensor_name(names: gguf.TensorNameMap, key: str) -> str | None:
    """The GGUF name llama.cpp's converter gives gemmakit's (= HF's) state-dict key `key`."""
    m = _LAYER.match(key)
    if m and key.endswith("router.scale"):
        return f"blk.{m.group(1)}.ffn_gate_inp.scale"
    if m and key.endswith("router.per_expert_scale"):
        return f"blk.{m.group(1)}.ffn_down_exps.scale"
    return names.get_name(key if key.endswith(".weight") else key + ".weight", try_suffixes=(".weight",))


def shared_kv_names(n_layers: int, first_shared: int) -> set[str]:
    """K/V tensors of KV-shared layers: a file converted from an older checkpoint may carry them (llama.cpp
    does not need them either); they are skipped."""
    return {f"blk.{i}.{part}.weight" for i in range(first_shared, n_layers)
            for part in ("attn_k", "attn_v", "attn_k_norm")}
