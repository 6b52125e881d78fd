"""Speculative decoding on the real 270M: decode tokens/s and acceptance against plain decoding, at its bounds.

Rows, per batch size, all greedy, `draft_tokens` guesses a row per step:
- plain: the engine without a drafter;
- self: the 270M as its own drafter (ModelDrafter of the same weights, its own cache): every guess is accepted,
  the upper bound on acceptance. It is no speed-up (the drafter costs what the target costs); it shows what a
  round of k + 1 tokens costs when nothing is thrown away;
- random: a drafter of the 270M's shape with random weights: (almost) every guess is rejected, the lower bound;
  each round yields one token, so its rate against plain's is what rejected drafts cost.

The overhead of a rejected draft is split from the random run: the drafter's own time (timed around
`propose`) and the target's verification pass over k + 1 positions against plain's one-token step, per draft.
Every engine is eager (the verification pass is; compiled plain decoding would compare a different thing).
On a shared machine other processes slow some passes, so every configuration runs `--repeats` times,
interleaved, and its fastest pass counts.

Run: .venv/bin/python benchmarks/speculative.py [--batch 1 4] [--new-tokens 64] [--draft-tokens 4]
     [--threads 2] [--repeats 2] [--json runs/speculative.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from gemmakit.bench import BenchResult, format_table, run_engine_bench
from gemmakit.checkpoints import default_model_path, load_model
from gemmakit.model import Gemma
from gemmakit.speculative import ModelDrafter, TargetState
from gemmakit.tokenizer import Tokenizer


class Timed:
    """A drafter that times the one it wraps (seconds spent proposing)."""

    def __init__(self, inner: ModelDrafter):
        self.inner, self.seconds = inner, 0.0

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def propose(self, sequences: list[list[int]], k: int, target: TargetState) -> list[list[int]]:
        t0 = time.perf_counter()
        out = self.inner.propose(sequences, k, target)
        self.seconds += time.perf_counter() - t0
        return out

    def rollback(self, row: int, n: int) -> None:
        self.inner.rollback(row, n)

    def release(self, row: int) -> None:
        self.inner.release(row)


def random_like(model: Gemma, seed: int = 0) -> Gemma:
    """A model of `model`'s configuration with freshly initialised (random) weights and a random output head of
    its own: with the head tied to the random embedding it would mostly predict its input token again (the
    residual stream keeps it), a 'repeat the last token' drafter that real text often agrees with."""
    torch.manual_seed(seed)
    drafter = Gemma(model.config).eval()
    drafter.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    return drafter


PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Within fifty "
          "years presses were working in more than two hundred European cities, and the price of books fell so far "
          "that ordinary merchants could own them. Historians usually describe three consequences of this change:")


def run(model: Gemma, kind: str, drafter_model: Gemma | None, args: argparse.Namespace, batch: int,
        prompt: list[int]) -> dict:
    context = args.prompt_len + args.new_tokens + args.draft_tokens + 8
    drafter = None if drafter_model is None else Timed(ModelDrafter(drafter_model, batch, context))
    r: BenchResult = run_engine_bench(model, batch, args.prompt_len, args.new_tokens, context=context,
                                      drafter=drafter, draft_tokens=args.draft_tokens, prompt=prompt)
    decoded = batch * (args.new_tokens - 1)
    seconds = decoded / r.decode_tok_s
    row = {"drafter": kind, "batch": batch, "k": args.draft_tokens if drafter else 0,
           "decode tok/s": r.decode_tok_s, "accept": r.acceptance, "tok/round": r.tokens_per_round,
           "ms/step": 1e3 * seconds / (decoded / batch / (r.tokens_per_round or 1.0))}
    if drafter is not None:
        steps = decoded / batch / r.tokens_per_round
        row["draft ms/step"] = 1e3 * drafter.seconds / steps
        row["verify ms/step"] = row["ms/step"] - row["draft ms/step"]
    return row


def rejected_draft_overhead(rows: list[dict], k: int) -> list[dict]:
    """Per batch: what one rejected draft costs, from the random drafter's steps against plain ones."""
    out = []
    for b in sorted({r["batch"] for r in rows}):
        plain = next(r for r in rows if r["batch"] == b and r["drafter"] == "plain")
        rand = next(r for r in rows if r["batch"] == b and r["drafter"] == "random")
        out.append({"batch": b, "plain ms/step": plain["ms/step"], "random ms/step": rand["ms/step"],
                    "draft ms/step": rand["draft ms/step"], "verify ms/step": rand["verify ms/step"],
                    "ms per rejected draft": (rand["ms/step"] - plain["ms/step"]) / k,
                    "of which target ms": (rand["verify ms/step"] - plain["ms/step"]) / k,
                    "slowdown": rand["ms/step"] / plain["ms/step"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompt-len", type=int, default=64, help="at most the built-in prompt's length")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="passes over every configuration; the fastest counts")
    ap.add_argument("--json", type=Path, default=Path("runs/speculative.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()  # the embedded 270M, float32
    rand = random_like(model)
    prompt = Tokenizer.from_gguf(default_model_path()).encode(PROMPT)
    args.prompt_len = min(args.prompt_len, len(prompt))
    best: dict[tuple[int, str], dict] = {}
    for _ in range(args.repeats):  # configurations interleaved, the fastest pass of each kept (see above)
        for batch in args.batch:
            for kind, drafter in (("plain", None), ("self", model), ("random", rand)):
                row = run(model, kind, drafter, args, batch, prompt)
                print(row, flush=True)
                if (batch, kind) not in best or row["decode tok/s"] > best[batch, kind]["decode tok/s"]:
                    best[batch, kind] = row
    rows = list(best.values())
    overhead = rejected_draft_overhead(rows, args.draft_tokens)
    print(format_table(rows))
    print()
    print(format_table(overhead))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "rejected_draft": overhead, "cpus": os.cpu_count(),
                                     "torch": torch.__version__}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
