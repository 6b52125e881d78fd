"""Every GGUF quant type llama.cpp writes, read by gemmakit: does it load, and does it compute what llama.cpp does?

llama.cpp's own quantizer (`llama_model_quantize`, the library behind `llama-quantize`) re-quantizes one source
GGUF (default: the embedded Gemma 3 270M, itself Q4_K_M, hence `allow_requantize`) to each type. Then, per file:

- its size, and which tensor types it really holds: the 270M's hidden size 640 is not a multiple of 256, so
  llama.cpp stores every matrix whose rows are 640 wide in a fallback type (Q5_0, Q8_0, IQ4_NL, ...) and only
  o_proj / down_proj (1024 / 2048 wide) in the type asked for. The mix column says so, by share of weights;
- whether gemmakit loads it (an unknown type prints "refused: <why>" and the row carries on), in the mode given
  by --quantize (default: dequantized to fp32);
- perplexity of both engines on the same token ids (benchmarks/data/corpus.txt, tokenized once by gemmakit, cut
  into windows by quant_quality.windows and scored by quant_quality.score, the repository's perplexity helper);
- top-1 agreement: the share of scored positions where both engines' most likely next token is the same;
- greedy agreement: how many of the first --new-tokens greedy tokens (gemmakit's Engine against llama.cpp's
  eval loop, same prompt ids, 4 short prompts) are equal before the first difference, and at that first
  difference how far apart gemmakit's logits for the two tokens are (a small margin is a near tie that
  rounding decides, not a wrong model).

llama.cpp runs with an f32 KV cache and no flash attention, so its own f16 rounding does not add to the gap.
Its remaining difference from gemmakit is real: llama.cpp rounds activations to 8 bits for its quantized dot
products, gemmakit multiplies dequantized weights in fp32. Types llama.cpp refuses without an importance matrix
(IQ2_*, IQ1_*) are listed as skipped: llama-cpp-python cannot hand the quantizer an imatrix (a C++ map).

Run: .venv/bin/python benchmarks/gguf_quants.py [--types Q4_0 Q8_0 ...] [--json runs/gguf_quants.json]
     .venv/bin/python benchmarks/gguf_quants.py --render runs/gguf_quants.json   (the Markdown table again)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.quant_quality import CORPUS, score, windows  # noqa: E402

# llama.cpp's file types (LLAMA_FTYPE_MOSTLY_<name>), in the order the table shows them.
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q5_1", "Q4_K_M", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_M",
         "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "TQ2_0", "TQ1_0", "MXFP4_MOE",
         "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Water boils at a temperature of",
           "Once upon a time, in a small village,"]


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collects what is written to stderr meanwhile, by C code (fd 2) or by llama-cpp-python's log callback
    (sys.stderr): llama.cpp logs its reasons for refusing there."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as tmp, contextlib.redirect_stderr(tmp):
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().splitlines())


def requantize(src: Path, dst: Path, name: str) -> str | None:
    """Writes `src` re-quantized to llama.cpp file type `name`; None, or llama.cpp's reason for refusing."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    logger = logging.getLogger("llama-cpp-python")  # a Llama(verbose=False) before this would mute the reason
    level = logger.level
    logger.setLevel(logging.DEBUG)
    with captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    logger.setLevel(level)
    if rc == 0:
        return None
    dst.unlink(missing_ok=True)
    reasons = [line.split("failed to quantize:", 1)[1].strip() for line in log if "failed to quantize:" in line]
    return reasons[-1] if reasons else f"llama_model_quantize returned {rc}"


def type_mix(path: Path) -> str:
    """The file's matrix types by share of their weights, largest first (norms and other 1-D tensors left out)."""
    from gemmakit.checkpoints.gguf_reader import open_gguf  # the stock reader walks the vocabulary entry by entry

    counts: dict[str, int] = {}
    for t in open_gguf(path).tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(counts.values())
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def llama_side(path: Path, chunks: list[torch.Tensor], prompts: list[list[int]], new: int
               ) -> tuple[float, torch.Tensor, list[list[int]]]:
    """llama.cpp's (mean NLL, argmax per scored position, greedy tokens of each prompt) on `path`."""
    from llama_cpp import Llama

    n_ctx = max(max(c.shape[1] for c in chunks), max(len(p) for p in prompts) + new)
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count() or 1,
                logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False)

    def next_logits(ids: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(llm.scores[:ids.shape[1] - 1], dtype=np.float32))

    nll, top1 = score(next_logits, chunks)
    greedy = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        tokens: list[int] = []
        for _ in range(new):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        greedy.append(tokens)
    return nll, top1, greedy


