"""How often the greedy head screen certifies its pick on real text, per copy of the head and candidate count.

The screen (gemmakit.runtime.screen) reads a cheaper copy of the 262k-row head, rescores its top candidates
exactly, and certifies the pick only if no other token's upper bound reaches it; an uncertified row costs its
step the full head (on an 8-row step, every row's). This feeds the default model's final hidden states at
every position of a text (the README by default) to each screen and prints, per copy and candidate count,
the share of positions certified, settled from their bounds (HeadScreen.settle) and left to the full head, how
many tokens' bounds reached the floor (what settling rescores), and whether any pick differs from the full
head's argmax (never expected). The int4 copy (for one-row steps) settles most rows. docs/performance.md
("The greedy head screen") quotes it.

Run: .venv/bin/python benchmarks/screen_certificate.py [--text README.md] [--tokens 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from gemmakit.bench import format_table
from gemmakit.cache import KVCache, Prefill
from gemmakit.checkpoints import load_model_and_tokenizer, resolve
from gemmakit.runtime import gemv
from gemmakit.runtime.probe import fbgemm_fp16
from gemmakit.runtime.screen import QUARTER_GROUP, HeadScreen, head_weight


def screens(head: torch.Tensor) -> dict[str, dict]:
    """The screens `head` can have on this machine, as HeadScreen arguments."""
    dtype = head.dtype
    out: dict[str, dict] = {}
    if gemv.unavailable() is None:
        out.update({f"int8, AVX2 kernel, {k} candidates": {"gemv_kernel": True, "candidates": k} for k in (16, 64)})
        if gemv.int4_fits(*head.shape, QUARTER_GROUP):  # torch's AVX2 int4 packing, which the kernel reads
            out["int4, AVX2 kernel, one-row steps"] = {"gemv_kernel": True, "quarter": True, "rows": (1, 1)}
    if dtype == torch.float32 and fbgemm_fp16():
        out["fp16 (fbgemm), 16 candidates"] = {"half": True}
    return out


def final_hidden(text: str, tokens: int, dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    """The default model in `dtype` and its final hidden states [T, H] (after the norm, what the head reads) at
    every position of the first `tokens` tokens of `text`, in one prefill."""
    model, tok = load_model_and_tokenizer(resolve(None), dtype, torch.device("cpu"), None, False)
    ids = tok.encode(text)[:tokens]
    cache = KVCache(model.config, 1, len(ids), dtype, torch.device("cpu"), 8)
    step = Prefill(torch.arange(len(ids))[None], cache, torch.tensor([0]))
    return model, model.hidden(torch.tensor([ids]), step=step)[0]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model, hidden = final_hidden(Path(args.text).read_text(), args.tokens, dtype)
        positions = hidden.shape[0]
        full = model.head(hidden).float().argmax(-1)
        for name, kwargs in screens(head_weight(model)).items():
            screen = HeadScreen(head_weight(model), **kwargs)
            step = 1 if kwargs.get("quarter") else 8  # the int4 copy serves one-row steps; else a batch-8 engine's
            certified = wrong = fell_back = 0
            reached = []  # per row: tokens whose upper bound reaches the floor (what settling rescores)
            for i in range(0, positions, step):
                x = hidden[i:i + step]
                tokens, ok, upper, floor = screen(x, layout="packed")
                certified += int(ok.sum())
                for r in range(x.shape[0]):
                    token = int(tokens[r]) if ok[r] else screen.settle(x[r], upper[r], floor[r])
                    reached.append(int((upper[r] >= floor[r]).sum()))
                    fell_back += token is None
                    wrong += token is not None and token != int(full[i + r])
            at_floor = torch.tensor(reached, dtype=torch.float64)
            rows.append({"head": str(dtype).removeprefix("torch."), "screen": name, "positions": positions,
                         "certified": f"{certified / positions:.1%}", "settled": f"{screen.settled / positions:.1%}",
                         "full head": f"{fell_back / positions:.1%}",
                         "tokens at the floor, median / p90 / max": " / ".join(
                             f"{v:.0f}" for v in (at_floor.median(), at_floor.quantile(0.9), at_floor.max())),
                         "picks not the argmax": wrong})
    print(format_table(rows))


if __name__ == "__main__":
    main()
