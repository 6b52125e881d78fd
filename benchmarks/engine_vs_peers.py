"""Generation speed of gemmakit against llama.cpp and transformers: same machine, model, prompt and threads.

Setup: the embedded Gemma 3 270M Q4_K_M GGUF for every engine (llama.cpp runs it quantized; transformers and
gemmakit dequantize it to fp32 or bf16 at load, and the -int8/-int4 gemmakit rows requantize that with
gemmakit.quantize; gemmakit rows decode one row through torch.compile unless named -eager, and hold float
weights in oneDNN's packed layout (gemmakit.runtime.packing, the CLI's default on CPU) unless named -plain),
the same prompt token ids (BOS + text, `--prompt-len` tokens), `--new-tokens` greedy tokens that never stop
early at EOS, `--threads` threads.

Each measurement is a fresh process (this script with --worker), so every engine starts from the same cold
state and reports its own peak RSS: the process high-water mark, loading included (transformers' GGUF
dequantization peak shows up here, as it would for a user). Engines run interleaved (A, B, C, A, B, C, ...)
so that a slow phase of the machine hits all of them alike; the table shows medians over `--repeats`.
Inside a worker one short untimed generation runs first (thread pools, lazy initialisation, first-touch pages).

Definitions, the same for every engine:
- prefill tok/s: prompt tokens / wall time of the forward pass over the prompt into an empty cache (llama.cpp:
  `eval(prompt)`; transformers: one `model(ids, use_cache=True, logits_to_keep=1)`; gemmakit: its prefill);
- decode tok/s: (new tokens - 1) / time from the first to the last generated token, i.e. the rate of the
  one-token decode steps, each including the greedy pick. transformers is timed inside one
  `model.generate(...)` call with a streamer recording when each token arrives, so its per-step overhead
  (logits processors, stopping criteria) counts, as it does for users. A batch row counts all rows' tokens;
- TTFT: from the call to the first generated token; roofline: decode steps/s x weight bytes / read bandwidth
  (gemmakit.bench), the fraction of the memory-bound ceiling, where weight bytes are what one greedy step
  reads (where gemmakit screens the head, its bf16 or int8 copy: gemmakit.runtime.steps); agree: how
  many leading greedy tokens match llama.cpp's (quantized vs dequantized weights drift apart eventually; a
  0 would mean a broken engine);
  other load: cores that other processes kept busy while the worker ran. On a shared machine a busy
  neighbour wrecks thread pools that expect their cores (OpenMP spin-waits), so medians are taken over the
  quiet runs (other load < 0.25 cores) when there are any; `runs` says how many of all were used.
  --wait-idle also holds each measurement back until the machine is quiet; --save keeps every raw run.

--json PATH writes the table's rows with the setup and the machine they ran on (CPU model, the CPU flags that
decide which kernels can run, the oneDNN / ATen ISA limits in the environment, torch's CPU capability, torch
version, threads, date); benchmarks/render_performance.py turns one or more such files into the side-by-side
table of docs/performance.md. A run under `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` measures the
AVX2 machine class on an AVX-512 machine (the workers inherit the environment).

Run: .venv/bin/python benchmarks/engine_vs_peers.py [--repeats 3] [--engines llama.cpp,gemmakit-fp32]
     [--json runs/engine_vs_peers.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gemmakit.bench import MiB, format_table, measure_bandwidth, peak_rss_bytes
from gemmakit.checkpoints import default_model_path
from gemmakit.files import write_text_atomic
from gemmakit.quantize import quantized_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_ENGINES = ("llama.cpp", "transformers-fp32", "transformers-bf16", "gemmakit-fp32", "gemmakit-bf16",
                   "gemmakit-fp32-eager", "gemmakit-fp32-int8", "gemmakit-fp32-int4", "gemmakit-fp32-b8",
                   "gemmakit-bf16-b8", "gemmakit-fp32-int4-b8")
PROMPT_TEXT = (
    "The history of the printing press begins with woodblock printing in East Asia, long before movable type "
    "reached Europe. When Johannes Gutenberg combined a screw press, oil-based inks and a mould for casting "
    "metal letters, books became cheap enough for merchants, students and craftsmen to own. Within fifty years "
    "presses were running in more than two hundred cities, and the ideas they spread changed religion, science "
    "and politics across the continent. "
)


@dataclass(frozen=True)
class Spec:
    """An engine to measure, named `lib[-dtype][-int8|-int4][-eager][-plain][-full][-bN]`: llama.cpp,
    transformers-bf16, gemmakit-fp32-b8, gemmakit-fp32-int4 (weight-only quantized), gemmakit-fp32-eager
    (torch.compile off), gemmakit-fp32-plain (float weights not packed for oneDNN), gemmakit-fp32-full (greedy
    picks from the full head, not the engine's screen of it: gemmakit.runtime.screen)."""

    lib: str
    dtype: str = "fp32"
    batch: int = 1
    quant: str = "none"
    compiled: bool = True
    packed: bool = True
    screen: bool = True

    @classmethod
    def parse(cls, name: str) -> Spec:
        lib, *rest = name.split("-")
        dtypes = [p for p in rest if p in DTYPES]
        quants = [p for p in rest if p in ("int8", "int4")]
        batches = [int(p[1:]) for p in rest if p[:1] == "b" and p[1:].isdigit()]
        eager = [p for p in rest if p == "eager"]
        plain = [p for p in rest if p == "plain"]
        full = [p for p in rest if p == "full"]
        groups = (dtypes, quants, batches, eager, plain, full)
        if sum(map(len, groups)) != len(rest) or max(map(len, groups)) > 1:
            raise ValueError(f"cannot read engine {name!r}: use "
                             "lib[-fp32|-bf16][-int8|-int4][-eager][-plain][-full][-bN]")
        spec = cls(lib, *dtypes[:1] or ["fp32"], *batches[:1] or [1], *quants[:1] or ["none"], not eager,
                   not plain, not full)
        if spec.lib not in ("llama.cpp", "transformers", "gemmakit"):
            raise ValueError(f"unknown engine {name!r}: use llama.cpp, transformers-fp32|bf16, gemmakit-...")
        if spec.lib != "gemmakit" and (spec.batch > 1 or spec.quant != "none" or eager or plain or full):
            raise ValueError(f"{name}: only gemmakit rows can be batched, quantized, unpacked, run eagerly or "
                             "without the head screen here")
        return spec

    @property
    def name(self) -> str:
        if self.lib == "llama.cpp":
            return "llama.cpp"
        return "-".join([self.lib, self.dtype, *([self.quant] if self.quant != "none" else []),
                         *([] if self.compiled else ["eager"]), *([] if self.packed else ["plain"]),
                         *([] if self.screen else ["full"]),
                         *([f"b{self.batch}"] if self.batch > 1 else [])])


class Unavailable(Exception):
    """The engine cannot run in this checkout (a module not written yet); the row says why."""


def timed_stream(prompt_len: int, batch: int, t0: float, stamps: list[float], t_prefill: float) -> dict:
    """Rates from the times at which each generated token (of every row) became available."""
    steps = len(stamps) - 1
    return {
        "prefill_tok_s": batch * prompt_len / t_prefill,
        "decode_tok_s": batch * steps / (stamps[-1] - stamps[0]) if steps else float("nan"),
        "ttft_s": stamps[0] - t0,
    }


# ---- llama.cpp -------------------------------------------------------------------------------------------
def run_llama_cpp(prompt: list[int], new_tokens: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np

    path = default_model_path()
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + new_tokens, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        # Argmax over the last position's logits ourselves: no sampler chain, and EOS never stops us.
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def once(n: int) -> tuple[float, list[float], list[int]]:
        llm.reset()  # n_tokens = 0: the next eval clears the whole KV cache, so the prompt is really prefilled
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens, stamps = [greedy()], [time.perf_counter()]
        for _ in range(n - 1):
            llm.eval([tokens[-1]])
            tokens.append(greedy())
            stamps.append(time.perf_counter())
        return t0, stamps, tokens

    once(8)
    t0, stamps, tokens = once(new_tokens)
    return {**timed_stream(len(prompt), 1, t0, stamps, stamps[0] - t0), "tokens": tokens,
            "weight_bytes": path.stat().st_size, "path": f"llama-cpp-python {llama_cpp.__version__}"}


# ---- transformers ----------------------------------------------------------------------------------------
def token_stamps():
    """A streamer for transformers' `generate` that records when each new token is handed over (`.stamps`)."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:  # the first put is the prompt
            if self.seen_prompt:
                self.stamps.append(time.perf_counter())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    return Stamps()


def run_transformers(dtype: str, prompt: list[int], new_tokens: int) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[dtype]).eval()
    ids = torch.tensor([prompt])

    def generate(n: int) -> tuple[float, list[float], list[int]]:
        streamer = token_stamps()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, top_p=None, top_k=None, streamer=streamer)
        return t0, streamer.stamps, out[0, len(prompt):].tolist()

    with torch.inference_mode():
        generate(8)
        t = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter() - t
        t0, stamps, tokens = generate(new_tokens)
    return {**timed_stream(len(prompt), 1, t0, stamps, t_prefill), "tokens": tokens,
            "weight_bytes": quantized_bytes(model), "path": f"transformers {transformers.__version__}"}


# ---- gemmakit --------------------------------------------------------------------------------------------
# gemmakit runs through its batched engine; quantization through gemmakit.quantize.quantize_model.
def run_gemmakit(spec: Spec, prompt: list[int], new_tokens: int) -> dict:
    from gemmakit.checkpoints import load_model
    from gemmakit.engine import Engine
    from gemmakit.runtime.plan import prepare_weights
    from gemmakit.sampling import SamplingParams

    # Quantized rows load the way `gemmakit --quantize` does: module by module, never the whole fp32 model.
    model = load_model(dtype=DTYPES[spec.dtype], quantize=spec.quant)
    # As gemmakit.api.load does: oneDNN's layout where this machine's oneDNN packs the dtype.
    prepare_weights(model, spec.packed, spec.compiled)
    # The warm-up generation inside gemmakit_engine builds the compiled decode step before any timing.
    engine = Engine(model, max_batch=spec.batch, context=len(prompt) + new_tokens, compile=spec.compiled,
                    screen=spec.screen)
    weight_bytes = engine.runtime.read_bytes_per_step()  # what a greedy decode step reads, in the layouts it reads
    # SamplingParams defaults: greedy, no stop tokens, loop guard off, so every row runs to max_tokens.
    result = gemmakit_engine(engine, lambda n: SamplingParams(max_tokens=n, temperature=0.0), spec.batch, prompt,
                             new_tokens)
    return {**result, "weight_bytes": weight_bytes}


def gemmakit_engine(engine, params: Callable[[int], object], batch: int, prompt: list[int],
                    new_tokens: int) -> dict:
    """The first `step` prefills every row and samples its first token; each later step decodes all rows."""

    def once(n: int) -> tuple[float, list[float], list]:
        reqs = [engine.submit(prompt, params(n)) for _ in range(batch)]
        t0 = time.perf_counter()
        stamps = []
        while engine.has_work:
            engine.step()
            stamps.append(time.perf_counter())
        return t0, stamps, reqs

    once(8)
    t0, stamps, reqs = once(new_tokens)
    short = [len(r.tokens) for r in reqs if len(r.tokens) != new_tokens]
    if short:
        raise RuntimeError(f"rows stopped early ({short} tokens, {reqs[0].finish_reason}): not a fair measurement")
    assert len(stamps) == new_tokens, "one step per token: the first prefills every row, each later one decodes"
    return {**timed_stream(len(prompt), batch, t0, stamps, stamps[0] - t0), "tokens": reqs[0].tokens,
            "path": f"gemmakit.engine, batch {batch}"}


# ---- the worker process ----------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    spec, prompt = Spec.parse(args.worker), [int(t) for t in args.ids.split(",")]
    try:
        if spec.lib == "llama.cpp":
            result = run_llama_cpp(prompt, args.new_tokens, args.threads)
        elif spec.lib == "transformers":
            result = run_transformers(spec.dtype, prompt, args.new_tokens)
        else:
            result = run_gemmakit(spec, prompt, args.new_tokens)
    except Unavailable as e:
        return {"error": str(e)}
    return {**result, "peak_rss_bytes": peak_rss_bytes()}


def spawn(spec: Spec, prompt: list[int], args: argparse.Namespace) -> dict:
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", spec.name, "--ids", ",".join(map(str, prompt)),
           "--new-tokens", str(args.new_tokens), "--threads", threads]
    busy0, child0, t0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    other = (busy_cpu_seconds() - busy0 - (children_cpu_seconds() - child0)) / (time.perf_counter() - t0)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"
        if out.returncode < 0:  # a crash in native code: its last stderr line is some log line, not the cause
            name = signal.Signals(-out.returncode).name if -out.returncode in signal.valid_signals() else "a signal"
            return {"error": f"worker killed by {name} (last output: {last})"}
        return {"error": f"worker failed: {last}"}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "other_load": max(other, 0.0)}


# ---- contention: the machine may be shared ---------------------------------------------------------------
# A busy neighbour makes thread pools that expect `threads` free cores (OpenMP spin-waits) collapse, so each
# row reports how many cores other processes kept busy while its worker ran, and --wait-idle holds each
# measurement back until the machine is quiet.
def busy_cpu_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except OSError:
        return 0.0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


QUIET_CORES = 0.25  # other processes using less than this is a quiet machine


def wait_for_idle(max_wait: float, threshold: float = QUIET_CORES, window: float = 2.0) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` cores; returns their last load."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, c0 = busy_cpu_seconds(), time.process_time()
        time.sleep(window)
        load = (busy_cpu_seconds() - b0 - (time.process_time() - c0)) / window
        if load < threshold or time.monotonic() > deadline:
            return load


# ---- the driver ------------------------------------------------------------------------------------------
def prompt_ids(n: int) -> list[int]:
    """BOS + the text's tokens, repeated as needed, cut to exactly n ids."""
    from gemmakit.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(default_model_path())
    body = tok.encode(PROMPT_TEXT, add_bos=False)
    return [tok.bos_id, *(body * (n // len(body) + 1))][:n]


def median_row(spec: Spec, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    label = spec.name
    if not ok:
        return {"engine": label, "error": runs[-1]["error"]}
    # A run disturbed by other processes is not a sample of this engine's speed: leave it out when we can.
    quiet = [r for r in ok if r["other_load"] < QUIET_CORES] or ok
    keys = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_bytes", "weight_bytes", "other_load")
    return {"engine": label, **{k: statistics.median(r[k] for r in quiet) for k in keys},
            "tokens": quiet[-1]["tokens"], "path": quiet[-1]["path"], "runs": f"{len(quiet)}/{len(runs)}"}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def table_rows(specs: list[Spec], rows: list[dict], bandwidth: float) -> list[dict]:
    by_name = {s.name: r for s, r in zip(specs, rows, strict=True)}
    ref = by_name.get("llama.cpp", rows[0])
    out = []
    for spec, r in zip(specs, rows, strict=True):
        if "error" in r:
            out.append({"engine": r["engine"], "note": r["error"]})
            continue
        peer = by_name.get(f"transformers-{spec.dtype}")
        out.append({
            "engine": r["engine"],
            "prefill tok/s": r["prefill_tok_s"],
            "decode tok/s": r["decode_tok_s"],
            "x llama.cpp": ratio(r, ref),
            "x transformers same dtype": ratio(r, peer) if spec.lib != "llama.cpp" else None,
            # Total tokens/s of a batched row against the same engine at batch 1.
            "x batch 1": ratio(r, by_name.get(replace(spec, batch=1).name)) if spec.batch > 1 else None,
            "TTFT s": r["ttft_s"],
            "peak RSS MiB": r["peak_rss_bytes"] / MiB,
            "weights MiB": r["weight_bytes"] / MiB,
            "roofline": r["decode_tok_s"] / spec.batch * r["weight_bytes"] / (bandwidth * 1e9),
            "agree": common_prefix(r["tokens"], ref.get("tokens", [])),
            "other load": r["other_load"],
            "runs": r["runs"],
            "note": r["path"],
        })
    return out


def ratio(r: dict, base: dict | None) -> float | None:
    if base is None or "error" in base:
        return None
    return r["decode_tok_s"] / base["decode_tok_s"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=None,
                    help="comma-separated; default: llama.cpp, transformers-fp32/bf16, gemmakit-fp32/bf16 (compiled "
                         "and eager), gemmakit-fp32-int8/int4 and gemmakit-fp32/bf16/fp32-int4 at batch 8")
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="before each measurement, wait up to this many seconds for other processes to go quiet "
                         "(0: do not wait)")
    ap.add_argument("--save", help="write every raw run (JSON) to this file")
    ap.add_argument("--json", metavar="PATH", help="write the table's rows, the setup and the machine (CPU model "
                                                   "and flags, ISA limits, torch) to this JSON file, atomically; "
                                                   "benchmarks/render_performance.py reads it")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    return ap.parse_args()


def progress(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return (f"prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s, "
            f"peak {r['peak_rss_bytes'] / MiB:.0f} MiB, other load {r['other_load']:.2f} cores")


def measure(specs: list[Spec], prompt: list[int], args: argparse.Namespace) -> dict[Spec, list[dict]]:
    runs: dict[Spec, list[dict]] = {s: [] for s in specs}
    for i in range(args.repeats):
        for spec in specs:  # interleaved: A, B, C, A, B, C, ...
            if args.wait_idle:
                wait_for_idle(args.wait_idle)
            runs[spec].append(spawn(spec, prompt, args))
            print(f"  [{i + 1}/{args.repeats}] {spec.name}: {progress(runs[spec][-1])}", file=sys.stderr, flush=True)
    return runs


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    names = args.engines or ",".join(DEFAULT_ENGINES)
    specs = [Spec.parse(n.strip()) for n in names.split(",")]
    prompt = prompt_ids(args.prompt_len)
    torch.set_num_threads(args.threads)
    if args.wait_idle:
        wait_for_idle(args.wait_idle)  # the bandwidth is as sensitive to a busy neighbour as the engines
    bandwidth = measure_bandwidth(kind="read")
    runs = measure(specs, prompt, args)
    if args.save:
        with open(args.save, "w") as f:
            json.dump({s.name: runs[s] for s in specs}, f, indent=1)
    rows = [median_row(s, runs[s]) for s in specs]
    title = (f"Gemma 3 270M Q4_K_M GGUF, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens (greedy), "
             f"{args.threads} threads of {os.cpu_count()} CPUs, read bandwidth {bandwidth:.1f} GB/s, "
             f"median of {args.repeats}")
    table = table_rows(specs, rows, bandwidth)
    print(f"\n{title}\n")
    print(format_table(table))
    if args.json:
        write_json(Path(args.json), args, specs, title, bandwidth, table)
        print(f"\nwrote {args.json}", file=sys.stderr)


def write_json(path: Path, args: argparse.Namespace, specs: list[Spec], title: str, bandwidth: float,
               table: list[dict]) -> None:
    """The printed rows (same keys, null for '-'), the setup and the machine, written atomically (a temporary
    file beside `path`, then renamed: an interrupted run never leaves half a file for render_performance.py)."""
    setup = {"title": title, "model": "Gemma 3 270M Q4_K_M GGUF", "prompt_len": args.prompt_len,
             "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
             "read_bandwidth_gb_s": bandwidth, "engines": [s.name for s in specs],
             "command": shlex.join(["python", *sys.argv])}
    report = {"benchmark": "engine_vs_peers", "version": 1, "setup": setup, "machine": machine_info(args.threads),
              "rows": [plain_json(r) for r in table]}
    write_text_atomic(path, json.dumps(report, indent=1, allow_nan=False) + "\n")


# ---- the machine, for --json -----------------------------------------------------------------------------
# The flags that decide which CPU kernels can run (oneDNN's bf16 reorders and GEMMs, VNNI int8, AMX), and the
# environment variables that hold oneDNN and ATen below what the CPU has.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "avx_vnni")
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (Linux); elsewhere platform's name and no flags."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown", flags


def machine_info(threads: int) -> dict:
    name, flags = cpuinfo()
    return {
        "cpu_model": name,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "isa_limits": {k: os.environ.get(k) for k in ISA_LIMITS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": threads,
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def plain_json(row: dict) -> dict:
    """A table row as strict JSON: NaN and infinities (a run too short to time) become null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


if __name__ == "__main__":
    main()
