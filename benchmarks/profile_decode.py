"""Where a decode step's time goes: torch.profiler over `--steps` one-row decode steps of the default model.

The engine's decode step is one compiled graph (gemmakit.runtime.compiled) plus the host work around it: building the
step's index tensors, dynamo's guard check, the sampler's argmax. The profiler sees the compiled graph as one
"CompiledFxGraph" call and the extern kernels inside it (the packed int4/int8 matmuls, attention matmuls)
as their own rows, so the table splits a step into: weight matmuls, attention, fused elementwise code and
host overhead. Printed as a Markdown table of milliseconds per step.

`--narrow` keeps the 270M's 18 layers, heads and attention but makes every matrix 64 wide and the vocabulary
1024 words (random weights): what a step costs besides streaming weights (barriers, attention, norms, host).

Run: .venv/bin/python benchmarks/profile_decode.py [--quantize int4] [--dtype float32] [--no-compile] [--narrow]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gemmakit.bench import format_table
from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.runtime.packing import pack_linears
from gemmakit.runtime.plan import prepare_weights
from gemmakit.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", choices=["none", "int8", "int4"], default="int4")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=12, help="how many ops to list")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--shapes", action="store_true", help="one row per op and input shapes")
    ap.add_argument("--pack", action="store_true", help="oneDNN-packed float weights (packing.py)")
    ap.add_argument("--prepare", action="store_true", help="the layout the engine's loaders choose (plan.py)")
    ap.add_argument("--narrow", action="store_true", help="the 270M's structure with 64-wide matrices")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = narrow_model(args) if args.narrow else load_model(dtype=getattr(torch, args.dtype),
                                                              quantize=args.quantize)
    if args.pack:
        pack_linears(model)
    elif args.prepare:
        print(prepare_weights(model, None, args.compile))
    timed = max(1, args.steps // 2)  # steps timed without the profiler, which inflates every op
    engine = Engine(model, max_batch=args.batch, context=args.prompt_len + args.steps + timed + 8,
                    compile=args.compile)
    prompts = [list(range(10 + r, 10 + r + args.prompt_len)) for r in range(args.batch)]
    start_decoding(engine, prompts, args.steps + timed + 1)
    t0 = time.perf_counter()
    for _ in range(timed):
        engine.step()
    plain = (time.perf_counter() - t0) / timed
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        t0 = time.perf_counter()
        while engine.has_work:
            engine.step()
        wall = (time.perf_counter() - t0) / args.steps
    events = sorted(prof.key_averages(group_by_input_shape=args.shapes), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    rows = [{"op": e.key[:60] + (f" {e.input_shapes}"[:90] if args.shapes else ""),
             "ms/step": e.self_cpu_time_total / 1e3 / args.steps,
             "share": e.self_cpu_time_total / 1e6 / (wall * args.steps), "calls/step": e.count / args.steps}
            for e in events[: args.rows]]
    print(f"Gemma 3 270M{' (64-wide)' * args.narrow}, {args.dtype}, quantize {args.quantize}, compiled "
          f"{args.compile}, {args.threads} threads: {plain * 1e3:.2f} ms per decode step ({1 / plain:.1f} tok/s); "
          f"{wall * 1e3:.1f} ms under the profiler\n")
    print(format_table(rows))


def start_decoding(engine: Engine, prompts: list[list[int]], max_tokens: int) -> None:
    """Compile and warm up untimed, then leave one request per prompt prefilled and mid-decode, so that every
    later `engine.step()` is a decode step of all rows."""
    engine.generate(prompts, SamplingParams(max_tokens=8))
    for prompt in prompts:
        engine.submit(prompt, SamplingParams(max_tokens=max_tokens))
    while engine.waiting or any(not r.tokens for r in engine.running.values()):  # prefills stay out
        engine.step()


def narrow_model(args: argparse.Namespace) -> torch.nn.Module:
    """The 270M's layers, heads and attention with 64-wide matrices and a 1024-word vocabulary, random weights."""
    from gemmakit.model import Gemma
    from gemmakit.quantize import quantize_model
    from gemmakit.registry import config_for

    config = config_for("gemma-3-270m").replace(hidden_size=64, intermediate_size=64, vocab_size=1024)
    model = Gemma(config).to(getattr(torch, args.dtype)).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return quantize_model(model, args.quantize) if args.quantize != "none" else model


if __name__ == "__main__":
    main()
