"""SynthID-Text-style watermarking (Dathathri et al., Nature 2024): tournament sampling keyed by secret integers,
and a detector that needs only the tokenizer and the keys.

Generation (`WatermarkProcessor`, a logits processor that the front end enabling the watermark hands the
sampler in `SamplingParams.logits_processors`; the sampler knows nothing of watermarks): at each sampled step
the last `ngram_len - 1` tokens are hashed into a context; every candidate token, with each of the `depth`
keys, gets a pseudo-random bit g(context, token, key). The distribution the sampler would draw from (after
temperature, top-k, top-p) is then reweighted by a non-distortionary two-leaf tournament per key,

    p <- p * (1 + g_l - sum_v g_l(v) p(v))       for l = 1..depth,

which keeps p a distribution (its expectation over keys is p itself) while making tokens with g = 1 likelier.
A context already seen in this sequence (within `history` steps) is left unwatermarked, as in the reference:
repeating text would otherwise repeat a bias. Greedy rows are never watermarked (there is nothing to tilt).

Detection: recompute g for every scored token of a text (the same masking: repeated contexts and end tokens
are skipped) and test the mean against 1/2. Without the watermark the bits are fair coin flips, so the count
of ones over N bits is Binomial(N, 1/2): the p-value is its upper tail (normal approximation, continuity
corrected), and the score is the mean g. Hashing is an LCG over int64 with wraparound, finished by
MurmurHash3's fmix64 so every bit of the result is well mixed.
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

_MULT = 6364136223846793005
_FMIX1, _FMIX2 = 0xFF51AFD7ED558CCD - (1 << 64), 0xC4CEB9FE1A85EC53 - (1 << 64)  # as signed int64


@dataclass(frozen=True)
class WatermarkConfig:
    keys: tuple[int, ...]
    ngram_len: int = 5
    history: int = 1024  # steps back in which a repeated context is left unwatermarked

    def __post_init__(self) -> None:
        if not self.keys or self.ngram_len < 2:
            raise ValueError("a watermark needs at least one key and ngram_len >= 2")

    @property
    def depth(self) -> int:
        return len(self.keys)


def _wrap(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def context_hash(tokens: Sequence[int]) -> int:
    h = 1
    for t in tokens:
        h = _wrap((h + int(t)) * _MULT + 1)
    return h


def _fmix(x: Tensor) -> Tensor:
    # Logical right shifts on signed int64: arithmetic shift, then clear the sign-extended bits.
    x = x ^ ((x >> 33) & ((1 << 31) - 1))
    x = x * _FMIX1
    x = x ^ ((x >> 33) & ((1 << 31) - 1))
    x = x * _FMIX2
    return x ^ ((x >> 33) & ((1 << 31) - 1))


def g_values(config: WatermarkConfig, context: int, tokens: Tensor) -> Tensor:
    """Bits g [n, depth] (0/1, int64) of candidate `tokens` [n] after a context with hash `context`."""
    h = (tokens.long() + context) * _MULT + 1
    keys = torch.tensor(config.keys, dtype=torch.long, device=tokens.device)
    k = (h[:, None] + keys[None, :]) * _MULT + 1
    return (_fmix(k) >> 31) & 1


def repeats_context(config: WatermarkConfig, history: Sequence[int], start: int) -> bool:
    """Whether the current context (the last ngram_len - 1 tokens) already preceded one of the generated tokens
    history[start:] within the last `config.history` steps. Compared as token n-grams in one vectorised pass,
    not hash by hash in Python: this runs on every sampled step of a watermarked row. (Equal n-grams have equal
    hashes, so the detector, which compares hashes, masks the same steps.)"""
    n = config.ngram_len - 1
    first = max(start, len(history) - config.history, n)
    if first >= len(history):
        return False
    grams = torch.tensor(history[first - n:], dtype=torch.long).unfold(0, n, 1)  # row i: context of first + i
    return bool((grams[:-1] == grams[-1]).all(dim=-1).any())  # the last row is the current context


def tilt(config: WatermarkConfig, probs: Tensor, history: Sequence[int], prompt_len: int) -> Tensor:
    """The tournament-reweighted distribution for the next token (probs [V]), or probs itself where the
    context is too short or repeats one this sequence already used."""
    n = config.ngram_len - 1
    if len(history) < n:
        return probs
    if repeats_context(config, history, prompt_len):
        return probs
    context = context_hash(history[-n:])
    kept = probs.nonzero()[:, 0]
    p = probs[kept].double()
    g = g_values(config, context, kept).double()
    for layer in range(config.depth):
        p = p * (1 + g[:, layer] - (g[:, layer] * p).sum())
    return torch.zeros_like(probs).index_copy(0, kept, p.to(probs.dtype))


@dataclass(frozen=True)
class WatermarkProcessor:
    """The watermark as a logits processor (sampling.LogitsProcessor): `SamplingParams(logits_processors=
    (WatermarkProcessor(config),), temperature=...)`. It turns the row's tempered, truncated logits into the
    distribution the sampler would draw from, tilts it (`tilt`) and hands back its log; dropped tokens stay
    dropped. Stateless, so one instance can serve every row and request."""

    config: WatermarkConfig
    name: ClassVar[str] = "a watermark"  # in the sampler's messages ("a watermark needs sampling: ...")

    def __call__(self, logits: Tensor, tokens: Sequence[int], prompt_len: int) -> Tensor:
        return tilt(self.config, logits.softmax(dim=-1), tokens, prompt_len).log()


@dataclass
class Detection:
    score: float  # mean g over the scored bits: ~0.5 without the watermark
    p_value: float  # chance of a score this high in unwatermarked text
    tokens: int  # tokens scored (after masking)


def detect(config: WatermarkConfig, ids: Sequence[int], skip: Sequence[int] = ()) -> Detection:
    """Score token ids (a text's tokens, without BOS). `skip`: ids never scored (end-of-text markers)."""
    n, skip = config.ngram_len - 1, set(skip)
    recent: deque[int] = deque()  # the contexts of the last `history` scored steps, and how often each occurs
    counts: Counter[int] = Counter()
    bits, count = 0, 0
    for t in range(n, len(ids)):
        if ids[t] in skip:
            continue
        context = context_hash(ids[t - n:t])
        repeated = counts[context] > 0
        recent.append(context)
        counts[context] += 1
        if len(recent) > config.history:
            counts[recent.popleft()] -= 1
        if repeated:
            continue
        g = g_values(config, context, torch.tensor([ids[t]]))
        bits += int(g.sum())
        count += 1
    total = count * config.depth
    if total == 0:
        return Detection(0.5, 1.0, 0)
    z = (bits - 0.5 - total / 2) / math.sqrt(total / 4)
    return Detection(bits / total, 0.5 * math.erfc(z / math.sqrt(2)), count)


def load_config(path: str | Path) -> WatermarkConfig:
    """Keys from a JSON file: {"keys": [int, ...], "ngram_len": 5}. Keep it secret: it is the watermark."""
    try:
        data = json.loads(Path(path).read_text())
        return WatermarkConfig(tuple(int(k) for k in data["keys"]), int(data.get("ngram_len", 5)),
                               int(data.get("history", 1024)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a watermark key file ({{\"keys\": [...], \"ngram_len\": 5}}): {e}") from None


def new_keys(depth: int = 30) -> list[int]:
    """Fresh random keys (from the OS's entropy)."""
    import secrets

    return [secrets.randbits(63) for _ in range(depth)]
