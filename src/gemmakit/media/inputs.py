"""Image and audio parts of chat messages -> decoded inputs, with every source treated as hostile.

Messages carry media the way each caller's world spells it, and all of them are accepted:

    {"type": "image", "image": <PIL image | bytes | path>}      transformers' message style
    {"type": "image", "path": "cat.jpg"} / {"type": "image", "url": "data:image/png;base64,..."}
    {"type": "image_url", "image_url": {"url": "data:..." | "file://..." | "https://..."}}   OpenAI
    {"type": "audio", "audio": <float array at 16 kHz | bytes | path>} / {"type": "audio", "path": ...}
    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}          OpenAI

`collect` returns the messages with each such part reduced to `{"type": "image"}` / `{"type": "audio"}` (what
chat templates expect) and the decoded inputs in prompt order. Decoding is Pillow's and libsndfile's, never
ours. What a caller may point at is a `MediaPolicy`: local paths for Python and CLI users; for the server only
data URLs unless the operator allows `file://` (under given directories) or remote URLs, and always within a
byte limit and a pixel limit (Pillow's decompression-bomb guard is made an error, not a warning).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gemmakit.media.soft import MediaError
from gemmakit.media.towers import MediaInput

_DATA_URL = re.compile(r"^data:([\w/+.-]*)(;[\w=.-]+)*;base64,", re.I)


@dataclass
class MediaPolicy:
    """Where media may come from and how big it may be."""

    local_paths: bool = True  # plain paths and file:// URLs (Python / CLI); the server sets False
    allowed_dirs: tuple[Path, ...] = ()  # when not empty, file paths must lie under one of these
    remote: bool = False  # http(s) URLs (the server: --allow-remote-media)
    max_bytes: int = 20 << 20
    max_pixels: int = 50_000_000
    max_audio_seconds: float = 30.0
    max_items: int = 32  # images + clips in one request: each costs a tower pass before the prompt runs
    timeout_s: float = 10.0


def collect(messages: list[dict[str, Any]], policy: MediaPolicy | None = None
            ) -> tuple[list[dict[str, Any]], list[MediaInput]]:
    """The messages with media parts normalised for the chat template, and the decoded media in order."""
    policy = policy or MediaPolicy()
    out, items = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "image_url", "audio", "input_audio") and len(items) >= policy.max_items:
                raise MediaError(f"more than {policy.max_items} images / audio clips in one request; send fewer")
            if kind in ("image", "image_url"):
                items.append(MediaInput("image", open_image(_image_source(part), policy)))
                parts.append({"type": "image"})
            elif kind in ("audio", "input_audio"):
                items.append(MediaInput("audio", open_audio(_audio_source(part), policy)))
                parts.append({"type": "audio"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, items


def _image_source(part: dict[str, Any]) -> Any:
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise MediaError('an image_url part needs {"image_url": {"url": "data:image/...;base64,..."}}')
        return url
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    raise MediaError('an image part needs "image" (a PIL image, bytes or a path), "path" or "url"')


def _audio_source(part: dict[str, Any]) -> Any:
    if part["type"] == "input_audio":
        a = part.get("input_audio")
        if not isinstance(a, dict) or not isinstance(a.get("data"), str):
            raise MediaError('an input_audio part needs {"input_audio": {"data": "<base64>", "format": "wav"}}')
        return _b64(a["data"], "input_audio.data")
    for key in ("audio", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    raise MediaError('an audio part needs "audio" (16 kHz samples, bytes or a path), "path" or "url"')


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{what} is not valid base64 ({e})") from e


def read_source(source: Any, policy: MediaPolicy) -> bytes:
    """The bytes a path, file:// / data: / http(s) URL names, within the policy's limits."""
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    elif isinstance(source, str) and (m := _DATA_URL.match(source)):
        if len(source) > policy.max_bytes * 4 // 3 + 1024:
            raise MediaError(f"the data URL is over the {policy.max_bytes >> 20} MiB media limit")
        data = _b64(source[m.end():], "the data URL")
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        if not policy.remote:
            raise MediaError("remote media URLs are off; send the file as a data URL "
                             "(or start the server with --allow-remote-media)")
        with urllib.request.urlopen(source, timeout=policy.timeout_s) as r:  # noqa: S310 - scheme checked above
            data = r.read(policy.max_bytes + 1)
    elif isinstance(source, str | Path):
        data = _read_path(Path(str(source).removeprefix("file://")), policy)
    else:
        raise MediaError(f"cannot read media from a {type(source).__name__}; give a path, bytes or a data URL")
    if len(data) > policy.max_bytes:
        raise MediaError(f"the media file is over the {policy.max_bytes >> 20} MiB limit")
    if not data:
        raise MediaError("the media file is empty")
    return data


def _read_path(path: Path, policy: MediaPolicy) -> bytes:
    if not policy.local_paths:
        raise MediaError("local file paths are off here; send the file as a data URL "
                         "(or start the server with --allow-media-dir DIR)")
    real = path.expanduser().resolve()
    if policy.allowed_dirs and not any(real.is_relative_to(d.expanduser().resolve()) for d in policy.allowed_dirs):
        raise MediaError(f"{path} is outside the directories media may be read from")
    if not real.is_file():
        raise MediaError(f"no such media file: {path}")
    if real.stat().st_size > policy.max_bytes:
        raise MediaError(f"{path} is over the {policy.max_bytes >> 20} MiB media limit")
    return real.read_bytes()


def open_image(source: Any, policy: MediaPolicy | None = None) -> Image.Image:
    """A decoded, fully loaded PIL image from any accepted source."""
    policy = policy or MediaPolicy()
    if isinstance(source, Image.Image):
        image = source
    else:
        data = read_source(source, policy)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise MediaError(f"the image is too large to decode safely ({e}); scale it down first") from e
        except (OSError, ValueError) as e:
            raise MediaError("not an image Pillow can read; send PNG, JPEG, WebP or GIF") from e
    if image.width * image.height > policy.max_pixels:
        raise MediaError(f"the image is {image.width}x{image.height}, over the {policy.max_pixels:,}-pixel limit; "
                         "scale it down first")
    try:
        image.load()
    except (OSError, ValueError) as e:
        raise MediaError(f"the image is damaged or truncated ({e})") from e
    return image


def open_audio(source: Any, policy: MediaPolicy | None = None) -> np.ndarray:
    """Mono float32 samples at 16 kHz from any accepted source (arrays are taken as 16 kHz mono already)."""
    from gemmakit.media.audio_features import AudioFileError, read_audio

    policy = policy or MediaPolicy()
    if isinstance(source, np.ndarray):
        samples = np.asarray(source, dtype=np.float32)
        if samples.ndim != 1 or not samples.size or not np.isfinite(samples).all():
            raise MediaError("audio samples must be a non-empty 1-D float array (mono, 16 kHz) without NaN/inf")
        return samples
    data = read_source(source, policy)
    try:
        return read_audio(io.BytesIO(data), max_seconds=policy.max_audio_seconds)
    except AudioFileError as e:
        raise MediaError(str(e)) from e
