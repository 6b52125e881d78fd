"""Gemma 3's image processor and prompt expansion, equal to transformers' PIL `Gemma3Processor` path.

The vision tower only ever sees square images at its trained resolution, so everything between a user's picture
and the tower lives here: RGB conversion (transparency composited onto white, as HF does), the optional
pan-and-scan crops that let a wide or tall image be seen in pieces, the resize, rescale and normalisation, and
the text that replaces each `<start_of_image>` placeholder in a rendered prompt.

Design:
- Equality with transformers is the contract, not closeness: the same Pillow resize on the same uint8 crops,
  the rescale in float64 then cast to float32, the normalisation in float32, so pixel values match bit for bit.
  That is why this is NumPy + Pillow and not a torch resize (whose bilinear filter differs from Pillow's).
- The settings are the fields of a checkpoint's preprocessor_config.json, under their HF names. Released
  Gemma 3 files leave the pan-and-scan fields null and `Gemma3Processor` fills them; the defaults here are
  that combination (a released 4B file plus the processor's fill-ins), so the dataclass with no arguments is
  what `AutoProcessor` gives for a real checkpoint.
- Pixel rows come out image by image, each original before its crops, and the expanded text names them in the
  same order, so the soft tokens from `siglip.gemma3_image_embeddings` can be scattered into the
  `<image_soft_token>` positions in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gemmakit.media.common import expand_placeholders, to_rgb

BOI_TOKEN = "<start_of_image>"  # the placeholder a chat template writes for each image
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"  # one per soft token; the decoder swaps their embeddings for the tower's


@dataclass
class Gemma3ImageProcessorConfig:
    """preprocessor_config.json (+ processor_config.json's `image_seq_length`) of a Gemma 3 checkpoint."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"height": 896, "width": 896})
    resample: int = 2  # PIL.Image.Resampling.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2
    image_seq_length: int = 256  # soft tokens per image or crop; equals the model's mm_tokens_per_image

    @classmethod
    def from_hf(cls, d: dict) -> Gemma3ImageProcessorConfig:
        """From a preprocessor_config.json dict; null fields keep the Gemma3Processor fill-ins."""
        names = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if set(c.size) != {"height", "width"}:
            raise ValueError(f"preprocessor size {c.size} is not a {{height, width}} pair as Gemma 3 uses")
        return c


class Gemma3ImageInputs(NamedTuple):
    text: str  # the prompt with each <start_of_image> expanded
    pixel_values: Tensor  # [sum(1 + crops), 3, H, W] float32: each image, then its crops
    num_crops: list[int]  # pan-and-scan crops per image (0 without pan-and-scan)


def pan_and_scan(image: np.ndarray, c: Gemma3ImageProcessorConfig) -> list[np.ndarray]:
    """Crops [h, w, C] of an image whose aspect ratio is extreme enough, split along its long side; [] if none."""
    height, width = image.shape[:2]
    long, short = max(width, height), min(width, height)
    if long / short < c.pan_and_scan_min_ratio_to_activate:
        return []
    n = int(math.floor(long / short + 0.5))  # close to the aspect ratio, rounding half up
    n = min(int(math.floor(long / c.pan_and_scan_min_crop_size)), n)
    n = min(c.pan_and_scan_max_num_crops, max(2, n))
    n_w, n_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < c.pan_and_scan_min_crop_size:
        return []
    return [image[y:y + crop_h, x:x + crop_w] for y in range(0, crop_h * n_h, crop_h)
            for x in range(0, crop_w * n_w, crop_w)]


def _pixels(image: np.ndarray, c: Gemma3ImageProcessorConfig) -> np.ndarray:
    """One [h, w, C] uint8 image or crop -> [C, H, W] float32 as the tower expects."""
    x = image
    if c.do_resize:
        size = (c.size["width"], c.size["height"])
        x = np.array(Image.fromarray(np.ascontiguousarray(x)).resize(size, resample=c.resample))
    if c.do_rescale:
        x = (x.astype(np.float64) * c.rescale_factor).astype(np.float32)
    if c.do_normalize:
        x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
        x = (x - np.array(c.image_mean, dtype=x.dtype)) / np.array(c.image_std, dtype=x.dtype)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_images(images: list[Image.Image], c: Gemma3ImageProcessorConfig) -> tuple[Tensor, list[int]]:
    """pixel_values [N, 3, H, W] float32 (each image followed by its crops) and the crop count per image."""
    rows, num_crops = [], []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images, got {type(image).__name__}; open files with PIL.Image.open")
        if c.do_convert_rgb:
            rgb = to_rgb(image)
        else:
            rgb = np.array(image)
            if rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"a {image.mode} image needs do_convert_rgb on; Gemma 3 reads 3-channel images")
        crops = pan_and_scan(rgb, c) if c.do_pan_and_scan else []
        rows += [_pixels(x, c) for x in [rgb, *crops]]
        num_crops.append(len(crops))
    if len({r.shape for r in rows}) > 1:
        raise ValueError("images of different sizes cannot be batched; keep do_resize on")
    if not rows:
        return torch.empty(0, 3, c.size["height"], c.size["width"]), num_crops
    return torch.from_numpy(np.stack(rows)), num_crops


def image_placeholder(num_crops: int, c: Gemma3ImageProcessorConfig) -> str:
    """The text that replaces one `<start_of_image>`: the image's soft tokens, then those of its crops."""
    one = f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * c.image_seq_length}{EOI_TOKEN}\n\n"
    if not num_crops:
        return one
    return (f"Here is the original image {one} and here are some crops to help you see better "
            + " ".join([one] * num_crops))


def expand_image_tokens(prompt: str, num_crops: list[int], c: Gemma3ImageProcessorConfig) -> str:
    """Replace the i-th `<start_of_image>` of `prompt` by image i's placeholder text."""
    return expand_placeholders(prompt, BOI_TOKEN, [image_placeholder(n, c) for n in num_crops], "images")


def process_gemma3_images(prompt: str, images: list[Image.Image],
                          config: Gemma3ImageProcessorConfig | None = None) -> Gemma3ImageInputs:
    """The expanded prompt, pixel_values and crops per image for a prompt with one `<start_of_image>` per image."""
    c = config or Gemma3ImageProcessorConfig()
    n_placeholders = prompt.count(BOI_TOKEN)
    if n_placeholders != len(images):
        raise ValueError(f"the prompt has {n_placeholders} {BOI_TOKEN} placeholders but {len(images)} images "
                         f"were given; put one {BOI_TOKEN} where each image goes")
    pixel_values, num_crops = preprocess_images(list(images), c)
    return Gemma3ImageInputs(expand_image_tokens(prompt, num_crops, c), pixel_values, num_crops)
