"""Which decode-attention kernel a compiled step should use, per dtype: `decode_sdpa`, `decode_plain` and
gemmakit's CPU kernel (`gemmakit`: runtime/attention_avx2.cpp, as the plan applies it).

Where gemmakit's kernels build, the runtime plan sends a one-query-per-row step to gemmakit's kernel in half
precision and in fp32 steps with as many (row, KV head) pairs as threads, and to plain ops in narrower fp32
steps; elsewhere SDPA's fused kernel takes the steps gemmakit's would (runtime/plan.py). This script is the
measurement behind that rule: for each dtype it builds one engine per kernel (each compiled with
its attention layers given that kernel in place of the plan's), then times them in interleaved rounds of
decode steps in one process, so that both see the same machine state, and prints the median milliseconds per
step and the ratio.
The context grows by `--steps` tokens each round; with the defaults it stays under the 512-token sliding
window (`--prompt-len 8000` measures a long one).

Run: .venv/bin/python benchmarks/decode_attention.py [--dtypes bfloat16,float32] [--batch 1] [--quantize int4]
     [--narrow]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from profile_decode import narrow_model, start_decoding

from gemmakit.bench import format_table
from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.runtime.plan import _attention_choice, prepare_weights
from gemmakit.runtime.steps import set_decode_attention


def ready_engine(args: argparse.Namespace, dtype: str, kernel: str) -> Engine:
    """A compiled engine of the chosen model whose rows are prefilled and mid-decode, its attention layers given
    `kernel` for one-query steps before the first step compiles."""
    if args.narrow:
        model = narrow_model(SimpleNamespace(dtype=dtype, quantize=args.quantize))
    else:
        model = load_model(dtype=getattr(torch, dtype), quantize=args.quantize)
        prepare_weights(model, None, True)  # the layout gemmakit.api.load gives a compiled engine
    total = args.rounds * args.steps
    engine = Engine(model, max_batch=args.batch, context=args.prompt_len + total + 64, compile=True)
    set_decode_attention(model, _attention_choice(torch.device("cpu"), dtype != "float32", True)[0]
                         if kernel == "gemmakit" else kernel)
    prompts = [[10 + (r + i) % 1000 for i in range(args.prompt_len)] for r in range(args.batch)]
    start_decoding(engine, prompts, total + 32)
    if len(engine.running) != args.batch:  # a step that failed ends its rows: the timings would be of nothing
        raise SystemExit(f"{kernel}: {args.batch - len(engine.running)} of {args.batch} rows ended before timing")
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per engine per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", default="sdpa,plain,gemmakit", help="also the order engines are built and timed in")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--narrow", action="store_true", help="the 270M's layers with 64-wide matrices (profile_decode)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtypes.split(","):
        engines = {kernel: ready_engine(args, dtype, kernel) for kernel in args.kernels.split(",")}
        times: dict[str, list[float]] = {kernel: [] for kernel in engines}
        for _ in range(args.rounds):
            for kernel, engine in engines.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                times[kernel].append((time.perf_counter() - t0) / args.steps * 1e3)
                if len(engine.running) != args.batch:
                    raise SystemExit(f"{kernel}: rows ended while timed (a step failed)")
        medians = {kernel: statistics.median(ts) for kernel, ts in times.items()}
        for kernel, ms in medians.items():
            rows.append({"dtype": dtype, "kernel": kernel, "ms/step (median)": ms, "min": min(times[kernel]),
                         "vs plain": medians["plain"] / ms if "plain" in medians else None})
        del engines
    what = "64-wide 270M" if args.narrow else "Gemma 3 270M"
    print(f"{what}, batch {args.batch}, {args.prompt_len}-token prompt, {args.rounds} rounds of {args.steps} "
          f"compiled decode steps, {args.threads} threads\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
