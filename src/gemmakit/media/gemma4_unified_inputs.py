"""Inputs for the Gemma 4 12B "unified" model: pixels and samples, cut the way HF cuts them.

The 12B sees raw pixels and raw samples, so there is no feature math to get right, only
geometry: which size an image is resized to, how 48 px squares are laid out as vectors, and
how many placeholders the prompt gets.  Any disagreement there silently shifts every soft
token, so each step follows transformers 5.23 exactly:
- images go through the PIL path of the Gemma 4 image processor (RGB with transparency
  composited on white, PIL bicubic resize to the largest multiple-of-48 size under the patch
  budget, uint8 -> /255 in float64 -> float32).  The unified processor in HF runs on
  torchvision; PIL is the reference here because torchvision is not a dependency.
- a 48 px square is a (row, column, channel) raster, which is what HF's 16 px patchify
  followed by its 3x3 `patches_merge` produces, so it is cut in one reshape.
- audio is zero-padded to whole 640-sample frames, clips are padded to the longest with a
  mask, and the frame count is the soft-token count (no cap: HF applies none by default).
- a `<|image|>` / `<|audio|>` in the rendered prompt becomes begin marker, N placeholders,
  end marker, matched left to right in one pass like HF's processor, so the expanded
  placeholders are never expanded again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from gemmakit.media.common import to_rgb
from gemmakit.media.gemma4_images import target_size

__all__ = [
    "IMAGE_TOKEN", "BOI_TOKEN", "EOI_TOKEN", "AUDIO_TOKEN", "BOA_TOKEN", "EOA_TOKEN",
    "SUPPORTED_SOFT_TOKENS",
    "UnifiedImageInputs", "UnifiedAudioInputs", "UnifiedPrompt",
    "preprocess_unified_images", "preprocess_unified_audio",
    "image_replacement", "audio_replacement", "expand_unified_prompt", "prepare_unified_inputs",
]

IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<|image|>", "<|image>", "<image|>"
AUDIO_TOKEN, BOA_TOKEN, EOA_TOKEN = "<|audio|>", "<|audio>", "<audio|>"
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class UnifiedImageInputs:
    pixel_values: torch.Tensor        # [images, max_soft_tokens, 6912] float32 in [0, 1]
    image_position_ids: torch.Tensor  # [images, max_soft_tokens, 2] int64 (x, y); (-1, -1) = padding
    num_soft_tokens: list[int]


@dataclass(frozen=True)
class UnifiedAudioInputs:
    input_features: torch.Tensor       # [clips, longest, 640] float32 raw samples
    input_features_mask: torch.Tensor  # [clips, longest] bool, True = a real frame
    num_soft_tokens: list[int]


@dataclass(frozen=True)
class UnifiedPrompt:
    text: str
    images: UnifiedImageInputs | None
    audio: UnifiedAudioInputs | None


def _one_image(image: Image.Image, max_soft_tokens: int, patch_size: int,
               pooling_kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images (open files with PIL.Image.open); got {type(image).__name__}")
    rgb = Image.fromarray(to_rgb(image))
    h, w = target_size(rgb.height, rgb.width, max_soft_tokens, patch_size, pooling_kernel_size)
    if (h, w) != (rgb.height, rgb.width):
        rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(rgb, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    side = patch_size * pooling_kernel_size
    gh, gw = h // side, w // side
    squares = pixels.reshape(gh, side, gw, side, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, side * side * 3)
    ys, xs = np.divmod(np.arange(gh * gw), gw)
    return squares, np.stack([xs, ys], axis=-1)


def preprocess_unified_images(images: Sequence[Image.Image], max_soft_tokens: int = 280, patch_size: int = 16,
                              pooling_kernel_size: int = 3) -> UnifiedImageInputs:
    """PIL images -> HF `pixel_values`, `image_position_ids`, soft tokens per image."""
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}; got {max_soft_tokens}")
    if not images:
        raise ValueError("no images given")
    dim = (patch_size * pooling_kernel_size) ** 2 * 3
    pixel_values = torch.zeros(len(images), max_soft_tokens, dim, dtype=torch.float32)
    positions = torch.full((len(images), max_soft_tokens, 2), -1, dtype=torch.long)
    counts = []
    for i, image in enumerate(images):
        squares, pos = _one_image(image, max_soft_tokens, patch_size, pooling_kernel_size)
        pixel_values[i, : len(squares)] = torch.from_numpy(squares)
        positions[i, : len(pos)] = torch.from_numpy(pos)
        counts.append(len(squares))
    return UnifiedImageInputs(pixel_values, positions, counts)


def preprocess_unified_audio(clips: Sequence[np.ndarray], samples_per_token: int = 640,
                             sampling_rate: int = SAMPLE_RATE) -> UnifiedAudioInputs:
    """Mono float32 16 kHz clips -> HF `input_features`, `input_features_mask`, soft tokens per clip."""
    if sampling_rate != SAMPLE_RATE:
        raise ValueError(f"audio must be 16 kHz mono; got {sampling_rate} Hz: resample it first")
    if not clips:
        raise ValueError("no audio clips given")
    frames = []
    for clip in clips:
        clip = np.asarray(clip)
        if clip.ndim != 1 or clip.size == 0 or not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(
                f"each audio clip must be a non-empty 1-D float array of 16 kHz mono samples; "
                f"got shape {clip.shape} dtype {clip.dtype} (mix channels down, convert to float32)"
            )
        clip = np.pad(clip, (0, (-clip.size) % samples_per_token))
        frames.append(clip.reshape(-1, samples_per_token).astype(np.float32))
    counts = [len(f) for f in frames]
    features = torch.zeros(len(frames), max(counts), samples_per_token, dtype=torch.float32)
    mask = torch.zeros(len(frames), max(counts), dtype=torch.bool)
    for i, f in enumerate(frames):
        features[i, : len(f)] = torch.from_numpy(f)
        mask[i, : len(f)] = True
    return UnifiedAudioInputs(features, mask, counts)


def image_replacement(num_soft_tokens: int) -> str:
    """What one `<|image|>` in a rendered prompt becomes."""
    return f"{BOI_TOKEN}{IMAGE_TOKEN * num_soft_tokens}{EOI_TOKEN}"


def audio_replacement(num_soft_tokens: int) -> str:
    """What one `<|audio|>` in a rendered prompt becomes."""
    return f"{BOA_TOKEN}{AUDIO_TOKEN * num_soft_tokens}{EOA_TOKEN}"


_PLACEHOLDER = re.compile(f"(?P<image>{re.escape(IMAGE_TOKEN)})|(?P<audio>{re.escape(AUDIO_TOKEN)})")


def expand_unified_prompt(text: str, image_soft_tokens: Sequence[int] = (),
                          audio_soft_tokens: Sequence[int] = ()) -> str:
    """Replace the i-th `<|image|>` / `<|audio|>` with the i-th item's markers and placeholders."""
    n_img, n_aud = text.count(IMAGE_TOKEN), text.count(AUDIO_TOKEN)
    if n_img != len(image_soft_tokens) or n_aud != len(audio_soft_tokens):
        raise ValueError(
            f"the prompt has {n_img} {IMAGE_TOKEN} and {n_aud} {AUDIO_TOKEN}, but {len(image_soft_tokens)} images "
            f"and {len(audio_soft_tokens)} audio clips were given: one placeholder per item, in order"
        )
    counts = {"image": iter(image_soft_tokens), "audio": iter(audio_soft_tokens)}
    make = {"image": image_replacement, "audio": audio_replacement}
    return _PLACEHOLDER.sub(lambda m: make[m.lastgroup](next(counts[m.lastgroup])), text)


def prepare_unified_inputs(text: str, images: Sequence[Image.Image] = (), audio: Sequence[np.ndarray] = (),
                           max_soft_tokens: int = 280) -> UnifiedPrompt:
    """A rendered prompt plus its media -> expanded prompt and the tensors the embedders take."""
    img = preprocess_unified_images(images, max_soft_tokens) if images else None
    aud = preprocess_unified_audio(audio) if audio else None
    expanded = expand_unified_prompt(text, img.num_soft_tokens if img else (), aud.num_soft_tokens if aud else ())
    return UnifiedPrompt(expanded, img, aud)
