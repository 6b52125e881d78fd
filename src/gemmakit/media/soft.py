"""Soft tokens in a forward pass: which positions they replace, and which of them see each other.

A prompt with an image holds N placeholder ids where the image's soft tokens go. The decoder embeds the
prompt as text (placeholders embedded as the pad id, as the reference does, so the E-series per-layer
embeddings see pad there) and then overwrites those rows with the soft tokens. `PromptMedia` is that for one
prompt; `Media` is the same for the rows of one forward pass, cut to the chunk of positions it covers.

Bidirectional blocks are kept as position spans rather than per-token block ids: the mask rule "a query in
a block sees every key of its block" becomes `span_lo[q] <= k_pos < span_hi[q]`, which needs only the key
positions a `Step` already knows, so the same rule serves a fresh prefill, a continuation over a cache and a
chunked prompt (as long as a chunk never splits a block: `safe_chunk_end`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class MediaError(ValueError):
    """An image or audio input gemmakit cannot use; the message says what to do."""


@dataclass
class Expanded:
    """One item after its processor and tower: the text replacing its placeholder (soft slots spelled as
    the processor spells them) and its soft tokens [n, H], n = the number of slots in `text`."""

    kind: str
    text: str
    embeds: Tensor


@dataclass
class PromptMedia:
    """One prompt's soft tokens: `embeds` [N, H] for the placeholder `positions` [N] (ascending), and the
    `spans` [(start, end)] of blocks whose tokens attend to each other both ways."""

    embeds: Tensor
    positions: Tensor
    spans: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.embeds.shape[0] != self.positions.shape[0]:
            raise ValueError(f"{self.embeds.shape[0]} soft tokens for {self.positions.shape[0]} placeholders")

    def safe_chunk_end(self, start: int, end: int) -> int:
        """`end` moved so that a chunked prefill sees each bidirectional block whole: back to the start of a
        block it would cut, or, for a block that starts the chunk and is longer than it, to the block's end."""
        for lo, hi in self.spans:
            if lo < end < hi:
                return lo if lo > start else hi
        return end


@dataclass
class Media:
    """Soft tokens for one forward pass over rows [B, T]: `embeds` [N, H] for the True cells of `where`
    [B, T] in row-major order; `span_lo`/`span_hi` [B, T] the key positions each query also sees (empty
    span: none), applied on the layer kinds in `kinds`."""

    embeds: Tensor
    where: Tensor
    span_lo: Tensor
    span_hi: Tensor
    kinds: frozenset[str] = frozenset()

    def overlay(self, kind: str, key_pos: Tensor) -> Tensor | None:
        """[B, 1, T, S] keys (at positions key_pos [B, S]) each query sees through its block, or None."""
        if kind not in self.kinds or not bool((self.span_hi > self.span_lo).any()):
            return None
        k = key_pos[:, None, :]
        return ((k >= self.span_lo[..., None]) & (k < self.span_hi[..., None]))[:, None]


def batch_media(prompts: list[PromptMedia | None], positions: Tensor, kinds: frozenset[str]) -> Media | None:
    """The `Media` of rows whose positions are `positions` [B, T] (a chunk may start past 0), from each row's
    prompt media (None: a text-only row). None when no row has a soft token in this chunk."""
    B, T = positions.shape
    device = positions.device
    where = torch.zeros(B, T, dtype=torch.bool, device=device)
    lo = torch.zeros(B, T, dtype=torch.long, device=device)
    hi = torch.zeros(B, T, dtype=torch.long, device=device)
    embeds: list[Tensor] = []
    for b, pm in enumerate(prompts):
        if pm is None:
            continue
        first = int(positions[b, 0])
        inside = (pm.positions >= first) & (pm.positions < first + T)
        if not bool(inside.any()):
            continue
        cols = (pm.positions[inside] - first).to(device)
        where[b, cols] = True
        embeds.append(pm.embeds[inside.to(pm.embeds.device)])
        for s, e in pm.spans:
            a, z = max(s, first) - first, min(e, first + T) - first
            if a < z:
                lo[b, a:z], hi[b, a:z] = s, e
    if not embeds:
        return None
    return Media(torch.cat(embeds).to(device), where, lo, hi, kinds)