@torch.inference_mode()
def gemmakit_side(path: Path, quantize: str | None, chunks: list[torch.Tensor], prompts: list[list[int]],
                  theirs: list[list[int]]) -> tuple[float, torch.Tensor, list[int], list[float]]:
    """gemmakit's (mean NLL, argmax per scored position) on `path`, and per prompt how many of its greedy tokens
    (Engine, cached decode) equal llama.cpp's `theirs` before the first difference, and there the logit
    margin by which gemmakit prefers its token to llama.cpp's (a near tie, or a real disagreement?).
    Raises if gemmakit cannot load the file."""
    from gemmakit.checkpoints import load_model
    from gemmakit.engine import Engine
    from gemmakit.sampling import SamplingParams

    model = load_model(path, quantize=quantize)
    nll, top1 = score(lambda ids: model(ids)[0, :-1].float(), chunks)
    new = len(theirs[0])
    engine = Engine(model, max_batch=1, context=max(len(p) for p in prompts) + new + 8)
    equal, margins = [], []
    for prompt, want in zip(prompts, theirs, strict=True):
        got = list(engine.stream(prompt, SamplingParams(max_tokens=new)))
        k = leading_equal(got, want)
        equal.append(k)
        if k < new:
            logits = model(torch.tensor([prompt + got[:k]]))[0, -1].float()
            margins.append((logits[got[k]] - logits[want[k]]).item())
    return nll, top1, equal, margins


def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def measure(path: Path, label: str, args: argparse.Namespace, chunks: list[torch.Tensor],
            prompts: list[list[int]]) -> dict:
    """One table row for the file at `path`."""
    row: dict = {"type": label, "bytes": path.stat().st_size, "mix": type_mix(path)}
    t0 = time.perf_counter()
    nll, top1, greedy = llama_side(path, chunks, prompts, args.new_tokens)
    row.update(llama_ppl=math.exp(nll), llama_seconds=round(time.perf_counter() - t0, 1))
    t0 = time.perf_counter()
    try:
        g_nll, g_top1, equal, margins = gemmakit_side(path, args.quantize, chunks, prompts, greedy)
    except Exception as err:  # a type gemmakit cannot read yet is a row of the table, not the end of the run
        row["refused"] = first_line(err)
        return row
    finally:
        gc.collect()
    row.update(gemmakit_ppl=math.exp(g_nll), gemmakit_seconds=round(time.perf_counter() - t0, 1),
               top1_agreement=(g_top1 == top1).float().mean().item(), greedy_equal=equal,
               greedy_of=args.new_tokens, split_margins=margins)
    return row


def progress(row: dict) -> str:
    if "skipped" in row:
        return f"{row['type']}: skipped ({row['skipped']})"
    if "refused" in row:
        return f"{row['type']}: llama.cpp ppl {row['llama_ppl']:.2f}; gemmakit refused: {row['refused']}"
    return (f"{row['type']}: ppl gemmakit {row['gemmakit_ppl']:.3f} / llama.cpp {row['llama_ppl']:.3f}, top-1 "
            f"{100 * row['top1_agreement']:.1f}%, greedy {greedy_cell(row)}")


def greedy_cell(row: dict) -> str:
    """"equal/asked" per prompt, and the largest margin gemmakit had at a first difference."""
    cell = " ".join(f"{k}/{row['greedy_of']}" for k in row["greedy_equal"])
    if row["split_margins"]:
        cell += f" (margin ≤ {max(abs(m) for m in row['split_margins']):.2f})"
    return cell


