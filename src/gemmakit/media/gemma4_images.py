"""Images -> the tensors and prompt text Gemma 4's vision tower expects (transformers' PIL processor, exactly).

Design:
- The tower was trained on images at their own aspect ratio, so nothing is cropped or squashed: each image is
  resized (bicubic, Pillow's antialiasing) to the largest grid whose sides are multiples of patch x pool
  (48 px) and whose patch count fits the budget. The budget is the user's one knob: `max_soft_tokens`, the
  most soft tokens an image may take in the prompt (more detail for more context). Only the values the model
  was trained with are accepted; anything else is refused with the list, not rounded, since a silent change of
  budget changes the prompt length the caller planned for.
- Every step mirrors transformers' `Gemma4ImageProcessorPil` down to the dtype path (uint8 through Pillow,
  float64 rescale, float32 out), because the tests compare tensors for equality and a one-ulp drift in pixels
  is a drift in every soft token. Pixels stay in [0, 1]; the tower maps them to [-1, 1] itself.
- Transparency is composited onto white, as the reference does, so a transparent region reads as paper,
  not as whatever colour the encoder stored under alpha 0.
- Images of different sizes share one batch: patches are padded to the budget's patch count with zeros and
  position (-1, -1), which the tower treats as absent. The soft-token count per image is returned with them,
  because the prompt needs it: each `<|image|>` the chat template wrote becomes `<|image>`, that many
  `<|image|>`, then `<image|>`, with the surrounding text untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from gemmakit.media.common import expand_placeholders, to_rgb

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
PATCH_SIZE = 16
POOLING_KERNEL_SIZE = 3
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<|image|>", "<|image>", "<image|>"


class ImageInputError(ValueError):
    """An image or an image option gemmakit cannot use; the message says why and what to do."""


class Gemma4ImageInputs(NamedTuple):
    text: str  # the prompt with each image placeholder expanded
    pixel_values: torch.Tensor  # [images, max_patches, 3 * patch^2] float32 in [0, 1]
    position_ids: torch.Tensor  # [images, max_patches, 2] int64 (x, y); padding (-1, -1)
    soft_tokens: list[int]  # soft tokens per image, input order


def check_budget(max_soft_tokens: int) -> int:
    """The budget if Gemma 4 supports it, else ImageInputError naming the choices."""
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        choices = ", ".join(map(str, SUPPORTED_SOFT_TOKENS))
        raise ImageInputError(f"max_soft_tokens must be one of {choices} (got {max_soft_tokens!r}): it is the most "
                              f"soft tokens one image may take in the prompt; {DEFAULT_SOFT_TOKENS} is the default, "
                              "larger keeps more detail and costs more context")
    return int(max_soft_tokens)


def target_size(height: int, width: int, max_soft_tokens: int, patch_size: int = PATCH_SIZE,
                pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> tuple[int, int]:
    """(height, width) an image is resized to: aspect ratio kept, sides multiples of patch*pool, within budget."""
    max_patches = max_soft_tokens * pooling_kernel_size**2
    budget_px = max_patches * patch_size**2
    step = pooling_kernel_size * patch_size
    factor = math.sqrt(budget_px / (height * width))
    h = int(math.floor(factor * height / step)) * step
    w = int(math.floor(factor * width / step)) * step
    longest = (max_patches // pooling_kernel_size**2) * step
    # A very thin image rounds its short side to zero: give it one block and as many as its ratio allows.
    if h == 0 and w == 0:
        raise ImageInputError(f"cannot resize a {width}x{height} image to a grid of {step}-pixel blocks")
    if h == 0:
        h, w = step, min(int(math.floor(width / height)) * step, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * step, longest), step
    if h * w > budget_px:
        raise ImageInputError(f"a {width}x{height} image is too elongated for max_soft_tokens={max_soft_tokens}: "
                              "crop it nearer to square or choose a larger max_soft_tokens")
    return h, w


def _open(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.copy()  # decoded now, file closed
        except (OSError, UnidentifiedImageError) as e:
            raise ImageInputError(f"cannot read image {str(image)!r}: {e}; pass a PNG, JPEG or other file "
                                  "Pillow can open") from e
    raise ImageInputError(f"an image must be a PIL.Image or a file path, got {type(image).__name__}")


def image_patches(image: Image.Image, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches [n, 3*p*p] float32 laid out (py, px, channel), positions [n, 2] int64 (x, y))."""
    rgb = to_rgb(image)
    h, w = target_size(rgb.shape[0], rgb.shape[1], max_soft_tokens)
    if (h, w) != rgb.shape[:2]:
        rgb = np.array(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
    pixels = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    p = PATCH_SIZE
    rows, cols = h // p, w // p
    patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([xs, ys], axis=-1).reshape(rows * cols, 2).astype(np.int64)
    return patches, positions


def process_images(images: Sequence[Image.Image | str | Path],
                   max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pixel_values [b, max_patches, 768], position_ids [b, max_patches, 2], soft tokens per image)."""
    budget = check_budget(max_soft_tokens)
    max_patches = budget * POOLING_KERNEL_SIZE**2
    pixel_values = np.zeros((len(images), max_patches, 3 * PATCH_SIZE**2), np.float32)
    position_ids = np.full((len(images), max_patches, 2), -1, np.int64)
    soft_tokens = []
    for i, image in enumerate(images):
        patches, positions = image_patches(_open(image), budget)
        pixel_values[i, :len(patches)] = patches
        position_ids[i, :len(patches)] = positions
        soft_tokens.append(len(patches) // POOLING_KERNEL_SIZE**2)
    return torch.from_numpy(pixel_values), torch.from_numpy(position_ids), soft_tokens


def image_placeholder(n_soft_tokens: int) -> str:
    """The text one image occupies in the prompt."""
    return BOI_TOKEN + IMAGE_TOKEN * n_soft_tokens + EOI_TOKEN


def expand_image_tokens(text: str, soft_tokens: Sequence[int]) -> str:
    """Replace the i-th `<|image|>` of `text` with image i's placeholder; everything else is left as it is."""
    return expand_placeholders(text, IMAGE_TOKEN, [image_placeholder(n) for n in soft_tokens], "images",
                               ImageInputError)


def prepare_gemma4_images(text: str, images: Sequence[Image.Image | str | Path],
                          max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> Gemma4ImageInputs:
    """A rendered prompt holding one `<|image|>` per image -> expanded text and the tower's inputs."""
    check_budget(max_soft_tokens)
    expected = text.count(IMAGE_TOKEN)
    if expected != len(images):
        raise ImageInputError(f"the prompt has {expected} {IMAGE_TOKEN} placeholders but {len(images)} images were "
                              f"given; put one {IMAGE_TOKEN} where each image goes")
    pixel_values, position_ids, soft_tokens = process_images(images, max_soft_tokens)
    return Gemma4ImageInputs(expand_image_tokens(text, soft_tokens), pixel_values, position_ids, soft_tokens)
