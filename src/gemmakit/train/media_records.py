"""Chat records with image and audio parts: read once, encoded once by the frozen towers, and kept as fixed
inputs of the decoder being trained.

A record's media parts are spelled as at inference (`{"type": "image", "path": "cats/1.jpg"}`, data URLs,
`image_url`, audio parts; media/inputs.py). A relative path is relative to the JSONL file's directory and must
stay inside it (`../x.jpg` is refused, an absolute path is taken as given): a data set then moves as one
folder, and a path that walks out of it is far more often a mistake than an intent. The check is on the path
as written, so a symlink inside the folder (images kept on another disk) is followed. Remote URLs are never
fetched for training.

Each record's images go through the towers once, when the data is read, with no gradients: the towers are
frozen, so their soft tokens are constants, and an epoch costs decoder passes only. They are kept per
example (as `PromptMedia`, on the CPU) for the run; `batch_media` places them in each training batch.

The loss mask is found from the rendered text as for text-only records (data.py), but the ids are those of
the expanded prompt (`media.prompt.encode_with_media`): the rendered text is cut where the prompt expansion
cuts it, each text piece is tokenized with character offsets mapped back to the rendered text, and the
expansion's own characters and the soft-token runs map to nothing, so they are never scored. The ids built
this way must equal encode_with_media's, or the record is refused rather than trained misaligned.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemmakit.media.soft import Expanded, Media, PromptMedia, batch_media
from gemmakit.train.data import IGNORE, MEDIA_TYPES, Example, Tokenize

_SOURCE_KEYS = ("path", "image", "audio", "url")


def _local(source: str, root: Path) -> str:
    """A path source made absolute: relative ones under `root`, refused when they leave it."""
    if source.startswith(("http://", "https://")):
        raise ValueError(f"{source}: remote media is not fetched for training; download it and give its path")
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_absolute():
        return str(path)
    if os.path.normpath(path).split(os.sep)[0] == "..":
        raise ValueError(f"{source} leaves the data file's directory {root}; move the file inside it or give an "
                         "absolute path")
    return str(root / path)


def with_local_paths(messages: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """The messages with every media path resolved against the data file's directory `root`."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), list):
            out.append(m)
            continue
        parts = []
        for part in m["content"]:
            if isinstance(part, dict) and part.get("type") in MEDIA_TYPES:
                if m.get("role") == "assistant":
                    raise ValueError("an assistant message has an image or audio part: the model writes text "
                                     "only; put media in user (or system) messages")
                part = dict(part)
                for key in _SOURCE_KEYS:
                    if isinstance(part.get(key), str) and not part[key].startswith("data:"):
                        part[key] = _local(part[key], root)
                url = part.get("image_url")
                if isinstance(url, dict) and isinstance(url.get("url"), str) and not url["url"].startswith("data:"):
                    part["image_url"] = {**url, "url": _local(url["url"], root)}
            parts.append(part)
        out.append({**m, "content": parts})
    return out


class RecordMedia:
    """Reads and encodes the media of records for one model. `refusal`: why this model cannot take media
    (a text-only checkpoint, a plain-dialogue prompt format); records with media are then reported with it."""

    def __init__(self, model: nn.Module, refusal: str | None = None, max_soft_tokens: int | None = None):
        self.model, self.refusal, self.max_soft_tokens = model, refusal, max_soft_tokens

    def read(self, messages: list[dict[str, Any]], root: Path) -> tuple[list[dict[str, Any]], list[Expanded]]:
        """(messages as the chat template takes them, each item's expansion and soft tokens, in order)."""
        from gemmakit.media.inputs import MediaPolicy, collect
        from gemmakit.media.towers import encode

        if self.refusal:
            raise ValueError(self.refusal)
        try:
            messages, items = collect(with_local_paths(messages, root), MediaPolicy(local_paths=True, remote=False))
        except OSError as e:  # a file that is there but cannot be read (permissions, an I/O error)
            raise ValueError(f"cannot read a media file: {e}") from None
        expanded = encode(self.model, items, self.max_soft_tokens)
        # Plain CPU tensors: encode's are inference tensors, and the run keeps them for its whole length.
        return messages, [Expanded(e.kind, e.text, e.embeds.detach().cpu().clone()) for e in expanded]

    def tokenize(self, base: Tokenize, items: list[Expanded]) -> Tokenize:
        """The Tokenize of one record with these media items."""
        return MediaTokenize(base, self.model.config, items)


