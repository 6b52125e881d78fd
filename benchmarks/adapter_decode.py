"""What per-request LoRA adapters cost a decode step, on the embedded Gemma 3 270M (adapters.py).

Two random rank-16 adapters on every projection (q, k, v, o, gate, up, down; PEFT files written by
train/lora.py) are attached un-merged beside the loaded (oneDNN-packed where it packs) weights, and one
8-row decode step is timed three ways: every row on the base model, every row on adapter a (one product per
linear), and rows split over a, b and the base (one gathered product per adapter present). The configurations
are interleaved over the passes and each keeps its fastest, since other load on a shared machine slows single
passes. Run: .venv/bin/python benchmarks/adapter_decode.py [--passes 5] [--steps 20] [--rank 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import gemmakit
from gemmakit.adapters import attach_adapters
from gemmakit.engine import Engine
from gemmakit.sampling import SamplingParams
from gemmakit.train.lora import LoRALinear, add_lora, save_adapter

ROWS = 8
PROMPT = 64


def write_adapter(path: Path, rank: int, seed: int) -> Path:
    """A random PEFT adapter for the default model (non-zero B, as after training)."""
    model = gemmakit.load(pack=False).model
    add_lora(model, r=rank, alpha=2.0 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(0.01 * torch.randn(m.lora_B.weight.shape, generator=g))
    save_adapter(model, path)
    return path


def step_seconds(engine: Engine, adapters: list[str | None], steps: int) -> float:
    """Seconds per decode step of ROWS rows on `adapters` (one per row), after every row is prefilled."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0)
    for name in adapters:
        engine.submit(torch.randint(3, 200_000, (PROMPT,), generator=g).tolist(), params, adapter=name)
    engine.step()  # admits (prefills) every row
    engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - t0) / steps
    while engine.has_work:
        engine.step()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {name: write_adapter(Path(tmp) / name, args.rank, seed) for seed, name in enumerate("ab")}
        llm = gemmakit.load(context=PROMPT + args.steps + 8)
        attach_adapters(llm.model, dirs)
    engine = Engine(llm.model, max_batch=ROWS, context=PROMPT + args.steps + 8)
    configs = {"base": [None] * ROWS, "all on a": ["a"] * ROWS, "a / b / base mixed": ["a", "b", None] * 2 + ["a", "b"]}
    best = dict.fromkeys(configs, float("inf"))
    for _ in range(args.passes):
        for name, rows in configs.items():
            best[name] = min(best[name], step_seconds(engine, rows, args.steps))
    print(f"{engine.plan.describe()}\n{ROWS}-row decode step, rank {args.rank} on all 7 projections, "
          f"fastest of {args.passes} passes x {args.steps} steps:")
    for name, seconds in best.items():
        print(f"  {name:20s} {seconds * 1e3:7.2f} ms  ({seconds / best['base']:.2f}x base)")


if __name__ == "__main__":
    main()
