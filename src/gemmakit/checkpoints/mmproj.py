"""llama.cpp's split multimodal layout: the towers of a Gemma 3 / Gemma 4 model live in their own `mmproj` GGUF
(general.architecture "clip"), next to the text GGUF. This reads such a file back into HF checkpoint names and
sub-configs, and writes the Gemma 3 one as llama.cpp's converter (`convert_hf_to_gguf.py --mmproj`) does.

Design:
- Names: one table per projector type pairs each tensor's gguf `MODEL_TENSOR` (its GGUF spelling comes from the
  gguf package's `TENSOR_NAMES`, never a copy) with the HF name under `model.`. The converter itself gets there
  through gguf's HF->GGUF `TensorNameMap` after renaming some HF names; the tests run that route on real
  transformers models and check that it lands on these tables, so the two cannot drift apart silently.
- Keys are the released checkpoints' names (SigLIP keeps its `vision_model.` level), which is what the tower
  modules in `gemmakit.media` load; the caller prefixes `model.`.
- Values: the converter changes a few tensors on the way in, and each change is undone here:
  Gemma 3's `mm_soft_emb_norm` is stored as 1 + w (the other SigLIP norms are plain LayerNorms, untouched);
  Gemma 4's patch projection is stored as a Conv2d kernel [n, 3, p, p] where HF holds a linear over (p, p, 3)
  patches; the audio depthwise kernel loses its unit middle axis; the audio per-dim scale is stored after
  softplus (undone by its inverse, exact only to float rounding); clip bounds are stored as [1] not scalars.
  Nothing is transposed: gguf's [rows, ne0] order is PyTorch's, including Gemma 3's `mm_input_projection_weight`
  (HF multiplies by it from the right; llama.cpp's graph takes it in that orientation). Early Gemma 3 files
  name SigLIP's fc1/fc2 ffn_down/ffn_up; like llama.cpp's loader, the pair is swapped back by shape.
- The config is rebuilt from the `clip.*` keys in transformers 5.23 field names. What the file does not store
  (Gemma 4's head_dim, key/value heads, clipping, conv channels) is read off the tensors' shapes and presence.
- Reading checks every name before any data is touched, so a file that is not an mmproj, has an unknown
  projector, lacks tensors or has strangers fails at once with a `CheckpointError`; data is dequantized one
  tensor at a time (any type `quants` decodes) when iterated.
- Writing reuses the streaming writer of the text export (gguf_write.py) with the converter's type rules:
  embeddings and 1-D tensors f32, the input projection always f16 (the converter forces it), other matrices
  the asked type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch

from gemmakit.checkpoints.common import CheckpointError
from gemmakit.checkpoints.gguf import metadata
from gemmakit.checkpoints.gguf_reader import open_gguf, release_pages
from gemmakit.checkpoints.gguf_write import Entry, check_destination, write_file
from gemmakit.checkpoints.quants import dequantize

M = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
CLIP_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"
GEMMA3, GEMMA4V, GEMMA4A = (gguf.VisionProjectorType.GEMMA3, gguf.VisionProjectorType.GEMMA4V,
                            gguf.VisionProjectorType.GEMMA4A)
SUPPORTED = (GEMMA3, GEMMA4V, GEMMA4A)
_CLIP_BOUNDS = (".input_min", ".input_max", ".output_min", ".output_max")  # Gemma 4's clipped linears
_DEFAULT_SCALE_FACTOR = 4  # llama.cpp's Gemma 3 pooling when clip.vision.projector.scale_factor is absent
_GEMMA4_POOL = 3  # llama.cpp's gemma4v pooling kernel when the file names none (the converter never does)


# -----------------------------------------------------------------------------
# name tables: (gguf tensor, GGUF suffix, HF name under `model.`, how the value was changed, optional)

@dataclass(frozen=True)
class Rule:
    tensor: M
    suffix: str
    hf: str  # may hold {i} (layer) or {j} (audio conv stage)
    change: str = ""  # "" | "plus1" | "patch" | "depthwise" | "softplus" | "scalar"
    optional: bool = False

    def gguf_name(self, index: int | None) -> str:
        return gguf.TENSOR_NAMES[self.tensor].format(bid=index) + self.suffix

    def hf_name(self, index: int | None) -> str:
        return self.hf.format(i=index, j=index)


def _pair(tensor: M, hf: str) -> list[Rule]:
    return [Rule(tensor, ".weight", f"{hf}.weight"), Rule(tensor, ".bias", f"{hf}.bias")]


def _clipped(tensor: M, hf: str) -> list[Rule]:
    """A Gemma 4 `ClippableLinear`: its weight under `.linear`, its four bounds (when used) beside it."""
    return [Rule(tensor, ".weight", f"{hf}.linear.weight"),
            *(Rule(tensor, b, f"{hf}{b}", "scalar", optional=True) for b in _CLIP_BOUNDS)]


_SIGLIP = "vision_tower.vision_model."
_G3_LAYER = _SIGLIP + "encoder.layers.{i}."
GEMMA3_GLOBAL = [*_pair(M.V_ENC_EMBD_PATCH, _SIGLIP + "embeddings.patch_embedding"),
                 Rule(M.V_ENC_EMBD_POS, ".weight", _SIGLIP + "embeddings.position_embedding.weight"),
                 *_pair(M.V_POST_NORM, _SIGLIP + "post_layernorm"),
                 Rule(M.V_MM_INP_PROJ, ".weight", "multi_modal_projector.mm_input_projection_weight"),
                 Rule(M.V_MM_SOFT_EMB_NORM, ".weight", "multi_modal_projector.mm_soft_emb_norm.weight", "plus1")]
GEMMA3_LAYER = [r for t, hf in ((M.V_ENC_INPUT_NORM, "layer_norm1"), (M.V_ENC_ATTN_Q, "self_attn.q_proj"),
                                (M.V_ENC_ATTN_K, "self_attn.k_proj"), (M.V_ENC_ATTN_V, "self_attn.v_proj"),
                                (M.V_ENC_ATTN_O, "self_attn.out_proj"), (M.V_ENC_POST_ATTN_NORM, "layer_norm2"),
                                (M.V_ENC_FFN_UP, "mlp.fc1"), (M.V_ENC_FFN_DOWN, "mlp.fc2"))
                for r in _pair(t, _G3_LAYER + hf)]

_G4_LAYER = "vision_tower.encoder.layers.{i}."
GEMMA4V_GLOBAL = [Rule(M.V_ENC_EMBD_PATCH, ".weight", "vision_tower.patch_embedder.input_proj.weight", "patch"),
                  Rule(M.V_ENC_EMBD_POS, ".weight", "vision_tower.patch_embedder.position_embedding_table"),
                  Rule(M.V_STD_BIAS, "", "vision_tower.std_bias", optional=True),
                  Rule(M.V_STD_SCALE, "", "vision_tower.std_scale", optional=True),
                  Rule(M.V_MM_INP_PROJ, ".weight", "embed_vision.embedding_projection.weight")]
GEMMA4V_LAYER = [*(r for t, hf in ((M.V_ENC_ATTN_Q, "self_attn.q_proj"), (M.V_ENC_ATTN_K, "self_attn.k_proj"),
                                   (M.V_ENC_ATTN_V, "self_attn.v_proj"), (M.V_ENC_ATTN_O, "self_attn.o_proj"),
                                   (M.V_ENC_FFN_GATE, "mlp.gate_proj"), (M.V_ENC_FFN_UP, "mlp.up_proj"),
                                   (M.V_ENC_FFN_DOWN, "mlp.down_proj"))
                   for r in _clipped(t, _G4_LAYER + hf)),
                 *(Rule(t, ".weight", f"{_G4_LAYER}{hf}.weight")
                   for t, hf in ((M.V_ENC_ATTN_Q_NORM, "self_attn.q_norm"), (M.V_ENC_ATTN_K_NORM, "self_attn.k_norm"),
                                 (M.V_ENC_INPUT_NORM, "input_layernorm"),
                                 (M.V_ENC_ATTN_POST_NORM, "post_attention_layernorm"),
                                 (M.V_ENC_POST_ATTN_NORM, "pre_feedforward_layernorm"),
                                 (M.V_ENC_FFN_POST_NORM, "post_feedforward_layernorm")))]

_AUDIO = "audio_tower."
_A_LAYER = _AUDIO + "layers.{i}."
GEMMA4A_GLOBAL = [Rule(M.A_ENC_INP_PROJ, ".weight", _AUDIO + "subsample_conv_projection.input_proj_linear.weight"),
                  *_pair(M.A_ENC_OUT, _AUDIO + "output_proj"),
                  Rule(M.A_MM_INP_PROJ, ".weight", "embed_audio.embedding_projection.weight")]
GEMMA4A_CONV = [Rule(M.A_ENC_CONV1D, ".weight", _AUDIO + "subsample_conv_projection.layer{j}.conv.weight"),
                Rule(M.A_ENC_CONV1D_NORM, ".weight", _AUDIO + "subsample_conv_projection.layer{j}.norm.weight")]
GEMMA4A_LAYER = [*(r for t, hf in ((M.A_ENC_FFN_UP, "feed_forward1.ffw_layer_1"),
                                   (M.A_ENC_FFN_DOWN, "feed_forward1.ffw_layer_2"),
                                   (M.A_ENC_FFN_UP_1, "feed_forward2.ffw_layer_1"),
                                   (M.A_ENC_FFN_DOWN_1, "feed_forward2.ffw_layer_2"),
                                   (M.A_ENC_ATTN_Q, "self_attn.q_proj"), (M.A_ENC_ATTN_K, "self_attn.k_proj"),
                                   (M.A_ENC_ATTN_V, "self_attn.v_proj"), (M.A_ENC_OUTPUT, "self_attn.post"),
                                   (M.A_ENC_CONV_PW1, "lconv1d.linear_start"), (M.A_ENC_CONV_PW2, "lconv1d.linear_end"))
                   for r in _clipped(t, _A_LAYER + hf)),
                 *(Rule(t, ".weight", f"{_A_LAYER}{hf}.weight")
                   for t, hf in ((M.A_ENC_FFN_NORM, "feed_forward1.pre_layer_norm"),
                                 (M.A_ENC_FFN_POST_NORM, "feed_forward1.post_layer_norm"),
                                 (M.A_ENC_FFN_NORM_1, "feed_forward2.pre_layer_norm"),
                                 (M.A_ENC_FFN_POST_NORM_1, "feed_forward2.post_layer_norm"),
                                 (M.A_ENC_ATTN_K_REL, "self_attn.relative_k_proj"),
                                 (M.A_ENC_CONV_NORM, "lconv1d.pre_layer_norm"),
                                 (M.A_ENC_NORM_CONV, "lconv1d.conv_norm"),
                                 (M.A_ENC_ATTN_PRE_NORM, "norm_pre_attn"),
                                 (M.A_ENC_ATTN_POST_NORM, "norm_post_attn"),
                                 (M.A_ENC_OUTPUT_NORM, "norm_out"))),
                 Rule(M.A_PER_DIM_SCALE, ".weight", _A_LAYER + "self_attn.per_dim_scale", "softplus"),
                 Rule(M.A_ENC_CONV_DW, ".weight", _A_LAYER + "lconv1d.depthwise_conv1d.weight", "depthwise")]


def name_plan(projector: str, n_layers: int, n_conv: int = 0) -> dict[str, tuple[str, Rule]]:
    """{GGUF name: (HF name under `model.`, rule)} of every tensor a tower of this projector type can hold."""
    tables = {GEMMA3: (GEMMA3_GLOBAL, GEMMA3_LAYER, []), GEMMA4V: (GEMMA4V_GLOBAL, GEMMA4V_LAYER, []),
              GEMMA4A: (GEMMA4A_GLOBAL, GEMMA4A_LAYER, GEMMA4A_CONV)}
    glob, per_layer, per_conv = tables[projector]
    plan = {r.gguf_name(None): (r.hf_name(None), r) for r in glob}
    for i in range(n_layers):
        plan.update({r.gguf_name(i): (r.hf_name(i), r) for r in per_layer})
    for j in range(n_conv):
        plan.update({r.gguf_name(j): (r.hf_name(j), r) for r in per_conv})
    return plan


# -----------------------------------------------------------------------------
# reading

@dataclass
class _Item:
    hf: str
    rule: Rule
    tensor: Any  # gguf ReaderTensor


@dataclass
class MmprojContents:
    """An mmproj file's towers: HF sub-configs and a lazy view of its tensors under HF names (below `model.`)."""

    path: Path
    projectors: dict[str, str]  # {"vision": "gemma3"} / {"vision": "gemma4v", "audio": "gemma4a"}
    text_hidden_size: int  # clip.*.projection_dim: the width the soft tokens are projected to
    vision_config: dict[str, Any] | None = None
    audio_config: dict[str, Any] | None = None
    mm_tokens_per_image: int | None = None  # Gemma 3 only
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    gguf_names: dict[str, str] = field(default_factory=dict)  # HF name -> GGUF name
    _items: list[_Item] = field(default_factory=list, repr=False)
    _reader: Any = field(default=None, repr=False)

    def hf_config(self) -> dict[str, Any]:
        """The towers' part of a config.json: what the tower configs' `from_hf` read (`vision_config`,
        `audio_config`, `mm_tokens_per_image`, and the text width as `text_config.hidden_size`)."""
        out: dict[str, Any] = {"text_config": {"hidden_size": self.text_hidden_size}}
        for key in ("vision_config", "audio_config", "mm_tokens_per_image"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def keys(self) -> list[str]:
        return [it.hf for it in self._items]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) one at a time, each dequantized and restored to HF's values and shape."""
        for it in self._items:
            t = it.tensor
            shape = tuple(int(n) for n in reversed(t.shape))
            try:
                w = dequantize(t.data, t.tensor_type, shape)
            except (ValueError, RuntimeError) as e:
                raise CheckpointError(f"{self.path}: tensor {t.name}: {e}") from e
            release_pages(self._reader, t.data_offset, t.n_bytes)
            yield it.hf, _undo(it.rule.change, w, t.name, self.path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())