class MediaTokenize(Tokenize):
    """`Tokenize` for one record with media: a text holding placeholders becomes the expanded prompt's ids,
    its soft tokens riding along on the Example; the loss spans keep their meaning (rendered-text offsets)."""

    def __init__(self, base: Tokenize, config: Any, items: list[Expanded]):
        self.tokenizer, self.max_length, self.bos = base.tokenizer, base.max_length, base.bos
        self.config, self.items = config, items

    def _placeholders(self, text: str) -> list[tuple[int, str]]:
        from gemmakit.media.prompt import placeholder

        return sorted((m.start(), kind) for kind in {i.kind for i in self.items}
                      for m in re.finditer(re.escape(placeholder(self.config, kind)), text))

    def spans(self, text: str, spans: Any, eos: bool = False) -> Example:
        from gemmakit.media.prompt import encode_with_media

        found = self._placeholders(text)
        if not found:
            return super().spans(text, spans, eos)
        items = self.items[:len(found)]  # a turn's own example holds the media of its history only
        add_bos = not text.startswith(self.bos)
        ids, media = encode_with_media(self.tokenizer, self.config, text, items, add_bos)
        labels = self._labels(text, spans, found, items, add_bos, ids)
        return self.checked(ids, labels, eos, media)

    def _labels(self, text: str, spans: Any, found: list[tuple[int, str]], items: list[Expanded], add_bos: bool,
                ids: list[int]) -> list[int]:
        """Labels aligned with encode_with_media's `ids`: text tokens scored by their rendered-text offset,
        the expansion's own text and its soft-token runs never."""
        from gemmakit.media.prompt import SOFT_TEXT, placeholder

        pieces: list[list[tuple[str, int | None]]] = [[]]  # text between soft runs: (fragment, rendered offset)
        runs: list[int] = []
        at = 0
        for (start, kind), item in zip(found, items, strict=True):
            soft = SOFT_TEXT[(self.config.media_type, kind)]
            parts = re.split(f"((?:{re.escape(soft)})+)", item.text)
            pieces[-1] += [(text[at:start], at), (parts[0], None)]
            for run, after in zip(parts[1::2], parts[2::2], strict=True):
                runs.append(len(run) // len(soft))
                pieces.append([(after, None)])
            at = start + len(placeholder(self.config, kind))
        pieces[-1].append((text[at:], at))
        got: list[int | None] = [self.tokenizer.bos_id] if add_bos else []
        labels = [IGNORE] * len(got)
        for i, piece in enumerate(pieces):
            origin = [o + k if o is not None else -1 for s, o in piece for k in range(len(s))]
            enc = self.tokenizer.backend.encode("".join(s for s, _ in piece), add_special_tokens=False)
            for token, (start, _) in zip(enc.ids, enc.offsets, strict=True):
                got.append(token)
                inside = start < len(origin) and any(a <= origin[start] < b for a, b in spans)
                labels.append(token if inside else IGNORE)
            if i < len(runs):
                got += [None] * runs[i]
                labels += [IGNORE] * runs[i]
        if len(got) != len(ids) or any(g is not None and g != t for g, t in zip(got, ids, strict=True)):
            raise ValueError("the loss mask could not be aligned with the tokens of the prompt expanded for its "
                             "media; check the record's text for unusual control characters")
        return labels


def rows_media(examples: list[Example], shape: torch.Size, kinds: frozenset[str],
               device: torch.device | str) -> Media | None:
    """The soft tokens of a right-padded batch [B, T] (positions 0.. per row), None for text-only rows."""
    positions = torch.arange(shape[1], device=device).expand(shape[0], shape[1])
    return batch_media([e.media if isinstance(e.media, PromptMedia) else None for e in examples], positions, kinds)
