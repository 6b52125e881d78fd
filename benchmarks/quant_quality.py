"""What weight-only quantization costs in quality on the embedded Gemma 3 270M: perplexity and top-1 agreement.

The text is benchmarks/data/corpus.txt: ~2000 words of original English prose written for this benchmark (history,
science, a dialogue, a recipe, Python code), so no model has seen it. It is tokenized once and cut into
non-overlapping windows of BOS + (window - 1) tokens; every token after BOS is scored. For each variant we report
perplexity, exp(mean NLL), and how often its most likely next token equals fp32's (top-1 agreement).

Variants: fp32 (the reference), bf16 (`model.to(bfloat16)`), and `quantize_model` int8 and int4 at each group
size, all quantized from the same fp32 weights; non-quantized parts (norms, residual stream) stay fp32.
NB the fp32 model is itself the embedded Q4_K_M GGUF dequantized (embedding Q8_0; q/k, gate and up Q5_0; v half
Q5_0, half Q8_0; o_proj and half the down_proj Q4_K, the other half Q6_K), so this measures the loss of
re-quantizing it: int8 keeps nearly all of it, while int4 rounds 5-bit and 8-bit weights onto a coarser grid.
The `--quantize int4` row is the model that flag loads: the GGUF's Q4_K matrices on their stored codes, its
wider Q5_0 / Q6_K / Q8_0 linears at int8, and the Q8_0 tied embedding/head int4 g32. With llama-cpp-python
installed, a last row scores llama.cpp running the file itself, the peer the engine benchmark compares with.

Run: .venv/bin/python benchmarks/quant_quality.py [--window 512] [--group-sizes 32 64 128]
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gemmakit.checkpoints import load_model, load_model_and_tokenizer
from gemmakit.model import Gemma
from gemmakit.quantize import quantize_model, quantized_bytes

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


def windows(ids: list[int], size: int, bos: int) -> list[Tensor]:
    """Non-overlapping [1, size] windows, each BOS + the next size - 1 tokens (a shorter last one kept)."""
    body = size - 1
    return [torch.tensor([[bos, *ids[i:i + body]]]) for i in range(0, len(ids), body) if len(ids[i:i + body]) > 1]


@torch.inference_mode()
def evaluate(model: Gemma, chunks: list[Tensor]) -> tuple[float, Tensor]:
    """(mean NLL over every scored token, the argmax prediction at each scored position, concatenated)."""
    return score(lambda ids: model(ids)[0, :-1].float(), chunks)


def score(next_logits: Callable[[Tensor], Tensor], chunks: list[Tensor]) -> tuple[float, Tensor]:
    """`evaluate` for any scorer: `next_logits(ids [1, T])` gives fp32 logits [T - 1, V] for tokens 1..T-1."""
    nll, count, top1 = 0.0, 0, []
    for ids in chunks:
        logits = next_logits(ids)
        target = ids[0, 1:]
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
        top1.append(logits.argmax(-1))
    return nll / count, torch.cat(top1)


def variants(fp32: Gemma, group_sizes: list[int]) -> Iterator[tuple[str, Gemma]]:
    """(name, model) for each variant, each built from its own copy of the fp32 model."""
    yield "fp32", fp32
    yield "bf16", copy.deepcopy(fp32).to(torch.bfloat16)
    yield "int8", quantize_model(copy.deepcopy(fp32), "int8")
    for g in group_sizes:
        yield f"int4 g{g}", quantize_model(copy.deepcopy(fp32), "int4", group_size=g)
    # What `--quantize int4` does with the GGUF: quantized while loading, its Q4_K matrices on their own codes.
    yield "--quantize int4 (Q4_K codes kept; v_proj, Q5_0/Q6_K/Q8_0 linears int8)", load_model(quantize="int4")


def llama_cpp_evaluate(chunks: list[Tensor]) -> tuple[float, Tensor] | None:
    """`evaluate` for llama.cpp on the embedded GGUF (its own Q4_K_M kernels); None without llama-cpp-python."""
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return None
    from gemmakit.checkpoints.default import default_model_path

    llm = Llama(model_path=str(default_model_path()), n_ctx=max(c.shape[1] for c in chunks), n_threads=2,
                logits_all=True, verbose=False)

    def next_logits(ids: Tensor) -> Tensor:
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(llm.scores[:ids.shape[1] - 1], dtype=np.float32))
    return score(next_logits, chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=512, help="tokens per window, BOS included")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128], help="int4 group sizes")
    args = ap.parse_args()
    model, tok = load_model_and_tokenizer()
    ids = tok.encode(CORPUS.read_text(encoding="utf-8"), add_bos=False)
    chunks = windows(ids, args.window, tok.bos_id)
    print(f"corpus: {len(ids)} tokens in {len(chunks)} windows of {args.window}\n")
    rows, reference = [], None
    for name, m in variants(model, args.group_sizes):
        nll, top1 = evaluate(m, chunks)
        reference = top1 if reference is None else reference
        agree = (top1 == reference).float().mean().item()
        rows.append((name, quantized_bytes(m) / 2**20, math.exp(nll), agree))
        del m
    peer = llama_cpp_evaluate(chunks)
    if peer is not None:
        nll, top1 = peer
        rows.append(("llama.cpp on the GGUF (Q4_K_M as stored)", float("nan"), math.exp(nll),
                     (top1 == reference).float().mean().item()))
    print("| variant | weights (MiB) | perplexity | top-1 agreement with fp32 |")
    print("|---|---:|---:|---:|")
    for name, mib, ppl, agree in rows:
        size = "-" if math.isnan(mib) else f"{mib:.0f}"
        print(f"| {name} | {size} | {ppl:.3f} | {100 * agree:.2f}% |")


if __name__ == "__main__":
    main()
