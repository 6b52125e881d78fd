"""Exact greedy picks that read the output head at half its size: screen in bf16, certify, rescore in fp32.

Why. A one-row decode step of Gemma 3 270M in float32 streams 1.07 GB of weights, and 671 MB of that is the
tied 262k x 640 output head, read in full to take one argmax. Decoding is bound by memory bandwidth on CPU,
so the head alone is ~60% of the step. A bf16 copy of the head gives every logit to within a bound known
exactly per token, at half the bytes; only the few tokens whose bound reaches the best one need their exact
float32 logit, which is 16 rows of the table, not 262,144.

The bound. For vocabulary row w (float32), its bf16 copy b and the step's final hidden state x, the screen
computes s = x~ . b in float32 (x~ = x, or x rounded to bf16 where oneDNN's bf16 kernel does the product) and
  |x . w - s| <= |x| |w - b| + |x - x~| |b| + g |x~| |b| (+ the rounding of s to bf16, where it is rounded)
by Cauchy-Schwarz, with g = n u / (1 - n u) the worst float32 error of an n-term dot product in any order
(u = 2^-24). |w - b| and |b| are per token and precomputed; the norms of x are per step.

The certificate. Take the K + 1 highest upper bounds (s + bound), compute exact logits for the first K from
the float32 table, and pick their argmax. If the (K + 1)-th upper bound is below that best logit less its
own rounding allowance, no token outside the K can beat it, so the pick is the argmax of the float32 logits:
the token plain greedy decoding gives, except where the two best exact logits are within float32 rounding
of each other (where two float32 kernels may disagree anyway). A step whose certificate fails for a row
computes the full head instead (counted in `HeadScreen.fallbacks`; none in 128 greedy steps of the 270M).

When it applies. Float32 models with the tied head, on CPU, for rows whose token is a plain argmax of the raw
logits: temperature 0, no penalties, bias, loop-guard penalty, constraint or logprobs (each of those reads
logits the screen never computes). The engine decides per step (engine.py); a step with any other row uses
the full head. Memory: the bf16 copy (+336 MiB for the 270M) and, for multi-row steps on packed models,
oneDNN's packed layout of it (another 336 MiB); the engine's forecast counts both. Measured effect
(benchmarks/engine_vs_peers.py, README): one-row fp32 decode of the 270M 1.4-1.5x faster.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gemmakit.packing import PackedLinear, packed_linear, packing_supported

CANDIDATES = 16  # exact rescoring costs 16 x 640 x 4 bytes; a wider gap fails the certificate less often
_U32, _U16 = 2.0**-24, 2.0**-8  # unit roundoff of float32 and bfloat16


def head_weight(model: nn.Module) -> Tensor | None:
    """The float32 tied output head (the embedding table) of a Gemma on CPU, or None where there is no such
    head to screen (a quantized head, another dtype or device)."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", "absent")
    tied = head is None or (isinstance(head, PackedLinear) and head.weight is not None
                            and embed is not None and head.weight.data_ptr() == embed.weight.data_ptr())
    if not tied or not isinstance(embed, nn.Embedding):
        return None
    w = embed.weight
    return w.detach() if w.dtype == torch.float32 and w.device.type == "cpu" else None


