"""What rounding x onto the screen's integer grid costs the int8 layers' decode rows (gemv.int8_grid).

The int8 layers of gemmakit's int4 / int8 models take their decode rows (up to 8) with x rounded per row onto a
14-bit integer grid (fewer bits past K = 2064) and exact integer sums, instead of fp32 x. This measures what that
rounding moves, on the default model's own activations: every int8 linear's input over a text, its product with
x on the grid and with x rounded to bf16 (what torch's int8 kernel computes), each against the fp32-x product
(relative error of each row's output, mean and worst over the rows and layers of a kind). Then greedy
continuations of the text's sentences with the grid and with fp32 x: how many of their tokens agree.
docs/performance.md ("int8 layers on the screen's grid") quotes it.

Run: .venv/bin/python benchmarks/int8_grid.py [--quantize int4|int8] [--text README.md] [--tokens 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from gemmakit.bench import format_table
from gemmakit.checkpoints import load_model_and_tokenizer
from gemmakit.engine import Engine
from gemmakit.quantize import Int8Linear
from gemmakit.runtime import gemv
from gemmakit.sampling import SamplingParams


def relative(y: Tensor, want: Tensor) -> Tensor:
    return (y - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)


@torch.inference_mode()
def product_errors(model: torch.nn.Module, ids: list[int]) -> list[dict]:
    errors: dict[str, list[Tensor]] = {}

    def hook(name: str):
        def record(module: Int8Linear, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
            x = inputs[0].reshape(-1, module.in_features).float()
            w = module.weight.double() * module.scales.double()[:, None]
            want = x.double() @ w.T
            on_grid = gemv.int8_grid(x, module.weight, module.scales).double()  # what the layer's decode rows get
            grid, half = relative(on_grid, want), relative(x.bfloat16().double() @ w.T, want)
            errors.setdefault(name.rsplit(".", 1)[-1], []).append(torch.stack([grid, half]))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, Int8Linear) and m is not getattr(model, "lm_head", None)]
    model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    rows = []
    for kind, parts in errors.items():
        e = torch.cat(parts, dim=1)
        ratio = (e[1] / e[0].clamp_min(1e-30)).median().item()
        rows.append({"layer": kind, "layers": len(parts), "grid mean": f"{e[0].mean():.1e}",
                     "grid max": f"{e[0].max():.1e}", "bf16 x mean": f"{e[1].mean():.1e}",
                     "bf16 x max": f"{e[1].max():.1e}", "bf16 / grid (median)": ratio})
    return rows


def greedy_agreement(model: torch.nn.Module, prompts: list[list[int]], tokens: int) -> tuple[int, int, int]:
    """(tokens that agree before the first difference, summed over prompts; tokens in all; prompts that agree
    throughout) between batch-8 greedy decoding with x on the grid and with fp32 x."""
    params = SamplingParams(max_tokens=tokens)
    runs = []
    for grid in (True, False):
        engine = Engine(model, max_batch=8, context=256, compile=False)
        for m in model.modules():
            if isinstance(m, Int8Linear) and m.x_grid:
                m.x_grid = grid
        runs.append([r.tokens for r in engine.generate(prompts, params)])
    same = [agreed(a, b) for a, b in zip(*runs, strict=True)]
    return sum(same), sum(len(a) for a in runs[0]), sum(s == len(a) for s, a in zip(same, runs[0], strict=True))


def agreed(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", choices=["int8", "int4"], default="int4")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    ap.add_argument("--tokens", type=int, default=400, help="text tokens whose activations are measured")
    ap.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt")
    args = ap.parse_args()
    if gemv.unavailable():
        raise SystemExit(f"gemmakit's kernels are not available here: {gemv.unavailable()}")
    model, tokenizer = load_model_and_tokenizer(dtype=torch.float32, quantize=args.quantize)
    ids = tokenizer.encode(Path(args.text).read_text())[: args.tokens]
    print(f"Gemma 3 270M, --quantize {args.quantize}: each int8 layer's decode-row product, relative error "
          f"against fp32 x, over {len(ids)} tokens of {Path(args.text).name}\n")
    print(format_table(product_errors(model, ids)))
    prompts = [ids[i: i + 24] for i in range(0, 8 * 24, 24)]
    agree, total, whole = greedy_agreement(model, prompts, args.new_tokens)
    print(f"\nGreedy batch-8 decoding, {len(prompts)} prompts of 24 tokens x {args.new_tokens} new: {agree} of "
          f"{total} tokens agree before a prompt's first difference; {whole} of {len(prompts)} prompts agree "
          "throughout (grid vs fp32 x)")


if __name__ == "__main__":
    main()