def read_mmproj(path: str | Path) -> MmprojContents:
    """Open a llama.cpp mmproj GGUF: its projector type(s), HF-style configs, and tensors under HF names."""
    path = Path(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch != CLIP_ARCH:
        raise CheckpointError(f"{path} is a {arch!r} GGUF, not an mmproj (llama.cpp's tower file, architecture "
                              f"{CLIP_ARCH!r} with clip.* keys); pass the mmproj-*.gguf file that came with the model")
    projectors = _projectors(meta, path)
    out = MmprojContents(path, projectors, 0, _reader=reader)
    tensors = {t.name: t for t in reader.tensors}
    plan: dict[str, tuple[str, Rule]] = {}
    if "vision" in projectors:
        n = _int(meta, "clip.vision.block_count", path)
        plan |= name_plan(projectors["vision"], n)
        out.text_hidden_size = _int(meta, "clip.vision.projection_dim", path)
        out.image_mean, out.image_std = meta.get("clip.vision.image_mean"), meta.get("clip.vision.image_std")
    if "audio" in projectors:
        n_conv = sum(1 for j in range(16) if gguf.TENSOR_NAMES[M.A_ENC_CONV1D].format(bid=j) + ".weight" in tensors)
        plan |= name_plan(projectors["audio"], _int(meta, "clip.audio.block_count", path), n_conv)
        out.text_hidden_size = out.text_hidden_size or _int(meta, "clip.audio.projection_dim", path)
    missing = [g for g, (_, r) in plan.items() if g not in tensors and not r.optional]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) its clip.* keys call for, e.g. "
                              f"{', '.join(missing[:4])}; the file is incomplete or damaged: re-download or "
                              "re-convert it")
    strangers = [name for name in tensors if name not in plan]
    if strangers:
        raise CheckpointError(f"{path} holds {len(strangers)} tensor(s) gemmakit does not know for "
                              f"{'/'.join(projectors.values())}, e.g. {', '.join(strangers[:4])}; it may come from a "
                              "newer llama.cpp converter than gemmakit understands")
    out._items = [_Item(plan[t.name][0], plan[t.name][1], t) for t in reader.tensors]
    out._items = _fix_swapped_ffn(out._items)
    out.gguf_names = {it.hf: it.tensor.name for it in out._items}
    if projectors.get("vision") == GEMMA3:
        out.vision_config, out.mm_tokens_per_image = _gemma3_config(meta, path)
    elif "vision" in projectors:
        out.vision_config = _gemma4v_config(meta, tensors, path)
    if "audio" in projectors:
        out.audio_config = _gemma4a_config(meta, tensors, path)
    return out