class HeadScreen(nn.Module):
    """A bf16 screen over a float32 head `weight` [V, H] (not copied: rescoring reads it). `packed` also
    keeps oneDNN's layout of the copy, for multi-row steps (packing.py says why that layout is faster)."""

    def __init__(self, weight: Tensor, packed: bool = False, candidates: int = CANDIDATES):
        super().__init__()
        self.exact, self.k = weight, candidates
        cheap = weight.to(torch.bfloat16)
        self.register_buffer("cheap", cheap, persistent=False)
        # Norms in small blocks of rows: a float32 copy of the table would be a transient of its size, and
        # blocks of tens of MB fragment the heap (8192 rows left 0.6 GiB behind on the 270M; 1024: nothing).
        delta_norm, cheap_norm = [], []
        for w, c in zip(weight.split(1024), cheap.split(1024), strict=True):
            delta_norm.append((w - c.float()).norm(dim=-1))
            cheap_norm.append(c.float().norm(dim=-1))
        self.register_buffer("delta_norm", torch.cat(delta_norm), persistent=False)
        self.register_buffer("cheap_norm", torch.cat(cheap_norm), persistent=False)
        n = weight.shape[1]
        self.gamma = n * _U32 / (1 - n * _U32)
        self.rescore_slack = self.gamma * float(weight.norm(dim=-1).max())
        self.packed = PackedLinear(cheap) if packed and packing_supported(cheap) else None
        self.fallbacks = 0

    def usable(self, rows: int, compiled: bool) -> bool:
        """Whether a step of `rows` rows can use the screen: eager float32 GEMMs over the bf16 copy would
        read more than the head itself, so it needs inductor's one-row pass or oneDNN's packed copy."""
        return (compiled and rows == 1) or self.packed is not None

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.buffers())
        return own + (self.packed.packed_bytes if self.packed is not None else 0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, H] final hidden states (after the norm). Returns (tokens [B], certified [B] bool)."""
        x = x.float()
        x_norm = x.norm(dim=-1, keepdim=True)
        values, indices = top_k(self._screen(x, x_norm), self.k + 1)
        idx = indices[:, : self.k]
        exact = (x[:, None, :] * self.exact[idx]).sum(-1)  # [B, K] float32 logits of the candidates
        best = exact.argmax(dim=-1, keepdim=True)
        tokens = idx.gather(1, best)[:, 0]
        certified = values[:, self.k] < exact.gather(1, best)[:, 0] - x_norm[:, 0] * self.rescore_slack
        return tokens, certified

    def _screen(self, x: Tensor, x_norm: Tensor) -> Tensor:
        """Upper bounds [B, V] of the float32 logits (module docstring)."""
        if x.shape[0] == 1 and torch.compiler.is_compiling():
            # Inductor turns this into one vectorised pass over the bf16 table (compiled.py), float32 sums.
            s = (x[:, None, :] * self.cheap.float()).sum(-1)
            return s + x_norm * (self.delta_norm + self.gamma * self.cheap_norm) * (1 + 4 * _U32)
        if self.packed is None:
            raise RuntimeError("this screen has no packed copy: use it in compiled one-row steps (see `usable`)")
        x16 = x.to(torch.bfloat16)
        s = packed_linear(x16, self.packed.handle, self.packed.out_features).float()
        x16f = x16.float()
        rounding = (x - x16f).norm(dim=-1, keepdim=True)
        bound = (x_norm * self.delta_norm + (rounding + self.gamma * x16f.norm(dim=-1, keepdim=True))
                 * self.cheap_norm + 2 * _U16 * s.abs())
        return s + bound * (1 + 4 * _U32)


def top_k(x: Tensor, k: int, block: int = 1024) -> tuple[Tensor, Tensor]:
    """x.topk(k) of [B, V] rows (values, indices), over the k blocks of `block` values with the highest
    maxima: the k largest values lie in those, since each block outside holds nothing above the k-th largest
    block maximum. torch's CPU topk over a 262k row takes ~0.2 ms a row (1.4 ms of an 8-row step); block
    maxima vectorise."""
    rows, width = x.shape
    if width % block or width < 4 * k * block:
        return x.topk(k, dim=-1)
    blocks = x.view(rows, width // block, block)
    chosen = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [B, k]
    values, at = blocks.gather(1, chosen[..., None].expand(-1, -1, block)).flatten(1).topk(k, dim=-1)
    return values, chosen.gather(1, at // block) * block + at % block


def plan_screen(model: nn.Module, max_batch: int, compiled: bool) -> tuple[Tensor, bool] | None:
    """(head weight, packed) for an engine of `max_batch` rows over `model`, or None where no screen applies
    or none could be used: the packed copy is for multi-row or eager steps, and only on a packed model (an
    unpacked one is a model set up for something other than fast decoding)."""
    weight = head_weight(model)
    if weight is None:
        return None
    packed = (isinstance(getattr(model, "lm_head", None), PackedLinear) and (max_batch > 1 or not compiled)
              and packing_supported(weight[:1].to(torch.bfloat16)))
    return (weight, packed) if packed or compiled else None


def screen_bytes(weight: Tensor, packed: bool) -> int:
    """Memory a `HeadScreen(weight, packed)` holds: the bf16 copy (twice when packed) and two norms a token."""
    vocab, width = weight.shape
    return vocab * width * 2 * (2 if packed else 1) + 2 * vocab * 4