def render(run: dict) -> str:
    """The Markdown table of a run (what the benchmark prints, and what `--render` prints from its JSON)."""
    out = [f"{run['title']}\n", "| type | file MiB | matrix types (share of weights) | perplexity gemmakit | "
           "perplexity llama.cpp | top-1 agreement | greedy tokens equal, per prompt |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for r in run["rows"]:
        if "skipped" in r:
            out.append(f"| {r['type']} | - | - | skipped: {r['skipped']} | - | - | - |")
            continue
        mib = f"{r['bytes'] / 2**20:.1f}"
        if "refused" in r:
            out.append(f"| {r['type']} | {mib} | {r['mix']} | refused: {r['refused'].replace('|', '/')} "
                       f"| {r['llama_ppl']:.3f} | - | - |")
            continue
        out.append(f"| {r['type']} | {mib} | {r['mix']} | {r['gemmakit_ppl']:.3f} | {r['llama_ppl']:.3f} | "
                   f"{100 * r['top1_agreement']:.1f}% | {greedy_cell(r)} |")
    return "\n".join(out) + f"\n\nCommand: `{run['command']}`; {run['machine']}."


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


# Weight scales of the random Gemma 4 source: an embedding this narrow leaves the layers a say (wider ones make the
# model echo its input, which any decoding agrees on), and a wide router gives clear top-k margins.
STD = {"embed_tokens": 0.05, "proj": 4.0}


def gemma4_source(variant: str, path: Path) -> Path:
    """A random Gemma 4 of `variant`'s structure written as an f16 GGUF by gemmakit's exporter, with the real Gemma
    vocabulary (the embedded file's), so llama.cpp's quantizer has a Gemma 4 file to work on. Rows are 256 wide
    (whole K-quant super-blocks), so llama.cpp writes the asked types rather than fallbacks; norms sit away from 1
    so a misplaced one shows. Perplexity means little (the model is random) and its top logits are often close
    (the greedy column gives the margins), but it echoes its input at few positions, so top-1 agreement is not
    trivially high: a wrongly decoded matrix brings it near zero."""
    from gemmakit.checkpoints import default_model_path
    from gemmakit.checkpoints.export_gguf import export_gguf
    from gemmakit.config import default_layer_types
    from gemmakit.model import Gemma
    from gemmakit.registry import config_for
    from gemmakit.tokenizer import Tokenizer

    small = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64, global_head_dim=128,
                 sliding_window=64, max_position_embeddings=4096)
    shape = {"e2b": dict(num_hidden_layers=10, layer_types=default_layer_types(10, 5), num_key_value_heads=1,
                         num_kv_shared_layers=5, hidden_size_per_layer_input=32),
             "26b-a4b": dict(num_hidden_layers=6, layer_types=default_layer_types(6), num_key_value_heads=2,
                             num_global_key_value_heads=1, num_experts=8, top_k_experts=2,
                             moe_intermediate_size=256),
             "31b": dict(num_hidden_layers=6, layer_types=default_layer_types(6), num_key_value_heads=2,
                         num_global_key_value_heads=1)}[variant]
    config = config_for(f"gemma-4-{variant}", **small, **shape)
    torch.manual_seed(0)
    model = Gemma(config).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" in name or name.endswith("scale"):
                t.copy_(1.0 + 0.5 * (torch.rand_like(t) - 0.5))
            else:
                t.normal_(0.0, STD.get(name.rsplit(".", 2)[-2], 0.05))
    return export_gguf(model, path, Tokenizer.from_gguf(default_model_path()), "f16")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="GGUF to re-quantize (default: the embedded Gemma 3 270M)")
    ap.add_argument("--gemma4", choices=["e2b", "26b-a4b", "31b"],
                    help="instead, a random Gemma 4 of this variant's structure (see gemma4_source)")
    ap.add_argument("--types", nargs="+", default=TYPES, help="llama.cpp file types (LLAMA_FTYPE_MOSTLY_<name>)")
    ap.add_argument("--quantize", choices=["int8", "int4"], help="gemmakit's load mode (default: fp32)")
    ap.add_argument("--tokens", type=int, default=512, help="corpus tokens scored, in windows of --window")
    ap.add_argument("--window", type=int, default=512, help="tokens per window, BOS included")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared")
    ap.add_argument("--workdir", type=Path, help="keep the re-quantized files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the rows and the machine to this file")
    ap.add_argument("--render", type=Path, help="print the table of an earlier --json file and exit")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    from gemmakit.checkpoints import default_model_path
    from gemmakit.tokenizer import Tokenizer

    keep = contextlib.ExitStack()  # holds the random source's folder to the end
    if args.gemma4:
        folder = args.workdir or Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="gguf_quants4.")))
        folder.mkdir(parents=True, exist_ok=True)
        print(f"writing a random gemma-4-{args.gemma4}-shaped source ...", file=sys.stderr, flush=True)
        source = gemma4_source(args.gemma4, folder / f"random-gemma-4-{args.gemma4}-f16.gguf")
    else:
        source = args.source or default_model_path()
    tok = Tokenizer.from_gguf(source)
    ids = tok.encode(CORPUS.read_text(encoding="utf-8"), add_bos=False)[:args.tokens]
    chunks, prompts = windows(ids, args.window, tok.bos_id), [tok.encode(p) for p in PROMPTS]
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gguf_quants.")))
        work.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(["source", *args.types]):
            print(f"[{i}/{len(args.types)}] {name} ...", file=sys.stderr, flush=True)
            path = work / f"{name}.gguf"
            reason = None if name == "source" else requantize(source, path, name)
            if reason:
                rows.append({"type": name, "skipped": f"llama.cpp: {reason}"})
            else:
                rows.append(measure(source if name == "source" else path, f"source ({source.name})"
                                    if name == "source" else name, args, chunks, prompts))
                if not args.workdir and name != "source":
                    path.unlink()
            print(f"    {progress(rows[-1])}", file=sys.stderr, flush=True)
    run = {"benchmark": "gguf_quants", "rows": rows,
           "title": f"{source.name} re-quantized by llama.cpp; {sum(c.shape[1] - 1 for c in chunks)} scored tokens of "
                    f"benchmarks/data/corpus.txt; greedy from {len(prompts)} prompts; gemmakit "
                    f"{args.quantize or 'fp32'}",
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch "
                      f"{torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}"}
    keep.close()
    print(render(run))
    if args.json:
        from gemmakit.files import write_atomic

        write_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(run, indent=1)))


if __name__ == "__main__":
    main()
