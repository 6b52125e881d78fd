"""A rendered chat prompt with images or audio -> token ids and the soft tokens that go with them.

The chat template writes one placeholder per image or clip (Gemma 3: `<start_of_image>`, Gemma 4: `<|image|>`,
`<|audio|>`); the family's processor says what that placeholder becomes (Gemma 3: `\\n\\n<start_of_image>`,
N soft-token placeholders, `<end_of_image>\\n\\n`; with pan-and-scan also the crops and their sentence). We
expand the prompt text the way transformers' processor does and tokenize it, with two differences that keep
it exact and safe:

- the runs of soft-token placeholders are not tokenized but written as ids: the text pieces around a run
  always end and start at a special token (BOI / EOI), where a tokenizer splits anyway, so the ids equal
  the reference's, and a vocabulary that lacks the placeholder's text (the 270M's) still works;
- placeholders are looked for only outside the text `Tokenizer.literal` brackets, so a user who types
  `<start_of_image>` gets those characters, not an image slot.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from gemmakit.config import Config
from gemmakit.media.soft import Expanded, MediaError, PromptMedia
from gemmakit.tokenizer import LITERAL_CLOSE, LITERAL_OPEN

# What the chat template writes for one item, and how the processor spells one soft-token slot.
PLACEHOLDER = {("gemma3", "image"): "<start_of_image>", ("gemma4", "image"): "<|image|>",
               ("gemma4", "audio"): "<|audio|>", ("gemma4_unified", "image"): "<|image|>",
               ("gemma4_unified", "audio"): "<|audio|>"}
SOFT_TEXT = {("gemma3", "image"): "<image_soft_token>", ("gemma4", "image"): "<|image|>",
             ("gemma4", "audio"): "<|audio|>", ("gemma4_unified", "image"): "<|image|>",
             ("gemma4_unified", "audio"): "<|audio|>"}


def placeholder(config: Config, kind: str) -> str:
    key = (config.media_type or "", kind)
    if key not in PLACEHOLDER:
        raise MediaError(f"{config.name} does not take {kind} input" + (
            "" if config.media_type else ": it is a text-only model. Load a multimodal checkpoint "
            "(e.g. a gemma-3-4b-it or gemma-4 directory with its vision weights)"))
    return PLACEHOLDER[key]


def _outside_literals(text: str, needle: str) -> list[int]:
    """Start offsets of `needle` in `text` that are not inside literal brackets."""
    hits, inside, at = [], False, 0
    while at < len(text):
        ch = text[at]
        if ch == LITERAL_OPEN:
            inside = True
        elif ch == LITERAL_CLOSE:
            inside = False
        elif not inside and text.startswith(needle, at):
            hits.append(at)
            at += len(needle)
            continue
        at += 1
    return hits


def encode_with_media(tokenizer: Any, config: Config, rendered: str, items: list[Expanded],
                      add_bos: bool) -> tuple[list[int], PromptMedia | None]:
    """Token ids of `rendered` with each item's placeholder expanded, and the prompt's soft tokens."""
    if not items:
        return tokenizer.encode(rendered, add_bos=add_bos), None
    # Every placeholder of every kind in prompt order; each must meet an item of its kind, in order.
    found = sorted((at, kind) for kind in {i.kind for i in items}
                   for at in _outside_literals(rendered, placeholder(config, kind)))
    if [k for _, k in found] != [i.kind for i in items]:
        raise MediaError(f"the prompt has {len(found)} media placeholder(s) for {len(items)} item(s); the chat "
                         "template must write one placeholder per image / audio part")
    texts, runs = [""], []  # text pieces between soft-token runs, and the runs (kind, count)
    at = 0
    for (start, kind), item in zip(found, items, strict=True):
        texts[-1] += rendered[at:start]
        soft = re.escape(SOFT_TEXT[(config.media_type, kind)])
        parts = re.split(f"((?:{soft})+)", item.text)
        n = sum(len(p) // len(SOFT_TEXT[(config.media_type, kind)]) for p in parts[1::2])
        if n != item.embeds.shape[0]:
            raise MediaError(f"internal: {n} soft-token slots for {item.embeds.shape[0]} soft tokens")
        texts[-1] += parts[0]
        for run, after in zip(parts[1::2], parts[2::2], strict=True):
            runs.append((kind, len(run) // len(SOFT_TEXT[(config.media_type, kind)])))
            texts.append(after)
        at = start + len(placeholder(config, kind))
    texts[-1] += rendered[at:]
    ids = tokenizer.encode(texts[0], add_bos=add_bos)
    positions, spans = [], []
    for (kind, n), text in zip(runs, texts[1:], strict=True):
        # An id past the vocabulary (Gemma 3's 262144 with a 262144-entry table) is stored as pad: the model
        # reads these positions as pad anyway, and samplers that count ids never see an id out of range.
        slot = config.media_token(kind)
        slot = slot if slot is not None and 0 <= slot < config.vocab_size else config.pad_token_id
        positions.append(torch.arange(len(ids), len(ids) + n))
        if kind == "image":
            spans.append((len(ids), len(ids) + n))
        ids += [slot] * n
        ids += tokenizer.encode(text, add_bos=False)
    embeds = torch.cat([i.embeds for i in items])
    return ids, PromptMedia(embeds, torch.cat(positions), spans)
