"""Where the time of one greedy pick through the head screen goes, at 1, 2 and 8 rows, on the default model.

The screen (gemmakit.runtime.screen) picks a greedy token in steps: the pass over the head's cheap copy, the
bound added to each token's sum, the top candidates, and their exact logits (rescoring, then the certificate).
This times, eager, as an engine of the model would run them: the pass alone (gemv.screen_int8), the upper
bounds the screen ranks (pass and bound), and the whole pick (HeadScreen.forward), median of --repeats, on
random hidden states. Steps a plan does not screen on this machine are listed as such. Run it on two revisions
(PYTHONPATH=<worktree>/src) to see what a change to the pick gained; docs/performance.md quotes it.

Run: .venv/bin/python benchmarks/screen_pick.py [--quantize int4|int8|none] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gemmakit.bench import format_table
from gemmakit.checkpoints import load_model_and_tokenizer, resolve
from gemmakit.engine import Engine
from gemmakit.runtime import gemv

sys.path.insert(0, str(Path(__file__).parent))
from int4_prompt import median_ms  # noqa: E402


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", choices=("int4", "int8", "none"), default="none")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--repeats", type=int, default=31)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    quantize = None if args.quantize == "none" else args.quantize
    model, _ = load_model_and_tokenizer(resolve(None), dtype, torch.device("cpu"), quantize, False)
    engine = Engine(model, max_batch=8, context=256, compile=False)
    screen = engine.runtime.screen
    print(engine.plan.describe())
    rows = []
    for n in (1, 2, 8):
        if screen is None or not screen.usable(n, False):
            rows.append({"rows": n, "screened": "no"})
            continue
        x = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(n)) * 3
        x_norm = x.norm(dim=-1, keepdim=True)
        timed = {"pass ms": median_ms(lambda x=x: gemv.screen_int8(x, screen.cheap, screen.scale), args.repeats)
                 if screen.gemv_kernel else None,
                 "pass + bound ms": median_ms(lambda x=x, xn=x_norm: screen._screen(x, xn, "packed"), args.repeats),
                 "whole pick ms": median_ms(lambda x=x: screen(x), args.repeats)}
        rows.append({"rows": n, "screened": "yes", **timed})
    print(format_table(rows))


if __name__ == "__main__":
    main()
