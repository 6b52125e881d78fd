"""int4 prompts on CPU: the int4 kernel against the compiled unpack + bf16 GEMM that compiled engines use.

`quantize.compile_prompt_unpack` rests on two measurements, both taken here in one process:
1. per weight shape of the embedded Gemma 3 270M (int4, its output head left out), the median time of
   `torch._weight_int4pack_mm_for_cpu` against unpacking the codes to a bf16 W^T with the compiled
   `unpack_int4_transposed` and multiplying by it, at several row counts; GFLOP/s shows that the kernel runs
   at one rate whatever the rows, while the GEMM speeds up with them;
2. end to end, the prefill of one compiled engine with the unpack switched on and off in interleaved rounds
   (same weights, prompt and machine state), and whether greedy decoding gives the same tokens both ways.

Run: .venv/bin/python benchmarks/int4_prompt.py [--prompt-len 128] [--rounds 7] [--rows 32 64 128 512]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gemmakit.bench import format_table
from gemmakit.checkpoints import load_model
from gemmakit.engine import Engine
from gemmakit.quantize import Int4Linear
from gemmakit.quantize_codes import COMPUTE_DTYPE
from gemmakit.sampling import SamplingParams


def median_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def per_shape(linears: list[Int4Linear], row_counts: list[int]) -> list[dict]:
    """Kernel against unpack + GEMM for one linear of each shape, at each row count."""
    shapes = {(m.out_features, m.in_features): m for m in linears}
    return [measure(lin, m) for lin in shapes.values() for m in row_counts]


def measure(lin: Int4Linear, m: int) -> dict:
    scales, zeros = lin.scales_and_zeros.permute(2, 0, 1).contiguous()
    x = torch.randn(m, lin.in_features, dtype=COMPUTE_DTYPE)

    def unpack() -> torch.Tensor:
        return lin.unpack(lin.weight, scales, zeros, lin.unpack_rows)

    kernel = median_ms(lambda: torch._weight_int4pack_mm_for_cpu(x, lin.weight, lin.group_size,
                                                                 lin.scales_and_zeros))
    gemm = median_ms(lambda: x @ unpack())
    gflop = 2 * m * lin.out_features * lin.in_features / 1e9
    return {"weight": f"{lin.out_features} x {lin.in_features}", "rows": m, "kernel ms": kernel,
            "kernel GFLOP/s": gflop / kernel * 1e3, "unpack ms": median_ms(unpack), "unpack + GEMM ms": gemm,
            "GEMM GFLOP/s": gflop / gemm * 1e3, "speed-up": kernel / gemm}


def prefill_ab(engine: Engine, linears: list[Int4Linear], prompt: list[int], rounds: int) -> list[dict]:
    """The engine's prefill (one prompt, its first token) with the unpack on and off, interleaved."""
    unpackers = {id(m): m.unpack for m in linears}

    def switch(on: bool) -> None:
        for m in linears:
            m.unpack = unpackers[id(m)] if on else None

    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    for on in (True, False):
        switch(on)
        tokens[on] = engine.generate([prompt], SamplingParams(max_tokens=16))[0].tokens
    for _ in range(rounds):
        for on in (True, False):
            switch(on)
            t = time.perf_counter()
            engine.generate([prompt], SamplingParams(max_tokens=1))
            times[on].append(time.perf_counter() - t)
    switch(True)
    kernel = statistics.median(times[False])
    return [{"prompt path": "unpack + bf16 GEMM" if on else "int4 kernel",
             "prefill ms": 1e3 * statistics.median(times[on]),
             "prefill tok/s": len(prompt) / statistics.median(times[on]),
             "speed-up": kernel / statistics.median(times[on]),
             "16 greedy tokens": "same" if tokens[True] == tokens[False] else "differ"} for on in (True, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 512])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(dtype=torch.float32, quantize="int4")
    engine = Engine(model, max_batch=1, context=args.prompt_len + 32, compile=True)
    engine.warmup()
    linears = [m for m in model.modules() if isinstance(m, Int4Linear) and m.unpack is not None]
    if not linears:
        raise SystemExit("no int4 linear got an unpack here (no C++ compiler, or another CPU packing layout)")
    print(f"Gemma 3 270M int4, {args.threads} threads: {len(linears)} linears unpack their prompts\n")
    print(format_table(per_shape(linears, args.rows)))
    prompt = torch.randint(10, model.config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    print(f"\nprefill of a {args.prompt_len}-token prompt, compiled engine, median of {args.rounds} "
          "interleaved rounds\n")
    print(format_table(prefill_ab(engine, linears, prompt, args.rounds)))


if __name__ == "__main__":
    main()
