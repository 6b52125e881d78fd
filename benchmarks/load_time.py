"""Load time of the embedded default model, from process start to the first token id, gemmakit vs transformers.

Each measurement is a fresh Python process that imports the library, loads the Gemma 3 270M GGUF (model and
tokenizer), encodes a prompt and computes the greedy next token id: what a user waits for before anything
happens. gemmakit is measured with a cold tokenizer cache (first run ever) and a warm one (every later run);
transformers has no such cache. Both must produce the same token id. `--quantize int8 int4` adds gemmakit rows
that quantize while loading (warm cache; their first token may differ from the float one).

Run: .venv/bin/python benchmarks/load_time.py [--repeats 2] [--quantize int4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from chat_startup import share_kernels  # noqa: E402

PROMPT = "The capital of France is"

GEMMAKIT = f"""
import sys
import torch
from gemmakit.checkpoints import load_model_and_tokenizer
model, tok = load_model_and_tokenizer(quantize=sys.argv[1] if len(sys.argv) > 1 else None)
with torch.inference_mode():
    print(int(model(torch.tensor([tok.encode({PROMPT!r})]), logits_to_keep=1)[0, -1].argmax()))
"""

TRANSFORMERS = f"""
import torch
from gemmakit.checkpoints import default_model_path
from transformers import AutoModelForCausalLM, AutoTokenizer
path = default_model_path()
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
with torch.inference_mode():
    print(int(model(**tok({PROMPT!r}, return_tensors="pt")).logits[0, -1].argmax()))
"""


def run(code: str, env: dict[str, str], *args: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"benchmark process failed:\n{out.stderr[-2000:]}")
    return elapsed, int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int4"],
                    help="also time gemmakit loads that quantize to these")
    args = ap.parse_args()
    run(GEMMAKIT, dict(os.environ))  # makes sure the GGUF is assembled and the page cache is warm for all
    results: dict[str, list[float]] = {}
    tokens = set()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cold:
            share_kernels(Path(cold))
            for label, code, env, *quantize in [
                ("gemmakit (cold tokenizer cache)", GEMMAKIT, {**os.environ, "GEMMAKIT_CACHE_DIR": cold}),
                ("gemmakit (warm cache)", GEMMAKIT, dict(os.environ)),
                ("transformers 5.23.0", TRANSFORMERS, dict(os.environ)),
                *[(f"gemmakit --quantize {q} (warm cache)", GEMMAKIT, dict(os.environ), q) for q in args.quantize],
            ]:
                seconds, token = run(code, env, *quantize)
                results.setdefault(label, []).append(seconds)
                if not quantize:
                    tokens.add(token)
                print(f"  {label}: {seconds:.2f} s (token {token})", file=sys.stderr, flush=True)
    if len(tokens) != 1:
        sys.exit(f"the libraries disagree on the first token: {tokens}")
    base = statistics.median(results["transformers 5.23.0"])
    print(f"\nprocess start -> first token id, Gemma 3 270M Q4_K_M GGUF, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}\n")
    print("| loader | seconds | fraction of transformers |")
    print("|---|---|---|")
    for label, times in results.items():
        median = statistics.median(times)
        print(f"| {label} | {median:.2f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
