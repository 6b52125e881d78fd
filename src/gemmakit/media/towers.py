"""The towers a multimodal config asks for, attached where HF keeps them, and one `encode` over any family.

HF's `*ForConditionalGeneration` keeps the towers beside the language model under `model.`:
`model.vision_tower`, `model.multi_modal_projector` (Gemma 3), `model.embed_vision`, `model.audio_tower`,
`model.embed_audio` (Gemma 4). gemmakit's `Gemma.model` is HF's `model.language_model`, so the towers are
attached to it under the same names: a checkpoint's tensors then map one to one once `language_model.` is
dropped, and the text model itself never learns about pixels. Attaching is separate from building `Gemma` so
that the decoder does not import the towers (they import its RMSNorm).

`encode` runs the family's processor and tower on a prompt's items (images, audio clips) and returns, per
item, the text that replaces its placeholder and its soft tokens: everything `prompt.encode_with_media`
needs. Towers run in the weights' dtype, without gradients; the decoder is what LoRA trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from gemmakit.media.soft import Expanded, MediaError
from gemmakit.model import TOWER_NAMES


def is_tower(key: str) -> bool:
    """Whether a (gemmakit) parameter name belongs to a tower: towers stay in float when quantizing."""
    return key.startswith(tuple(f"model.{name}." for name in TOWER_NAMES))


@dataclass
class MediaInput:
    """One image (a PIL image) or audio clip (float32 mono samples at 16 kHz) of a prompt, in prompt order."""

    kind: str
    value: Image.Image | np.ndarray


def _whole_config(model: nn.Module) -> dict[str, Any]:
    c = model.config
    return {**(c.multimodal or {}), "text_config": {"hidden_size": c.hidden_size}}


def attach_towers(model: nn.Module) -> None:
    """Build the towers `model.config.multimodal` describes on `model.model` (on the current default device,
    so a loader can build them on the meta device like the rest)."""
    c, text = model.config, model.model
    kind, d = c.media_type, _whole_config(model)
    if kind is None:
        return
    if kind == "gemma3":
        from gemmakit.media.siglip import Gemma3MultiModalProjector, Gemma3ProjectorConfig, SiglipVisionTower

        projector = Gemma3ProjectorConfig.from_hf(d)
        text.vision_tower = SiglipVisionTower(projector.vision)
        text.multi_modal_projector = Gemma3MultiModalProjector(projector)
    elif kind == "gemma4":
        from gemmakit.media.gemma4_vision import Gemma4VisionConfig, Gemma4VisionTower, MultimodalEmbedder

        if d.get("vision_config"):
            vc = Gemma4VisionConfig.from_hf(d["vision_config"])
            text.vision_tower = Gemma4VisionTower(vc)
            text.embed_vision = MultimodalEmbedder(vc.hidden_size, c.hidden_size, vc.rms_norm_eps)
        if d.get("audio_config"):
            from gemmakit.media.gemma4_audio import Gemma4AudioConfig, Gemma4AudioTower

            ac = Gemma4AudioConfig.from_hf(d["audio_config"])
            text.audio_tower = Gemma4AudioTower(ac)
            text.embed_audio = MultimodalEmbedder(ac.output_proj_dims, c.hidden_size, ac.rms_norm_eps)
    elif kind == "gemma4_unified":
        from gemmakit.media.gemma4_unified import (
            UnifiedAudioConfig,
            UnifiedAudioEmbedder,
            UnifiedVisionConfig,
            UnifiedVisionEmbedder,
        )

        if d.get("vision_config") is not None:
            text.embed_vision = UnifiedVisionEmbedder(UnifiedVisionConfig.from_hf(d))
        if d.get("audio_config") is not None:
            text.embed_audio = UnifiedAudioEmbedder(UnifiedAudioConfig.from_hf(d))


def towers(model: nn.Module) -> dict[str, nn.Module]:
    """The towers attached to `model`, by HF name."""
    return {name: getattr(model.model, name) for name in TOWER_NAMES if hasattr(model.model, name)}


def accepts(model: nn.Module) -> set[str]:
    """The media kinds this model reads ("image", "audio")."""
    t = towers(model)
    kinds = set()
    if "vision_tower" in t or "embed_vision" in t:
        kinds.add("image")
    if "audio_tower" in t or ("embed_audio" in t and model.config.media_type == "gemma4_unified"):
        kinds.add("audio")
    return kinds


def workspace_bytes(model: nn.Module, max_soft_tokens: int = 1120) -> int:
    """Working memory of the largest tower pass one request makes (one Gemma 3 image with its crops run
    as a batch of up to 5 views, a Gemma 4 image at the largest budget, a 30 s clip): a layer's activations
    in and out of its MLP, and one block of attention scores (SDPA's fused CPU kernels never hold them all)."""
    t = towers(model)
    elt = model.model.norm.weight.element_size()
    need = 0
    for name in ("vision_tower", "audio_tower"):
        if name not in t:
            continue
        c = t[name].config
        if name == "audio_tower":
            tokens = 3000 // 4 + 1  # 30 s of 10 ms frames after the 4x subsampling
        elif model.config.media_type == "gemma3":
            tokens = 5 * (c.image_size // c.patch_size) ** 2
        else:
            tokens = max_soft_tokens * c.pooling_kernel_size**2
        width = getattr(c, "intermediate_size", 4 * c.hidden_size)
        need = max(need, tokens * (6 * c.hidden_size + 3 * width) * elt + 512 * tokens * 4 * 2)
    if "embed_vision" in t and model.config.media_type == "gemma4_unified":
        need = max(need, max_soft_tokens * 48 * 48 * 3 * 4 * 4)
    return need


def check_kinds(model: nn.Module, kinds: set[str], name: str | None = None) -> None:
    """Refuse, saying what to do, media kinds `model` has no tower for (before any file is decoded)."""
    reads = accepts(model)
    if missing := set(kinds) - reads:
        what = " or ".join(sorted(missing))
        raise MediaError(f"{name or model.config.name} cannot read {what}: " + (
            f"it reads {', '.join(sorted(reads))} only" if reads else
            "it is a text-only model; load a multimodal checkpoint (an HF directory with its vision / audio "
            "towers, or a text GGUF with its --mmproj file)"))


@torch.inference_mode()
def encode(model: nn.Module, inputs: list[MediaInput], max_soft_tokens: int | None = None) -> list[Expanded]:
    """Each input's placeholder text and soft tokens [n, H] (the decoder's dtype), in input order.
    `max_soft_tokens`: the Gemma 4 image budget (70/140/280/560/1120; default: the checkpoint's processor
    setting, else 280)."""
    if not inputs:
        return []
    check_kinds(model, {i.kind for i in inputs})
    images = [i.value for i in inputs if i.kind == "image"]
    clips = [i.value for i in inputs if i.kind == "audio"]
    family = model.config.media_type
    encode_family = {"gemma3": _gemma3, "gemma4": _gemma4, "gemma4_unified": _unified}[family]
    shipped = ((model.config.multimodal or {}).get("preprocessor") or {}).get("max_soft_tokens")
    budget = max_soft_tokens or (shipped if isinstance(shipped, int) else None) or 280
    done_images, done_audio = encode_family(model, images, clips, budget)
    dtype = model.model.norm.weight.dtype  # the decoder's activations (its linears may be quantized)
    out, it_i, it_a = [], iter(done_images), iter(done_audio)
    for item in inputs:
        text, embeds = next(it_i) if item.kind == "image" else next(it_a)
        out.append(Expanded(item.kind, text, embeds.to(dtype)))
    return out


def _gemma3(model: nn.Module, images: list, clips: list, budget: int) -> tuple[list, list]:
    from gemmakit.media.gemma3_images import Gemma3ImageProcessorConfig, image_placeholder, preprocess_images
    from gemmakit.media.siglip import gemma3_image_embeddings

    if not images:
        return [], []
    t = towers(model)
    side = t["vision_tower"].config.image_size  # the tower takes one size; the processor must give it
    mm = model.config.multimodal or {}
    c = Gemma3ImageProcessorConfig.from_hf({**(mm.get("preprocessor") or {}), "size": {"height": side, "width": side},
                                            "image_seq_length": mm.get("mm_tokens_per_image", 256)})
    pixels, crops = preprocess_images(images, c)
    soft = gemma3_image_embeddings(t["vision_tower"], t["multi_modal_projector"], pixels)
    out, at = [], 0
    for n in crops:  # each image's own view, then its crops: the order its placeholder text has the runs in
        out.append((image_placeholder(n, c), torch.cat(soft[at:at + 1 + n])))
        at += 1 + n
    return out, []


def _gemma4(model: nn.Module, images: list, clips: list, budget: int) -> tuple[list, list]:
    t, out_i, out_a = towers(model), [], []
    if images:
        from gemmakit.media.gemma4_images import image_placeholder, process_images
        from gemmakit.media.gemma4_vision import gemma4_image_embeddings

        pixels, positions, counts = process_images(images, budget)
        soft = gemma4_image_embeddings(t["vision_tower"], t["embed_vision"], pixels, positions)
        out_i = [(image_placeholder(n), s) for n, s in zip(counts, soft, strict=True)]
    if clips:
        from gemmakit.media.audio_features import audio_placeholder, extract_features
        from gemmakit.media.gemma4_audio import gemma4_audio_embeddings

        f = extract_features(clips)
        soft = gemma4_audio_embeddings(t["audio_tower"], t["embed_audio"], torch.from_numpy(f.input_features),
                                       torch.from_numpy(f.input_features_mask))
        out_a = [(audio_placeholder(s.shape[0]), s) for s in soft]
    return out_i, out_a


def _unified(model: nn.Module, images: list, clips: list, budget: int) -> tuple[list, list]:
    from gemmakit.media.gemma4_unified import unified_audio_embeddings, unified_image_embeddings
    from gemmakit.media.gemma4_unified_inputs import (
        audio_replacement,
        image_replacement,
        preprocess_unified_audio,
        preprocess_unified_images,
    )

    t, out_i, out_a = towers(model), [], []
    if images:
        x = preprocess_unified_images(images, budget)
        soft = unified_image_embeddings(t["embed_vision"], x.pixel_values, x.image_position_ids)
        out_i = [(image_replacement(s.shape[0]), s) for s in soft]
    if clips:
        a = preprocess_unified_audio(clips)
        soft = unified_audio_embeddings(t["embed_audio"], a.input_features, a.input_features_mask)
        out_a = [(audio_replacement(s.shape[0]), s) for s in soft]
    return out_i, out_a