def _projectors(meta: dict[str, Any], path: Path) -> dict[str, str]:
    """Each encoder's projector type: its own clip.<modality>.projector_type, else the shared clip.projector_type."""
    found = {}
    for modality in ("vision", "audio"):
        if meta.get(f"clip.has_{modality}_encoder"):
            kind = meta.get(f"clip.{modality}.projector_type", meta.get(gguf.Keys.Clip.PROJECTOR_TYPE))
            if kind not in SUPPORTED:
                raise CheckpointError(f"{path}: the {modality} projector type is {kind!r}; gemmakit reads only "
                                      f"Gemma's mmproj files: {', '.join(SUPPORTED)}")
            found[modality] = kind
    if not found:
        raise CheckpointError(f"{path} has neither a vision nor an audio encoder (clip.has_vision_encoder / "
                              "clip.has_audio_encoder); it is not a usable mmproj file: re-convert it")
    return found


def _int(meta: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 20:
        raise CheckpointError(f"{path}: metadata {key} is {value!r}, not a positive integer; the file is damaged "
                              "or not a Gemma mmproj: re-convert it")
    return value


def _float(meta: dict[str, Any], key: str, default: float) -> float:
    value = meta.get(key, default)
    return float(value) if isinstance(value, (int, float)) else default


def _gemma3_config(meta: dict[str, Any], path: Path) -> tuple[dict[str, Any], int]:
    c = {"model_type": "siglip_vision_model",
         "hidden_size": _int(meta, "clip.vision.embedding_length", path),
         "intermediate_size": _int(meta, "clip.vision.feed_forward_length", path),
         "num_hidden_layers": _int(meta, "clip.vision.block_count", path),
         "num_attention_heads": _int(meta, "clip.vision.attention.head_count", path),
         "image_size": _int(meta, "clip.vision.image_size", path),
         "patch_size": _int(meta, "clip.vision.patch_size", path),
         "layer_norm_eps": _float(meta, "clip.vision.attention.layer_norm_epsilon", 1e-6),
         "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    factor = _int(meta, "clip.vision.projector.scale_factor", path, _DEFAULT_SCALE_FACTOR)
    side = c["image_size"] // c["patch_size"]
    if side % factor:
        raise CheckpointError(f"{path}: {side} patches a side do not pool by the projector's scale factor {factor}; "
                              "the file's clip.vision.* keys are inconsistent: re-convert it")
    return c, (side // factor) ** 2


def _shape(tensors: dict[str, Any], name: str) -> tuple[int, ...] | None:
    t = tensors.get(name)
    return None if t is None else tuple(int(n) for n in reversed(t.shape))


def _gemma4v_config(meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    heads = _int(meta, "clip.vision.attention.head_count", path)
    head_dim = _shape(tensors, "v.blk.0.attn_q_norm.weight")[0]  # type: ignore[index]  # checked present
    c = {"model_type": "gemma4_vision",
         "hidden_size": _int(meta, "clip.vision.embedding_length", path),
         "intermediate_size": _int(meta, "clip.vision.feed_forward_length", path),
         "num_hidden_layers": _int(meta, "clip.vision.block_count", path),
         "num_attention_heads": heads, "head_dim": head_dim,
         "num_key_value_heads": _shape(tensors, "v.blk.0.attn_k.weight")[0] // head_dim,  # type: ignore[index]
         "patch_size": _int(meta, "clip.vision.patch_size", path),
         "rms_norm_eps": _float(meta, "clip.vision.attention.layer_norm_epsilon", 1e-6),
         "position_embedding_size": _shape(tensors, "v.position_embd.weight")[1],  # type: ignore[index]
         "use_clipped_linears": "v.blk.0.attn_q.input_min" in tensors,
         "standardize": "v.std_bias" in tensors}
    # The converter stores no pooling kernel for gemma4v and llama.cpp then pools 3x3 (HF's default as well);
    # a file that does carry clip.vision.projector.scale_factor is taken at its word.
    c["pooling_kernel_size"] = _int(meta, "clip.vision.projector.scale_factor", path, _GEMMA4_POOL)
    return c


def _gemma4a_config(meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    channels = []
    for j in range(16):
        s = _shape(tensors, gguf.TENSOR_NAMES[M.A_ENC_CONV1D].format(bid=j) + ".weight")
        if s is None:
            break
        channels.append(s[0])
    return {"model_type": "gemma4_audio",
            "hidden_size": _int(meta, "clip.audio.embedding_length", path),
            "num_hidden_layers": _int(meta, "clip.audio.block_count", path),
            "num_attention_heads": _int(meta, "clip.audio.attention.head_count", path),
            "rms_norm_eps": _float(meta, "clip.audio.attention.layer_norm_epsilon", 1e-6),
            "subsampling_conv_channels": channels,
            "conv_kernel_size": _shape(tensors, "a.blk.0.conv_dw.weight")[-1],  # type: ignore[index]
            "output_proj_dims": _shape(tensors, "a.pre_encode.out.weight")[0],  # type: ignore[index]
            "use_clipped_linears": "a.blk.0.attn_q.input_min" in tensors}


def _fix_swapped_ffn(items: list[_Item]) -> list[_Item]:
    """Early SigLIP conversions named fc1 ffn_down and fc2 ffn_up (llama.cpp's loader swaps them back the same
    way): fc1 maps hidden -> intermediate, so a 'fc1' wider in than out is really fc2, and the pair is swapped."""
    by_hf = {it.hf: it for it in items}
    for it in items:
        if not it.hf.endswith("mlp.fc1.weight"):
            continue
        other = by_hf[it.hf.replace("fc1.weight", "fc2.weight")]
        rows, cols = (int(n) for n in reversed(it.tensor.shape))
        if rows < cols:
            for suffix in ("weight", "bias"):
                a, b = by_hf[it.hf[:-6] + suffix], by_hf[other.hf[:-6] + suffix]
                a.tensor, b.tensor = b.tensor, a.tensor
    return items


def _undo(change: str, w: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """HF's value of a tensor the converter changed (see the module docstring)."""
    if change == "plus1":
        return w - 1.0
    if change == "scalar":
        if w.numel() != 1:
            raise CheckpointError(f"{path}: {name} should hold one number but holds {w.numel()}; re-convert the file")
        return w.reshape(())
    if change == "patch":  # [n, 3, p, p] kernel -> linear over patches flattened as (row, col, channel)
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
    if change == "depthwise":
        return w.unsqueeze(1)
    if change == "softplus":  # stored softplus(w); w = x + log(1 - exp(-x)), in float64 to lose less
        x = w.double()
        return (x + torch.log(-torch.expm1(-x))).float()
    return w


# -----------------------------------------------------------------------------
# writing (Gemma 3)

def write_mmproj(path: str | Path, vision_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                 text_hidden_size: int | None = None, mm_tokens_per_image: int = 256, dtype: str = "f16",
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 name: str = "gemma3-mmproj") -> Path:
    """Write Gemma 3's SigLIP tower and projector as llama.cpp's converter lays out an mmproj file.

    `state_dict` may be a whole `Gemma3ForConditionalGeneration` state dict (text weights are skipped) or the
    towers alone, with or without `model.` and SigLIP's `vision_model.` level. `dtype` is "f32" or "f16" (the
    matrices; embeddings and 1-D tensors stay f32, the input projection f16, as the converter writes them)."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"mmproj type {dtype!r}: choose f32 or f16")
    path = check_destination(path)
    c = dict(vision_config)
    n_layers = int(c.get("num_hidden_layers", 0))
    if n_layers < 1:
        raise ValueError("vision_config needs num_hidden_layers (the SigLIP depth)")
    if c.get("vision_use_head"):
        raise ValueError("Gemma 3's SigLIP has no attention-pooling head; set vision_use_head to false")
    tensors = _released_names(state_dict)
    plan = name_plan(GEMMA3, n_layers)
    wanted = {hf for hf, _ in plan.values()}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} tower tensor(s), e.g. {', '.join(missing[:4])}")
    strangers = sorted(set(tensors) - wanted)
    if strangers:
        raise ValueError(f"the state dict holds tower tensor(s) Gemma 3's mmproj has no place for: {strangers[:4]}")
    text_hidden = text_hidden_size or int(tensors["multi_modal_projector.mm_input_projection_weight"].shape[1])
    matrix = Q.F16 if dtype == "f16" else Q.F32
    entries = [_entry(g, hf, rule, tensors[hf], matrix) for g, (hf, rule) in plan.items()]
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    side = int(c["image_size"]) // int(c["patch_size"])
    per_side = math.isqrt(mm_tokens_per_image)
    if per_side * per_side != mm_tokens_per_image or per_side < 1 or side % per_side:
        raise ValueError(f"mm_tokens_per_image {mm_tokens_per_image} is not a square that divides the "
                         f"{side} x {side} patch grid")

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(name)
        w.add_file_type(file_type)
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(text_hidden)
        w.add_vision_image_size(int(c["image_size"]))
        w.add_vision_patch_size(int(c["patch_size"]))
        w.add_vision_embedding_length(int(c["hidden_size"]))
        w.add_vision_feed_forward_length(int(c["intermediate_size"]))
        w.add_vision_block_count(n_layers)
        w.add_vision_head_count(int(c["num_attention_heads"]))
        w.add_vision_image_mean(list(image_mean))
        w.add_vision_image_std(list(image_std))
        w.add_clip_projector_type(GEMMA3)
        w.add_vision_attention_layernorm_eps(float(c.get("layer_norm_eps", 1e-6)))
        w.add_vision_use_gelu(True)
        if side // per_side != _DEFAULT_SCALE_FACTOR:  # the converter writes it only when it is not the default
            w.add_vision_projector_scale_factor(side // per_side)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return write_file(path, gguf.MODEL_ARCH.MMPROJ, add_metadata, entries)


def _released_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower tensors under released-checkpoint names: no `model.`, SigLIP with its `vision_model.` level,
    SigLIP's unused pooling head dropped (the converter skips it too)."""
    out = {}
    for key, value in state_dict.items():
        k = key.removeprefix("model.")
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k.removeprefix("vision_tower.")
        if k.startswith("vision_tower.vision_model.head."):
            continue
        if k.startswith(("vision_tower.", "multi_modal_projector.")):
            out[k] = value
    return out


def _entry(gguf_name: str, hf: str, rule: Rule, t: torch.Tensor, matrix: Q) -> Entry:
    """The converter's type for one tensor: embeddings f32 and the input projection f16 (forced), 1-D f32."""
    if rule.tensor == M.V_MM_INP_PROJ:
        qtype = Q.F16
    elif ".embeddings." in hf or t.ndim <= 1:
        qtype = Q.F32
    else:
        qtype = matrix
    fetch: Callable[[], torch.Tensor] = lambda t=t: t.detach().float()  # noqa: E731
    return Entry(gguf_name, tuple(t.shape), qtype, fetch, 1.0 if rule.change == "plus1" else 0.0, hf)
