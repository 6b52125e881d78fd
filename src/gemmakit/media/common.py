"""What the processors and tower configs of every family share: reading an HF sub-config into a dataclass,
and turning any PIL image into the RGB array transformers' processors start from."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
from PIL import Image


def hf_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of an HF config dict that dataclass `cls` has fields for (others, like `model_type`, ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def to_rgb(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8. Transparent pixels are composited onto white, as transformers' `convert_to_rgb` does
    (PIL's own convert would make them black)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))
