"""Why the greedy head screen reads an int8 copy with x on a 14-bit grid: the candidates narrower ones would need.

The screen (gemmakit.runtime.screen) certifies a greedy pick with a bound per token,
|x . w - s| <= |x| |w - b| + |x - x~| |b| (+ float rounding), so a token must be rescored exactly whenever its
screened score plus that bound reaches the best exact logit. Fewer bytes per weight (an int4 copy would halve
a one-row step's largest read) or fewer bits of x (8-bit x would let AVX2 multiply-add bytes, vpmaddubsw,
instead of 16-bit pairs) widen the bound. This feeds the default model's final hidden states at every position
of a text to each precision (symmetric, one scale per row of the head, or per `group` weights; x with one scale
per row) and prints how many of the 262k tokens reach the best logit: the candidates a certificate would have
to rescore. The screen rescores 64; past that, a row falls back to the full head. docs/performance.md ("Narrower
screens") quotes it.

Run: .venv/bin/python benchmarks/screen_bits.py [--text README.md] [--tokens 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from screen_certificate import final_hidden
from torch import Tensor

from gemmakit.bench import format_table

# (bits of the copy, weights per scale or 0 for one per row, bits of x)
VARIANTS = [(8, 0, 14), (8, 0, 8), (8, 0, 7), (8, 0, 6), (6, 0, 14), (5, 0, 14), (4, 0, 14), (4, 64, 14),
            (4, 32, 14)]


def rounded(t: Tensor, bits: int, group: int) -> Tensor:
    """`t` [R, H] on a symmetric grid of `bits` bits, one scale per row or per `group` values."""
    levels = 2 ** (bits - 1) - 1
    g = t.view(t.shape[0], -1, group or t.shape[1])
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-30) / levels
    return ((g / scale).round().clamp(-levels, levels) * scale).view_as(t)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    ap.add_argument("--tokens", type=int, default=400)
    args = ap.parse_args()
    model, x = final_hidden(Path(args.text).read_text(), args.tokens, torch.float32)
    w = model.model.embed_tokens.weight.float()
    best = (x @ w.T).amax(-1)
    x_norm = x.norm(dim=-1)
    peak = (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).median()
    print(f"{x.shape[0]} positions; x's largest value over its root mean square, median over positions: {peak:.1f}")
    rows = []
    for bits, group, x_bits in VARIANTS:
        b = rounded(w, bits, group)
        xq = rounded(x, x_bits, 0)
        upper = xq @ b.T + x_norm[:, None] * (w - b).norm(dim=-1) + (x - xq).norm(dim=-1)[:, None] * b.norm(dim=-1)
        need = (upper >= best[:, None]).sum(-1).float()
        q = torch.quantile(need, torch.tensor([0.5, 0.9, 0.99]))
        rows.append({"copy": f"int{bits}, scale per {group or 'row'}", "x": f"{x_bits}-bit",
                     "copy MB": round(w.numel() * bits / 8e6 + w.numel() / (group or w.shape[1]) * 4e-6),
                     "median": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(need.max()),
                     "over 64": f"{(need > 64).float().mean():.0%}"})
    print(format_table(rows))


if __name__ == "__main__":
    main()
