"""The weight products a CPU decode or prefill step is made of, timed kernel against kernel on this machine.

For each of the 270M's matrix shapes and 1 / 8 / 128 rows (one-row decode, a batch of 8, a prompt chunk), the
milliseconds of one product through each kernel the runtime plan chooses between: torch's bf16 product, fp32
GEMM on the upcast weight (packing.UpcastLinear), fbgemm's fp16 copy (packing.HalfLinear), oneDNN's packed
bf16 product where oneDNN packs bf16, and for fp32 weights MKL's product on the plain weight against oneDNN's
packed one (packing.PackedLinear), and gemmakit's AVX2 kernel for both dtypes (runtime/gemv.py); for int8 /
int4 weights (quantize.py), torch's kernels against gemmakit's AVX2 ones; the 262k-row head too, with the head
screen's int8 pass (runtime/screen.py). Each product cycles over `--copies` distinct weights (the head: one) so
they are read from memory, not from cache, as a decode step reads them. docs/performance.md ("A real AVX2 CPU",
"CPU A, native and held to AVX2") quotes it.

Run: .venv/bin/python benchmarks/cpu_products.py [--threads 2] [--copies 18]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gemmakit.bench import format_table
from gemmakit.quantize_codes import int4_problem, quantize_int4_packed, quantize_int8
from gemmakit.runtime import gemv
from gemmakit.runtime.packing import HalfLinear, PackedLinear, UpcastLinear
from gemmakit.runtime.probe import cpu_capability, fbgemm_fp16, onednn_packs

SHAPES = [(2048, 640), (640, 2048), (1024, 640)]  # gate/up, down, q (out, in)
HEAD = (262144, 640)  # the tied head: quantized kernels only


def per_call_ms(calls: list[Callable[[], object]], repeats: int) -> float:
    for call in calls:
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        for call in calls:
            call()
    return (time.perf_counter() - start) / (repeats * len(calls)) * 1e3


def quantized_kernels(weights: list[torch.Tensor]) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    int8 = [quantize_int8(w) for w in weights]
    out: dict[str, list] = {"int8 torch": [lambda x, q=q, s=s: torch._weight_int8pack_mm(x, q, s) for q, s in int8]}
    if gemv.unavailable() is None:
        out["int8 gemmakit AVX2"] = [lambda x, q=q, s=s: gemv.int8(x, q, s) for q, s in int8]
    if gemv.unavailable() is None and weights[0].shape == HEAD:  # a greedy step's screening pass (screen.py)
        scales = [s.float() for _, s in int8]
        out["int8 screen pass gemmakit AVX2"] = [lambda x, q=q, s=s: gemv.screen_int8(x, q, s)[0]
                                                 for (q, _), s in zip(int8, scales, strict=True)]
    if int4_problem(*weights[0].shape, 32, weights[0].device) is None:
        int4 = [quantize_int4_packed(w, 32)[:2] for w in weights]
        out["int4 torch"] = [lambda x, p=p, sz=sz: torch._weight_int4pack_mm_for_cpu(x, p, 32, sz) for p, sz in int4]
        if gemv.unavailable() is None and gemv.int4_fits(*weights[0].shape, 32):
            out["int4 gemmakit AVX2"] = [lambda x, p=p, sz=sz: gemv.int4(x, p, sz, 32) for p, sz in int4]
    return out


def kernels(weights: list[torch.Tensor]) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    bf16 = [w.bfloat16() for w in weights]
    head = weights[0].shape == HEAD  # torch's emulated bf16 and the upcast copy would take minutes there
    out: dict[str, list] = {} if head else {"bf16": [lambda x, w=w: F.linear(x, w) for w in bf16]}
    if not head:
        upcast = []
        for w in bf16:
            m = UpcastLinear(w.shape[1], w.shape[0], bias=False, device="meta")
            m.weight = torch.nn.Parameter(w, requires_grad=False)
            upcast.append(m)
        out["bf16 upcast to fp32"] = upcast
    if onednn_packs(torch.bfloat16):  # the plan's bf16 layout where oneDNN packs bf16 (the head too)
        packed16 = [PackedLinear(w) for w in bf16]
        out["bf16 oneDNN packed"] = [lambda x, m=m: m(x.bfloat16()) for m in packed16]
    if fbgemm_fp16():
        out["bf16 via fbgemm fp16"] = [HalfLinear(w) for w in bf16]
    if gemv.unavailable() is None:
        out["bf16 gemmakit AVX2"] = [lambda x, w=w: gemv.floats(x, w) for w in bf16]
    out["fp32 MKL"] = [lambda x, w=w: F.linear(x.float(), w) for w in weights]
    if onednn_packs(torch.float32):
        packed = [PackedLinear(w) for w in weights]
        out["fp32 oneDNN packed"] = [lambda x, m=m: m(x.float()) for m in packed]
    if gemv.unavailable() is None:
        out["fp32 gemmakit AVX2"] = [lambda x, w=w: gemv.floats(x.float(), w) for w in weights]
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copies", type=int, default=18, help="distinct weights per shape (the 270M has 18 layers)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU capability {cpu_capability()}, {args.threads} threads, fbgemm fp16: {fbgemm_fp16()}, "
          f"oneDNN packs bf16: {onednn_packs(torch.bfloat16)}; ms per product")
    rows_out: list[dict[str, object]] = []
    for out_f, in_f in [*SHAPES, HEAD]:
        weights = [0.02 * torch.randn(out_f, in_f) for _ in range(1 if (out_f, in_f) == HEAD else args.copies)]
        for name, mods in {**kernels(weights), **quantized_kernels(weights)}.items():
            row: dict[str, object] = {"weight (out x in)": f"{out_f} x {in_f}", "kernel": name}
            for rows in (1, 8, 128):
                x = torch.randn(rows, in_f).bfloat16()
                ms = per_call_ms([lambda m=m, x=x: m(x) for m in mods], args.repeats)
                row[f"{rows} row{'s' * (rows > 1)} ms"] = f"{ms:.3f}"
            rows_out.append(row)
    print(format_table(rows_out))


if __name__ == "__main__":
    main()
