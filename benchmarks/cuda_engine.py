"""gemmakit's CUDA paths against transformers on one GPU: same weights, prompt, dtype and greedy decoding.

Why random weights: no checkpoint can be fetched on a GPU machine here and the embedded GGUF (~250 MB) does not
travel with the code, so the model is a registry variant (`--model`, default the 270M) with random weights, saved
as an HF safetensors directory that both libraries load. Speed does not depend on the values; every row decodes
exactly `--new-tokens` tokens (no stop tokens), and `agree` shows how many leading greedy tokens match
transformers' bf16 ones (random logits are close together, so bf16 rounding may part them early; a 0 would still
say that something is broken).

Rows, `lib-dtype[-int8|-int4][-eager][-static][-bN][-long]`:
- gemmakit rows decode through gemmakit.engine; compiled (CUDA graphs over the static KV cache, compiled.py)
  unless `-eager`; `-int8/-int4` load with `quantize=` (weight-only, tensor-core int4 on CUDA); `-bN` decodes N
  rows at once; `-long` has a `--long`-token prompt (rolling sliding-window caches) instead of `--prompt-len`.
- transformers-bf16: `generate` with its default dynamic cache; `-static`: `cache_implementation="static"`,
  with which `generate` compiles the forward pass itself (its fastest documented set-up).
Measurements are interleaved over `--repeats` rounds after one untimed full-length run per row (compilation,
graph capture); medians are printed. prefill tok/s and TTFT time the step that prefills the prompt and samples
its first token, decode tok/s the remaining steps (each synchronised by the sampled token's trip to the host).
`GPU ms/step` (with --profile): the kernels' and copies' time per one-row decode step, against `ms/step` the
whole step: where the two differ, the step waits on the host (Python, launches, the sampled token's copy).
Memory: `peak MiB` is the CUDA allocator's high-water mark while the row was built and first run, minus what
was allocated before (so: its weights, KV cache, working memory and graph pools), against the engine's own
forecast (`estimate MiB`, cache.estimate_bytes). roofline: decode steps/s x weight bytes / the read bandwidth
measured in the same run.

Run (on a CUDA machine): python benchmarks/cuda_engine.py [--model gemma-3-270m] [--repeats 3] [--save out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_peers import common_prefix, gemmakit_engine, timed_stream, token_stamps  # noqa: E402

from gemmakit.bench import MiB, format_table, measure_bandwidth  # noqa: E402
from gemmakit.quantize import quantized_bytes  # noqa: E402
from gemmakit.registry import config_for  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Built in this order, the most telling first (each prints its first run: a run cut short keeps those), then
# measured interleaved.
DEFAULT_ROWS = ("transformers-bf16", "gemmakit-bf16", "gemmakit-bf16-eager", "gemmakit-bf16-b8", "gemmakit-bf16-int4",
                "gemmakit-bf16-int8", "gemmakit-bf16-long", "gemmakit-fp32", "transformers-bf16-static")


@dataclass(frozen=True)
class Row:
    name: str
    lib: str
    dtype: str
    quant: str = "none"
    compiled: bool = True
    static: bool = False
    batch: int = 1
    long: bool = False

    @classmethod
    def parse(cls, name: str) -> Row:
        lib, dtype, *rest = name.split("-")
        flags = {p for p in rest if not (p[:1] == "b" and p[1:].isdigit())}
        batch = [int(p[1:]) for p in rest if p[:1] == "b" and p[1:].isdigit()]
        if lib not in ("gemmakit", "transformers") or dtype not in DTYPES or \
                not flags <= {"int8", "int4", "eager", "static", "long"} or len(batch) > 1:
            raise ValueError(f"cannot read row {name!r}: use lib-fp32|bf16[-int8|-int4][-eager][-static][-bN][-long]")
        if lib == "transformers" and (dtype != "bf16" or flags - {"static", "long"} or batch):
            raise ValueError(f"{name}: transformers rows are bf16, one row, optionally -static or -long")
        quant = "int8" if "int8" in flags else "int4" if "int4" in flags else "none"
        return cls(name, lib, dtype, quant, "eager" not in flags, "static" in flags, (batch or [1])[0],
                   "long" in flags)


def random_checkpoint(model: str, device: str, folder: Path, layers: int | None) -> torch.nn.Module:
    """An HF checkpoint of the variant's shapes with random weights, saved in `folder`; the bf16 HF model."""
    import transformers

    config = config_for(model)
    if layers:  # a smaller smoke test of this script (CPU)
        config = config.replace(num_hidden_layers=layers, layer_types=config.layer_types[:layers])
    d = config.to_hf()
    family = "Gemma3" if config.family == "gemma3" else "Gemma4"
    hf_config = getattr(transformers, f"{family}TextConfig")(
        **{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    with torch.device(device):
        hf = getattr(transformers, f"{family}ForCausalLM")(hf_config).to(torch.bfloat16).eval()
    hf.save_pretrained(folder)
    return hf


def transformers_runner(hf: torch.nn.Module, row: Row, prompt: list[int], new_tokens: int):
    ids = torch.tensor([prompt], device=hf.device)
    extra = {"cache_implementation": "static"} if row.static else {}

    def sync() -> None:
        if ids.is_cuda:
            torch.cuda.synchronize()

    @torch.inference_mode()
    def once() -> dict:
        sync()
        t = time.perf_counter()
        hf(ids, use_cache=True, logits_to_keep=1)
        sync()
        t_prefill = time.perf_counter() - t
        streamer = token_stamps()
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None, streamer=streamer,
                          **extra)
        return {**timed_stream(len(prompt), 1, t0, streamer.stamps, t_prefill),
                "tokens": out[0, len(prompt):].tolist()}

    return once, quantized_bytes(hf), None, None


def gemmakit_runner(folder: Path, device: str, row: Row, prompt: list[int], new_tokens: int):
    from gemmakit.checkpoints import load_model
    from gemmakit.engine import Engine
    from gemmakit.sampling import SamplingParams

    model = load_model(folder, dtype=DTYPES[row.dtype], device=device, quantize=row.quant)
    engine = Engine(model, max_batch=row.batch, context=len(prompt) + new_tokens + 8, compile=row.compiled)
    if row.compiled and not engine.compiled:
        raise RuntimeError(f"{row.name}: torch.compile is not available here")

    def once() -> dict:
        return gemmakit_engine(engine, lambda n: SamplingParams(max_tokens=n), row.batch, prompt, new_tokens)

    return once, quantized_bytes(model), engine.memory["total"], engine


def build(row: Row, args: argparse.Namespace, folder: Path, hf, prompt: list[int]) -> dict:
    """Load the row's model and engine, run it once in full (compilation, capture) and take its memory."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if row.lib == "transformers":
        once, weight_bytes, estimate, engine = transformers_runner(hf, row, prompt, args.new_tokens)
    else:
        once, weight_bytes, estimate, engine = gemmakit_runner(folder, args.device, row, prompt, args.new_tokens)
    t = time.perf_counter()
    first = once()
    built = {"once": once, "weight_bytes": weight_bytes, "build_s": time.perf_counter() - t, "tokens": first["tokens"],
             "estimate_bytes": estimate, "runs": [], "first": first,
             "engine": engine, "prompt": prompt}
    if cuda:
        # transformers' weights were there before the row was built: count them in.
        extra = weight_bytes if row.lib == "transformers" else 0
        built["peak_bytes"] = torch.cuda.max_memory_allocated() - base + extra
    return built


def kernel_ms_per_step(engine, prompt: list[int], show: bool, steps: int = 32) -> float:
    """GPU time (kernels and copies, summed) per one-row decode step, from torch.profiler's CUDA trace; with
    `show`, the ops that take the most GPU and host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from gemmakit.sampling import SamplingParams

    engine.submit(prompt, SamplingParams(max_tokens=steps + 2))
    engine.step()  # the prefill
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_work:
        engine.step()
    if show:
        for key in ("self_device_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=10), flush=True)
    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / steps / 1e3


def table(rows: list[Row], built: dict[str, dict], bandwidth: float, reference: list[int] | None,
          args: argparse.Namespace) -> list[dict]:
    out = []
    decode = {r: statistics.median(x["decode_tok_s"] for x in built[r.name]["runs"]) for r in rows}
    base_rate = next((decode[r] for r in rows if r.lib == "transformers" and not r.static and not r.long), None)
    for r in rows:
        b = built[r.name]
        med = {k: statistics.median(x[k] for x in b["runs"]) for k in ("prefill_tok_s", "ttft_s")}
        # a long row against its twin with the short prompt; greedy agreement only on the same prompt
        short = next((decode[t] for t in rows if r.long and t.long is False and t.name != r.name
                      and replace(t, name=r.name, long=True) == r), None)
        agree = None if reference is None or r.long else common_prefix(b["tokens"], reference)
        out.append({
            "row": r.name, "prompt": args.long if r.long else args.prompt_len,
            "prefill tok/s": med["prefill_tok_s"], "TTFT ms": 1e3 * med["ttft_s"],
            "decode tok/s": decode[r], "ms/step": 1e3 * r.batch / decode[r], "GPU ms/step": b.get("gpu_ms"),
            "x transformers": decode[r] / base_rate if base_rate and not r.long else None,
            "x short": decode[r] / short if short else None,
            "roofline": decode[r] / r.batch * b["weight_bytes"] / (bandwidth * 1e9) if bandwidth else None,
            "weights MiB": b["weight_bytes"] / MiB,
            "peak MiB": b.get("peak_bytes", 0) / MiB or None,
            "estimate MiB": (b["estimate_bytes"] or 0) / MiB or None,
            "agree": agree,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m", help="a registry name (gemmakit models)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--long", type=int, default=8192, help="prompt length of -long rows")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, help="keep only this many layers (a quick test of the script)")
    ap.add_argument("--save", help="write every run and the table as JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="then profile the compiled one-row gemmakit rows: GPU time per step and its kernels")
    args = ap.parse_args()
    rows = [Row.parse(n) for n in args.rows.split(",")]
    bandwidth = measure_bandwidth(size_mb=2048, device=args.device) if args.device == "cuda" else 0.0
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        hf = random_checkpoint(args.model, args.device, folder, args.layers)
        vocab = hf.config.vocab_size
        prompts = {n: torch.randint(10, vocab, (n,), generator=g).tolist() for n in (args.prompt_len, args.long)}
        built = {}
        for r in rows:
            built[r.name] = build(r, args, folder, hf, prompts[args.long if r.long else args.prompt_len])
            b = built[r.name]
            print(f"built {r.name}: first run {b['build_s']:.1f} s, decode {b['first']['decode_tok_s']:.0f} tok/s, "
                  f"peak {b.get('peak_bytes', 0) / MiB:.0f} MiB", flush=True)
        for i in range(args.repeats):
            for r in rows:
                built[r.name]["runs"].append(built[r.name]["once"]())
            # a table per round: a run cut short by a time limit still leaves its figures
            report(rows, built, bandwidth, args, i + 1)
        if args.profile:
            for r in rows:
                if r.lib == "gemmakit" and r.batch == 1 and r.compiled:
                    print(f"\n{r.name}: where one decode step's GPU time goes", flush=True)
                    b = built[r.name]
                    b["gpu_ms"] = kernel_ms_per_step(b["engine"], b["prompt"], True, max(1, args.new_tokens - 2))
            report(rows, built, bandwidth, args, args.repeats)


def report(rows: list[Row], built: dict[str, dict], bandwidth: float, args: argparse.Namespace, rounds: int) -> None:
    ref = next((built[r.name]["tokens"] for r in rows if r.lib == "transformers" and not r.static), None)
    result = table(rows, built, bandwidth, ref, args)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n{args.model} (random weights), {gpu}, torch {torch.__version__}, read bandwidth {bandwidth:.0f} GB/s, "
          f"prompt {args.prompt_len} (long {args.long}), {args.new_tokens} new tokens, medians of {rounds}\n")
    print(format_table(result), flush=True)
    if args.save:
        runs = {name: {k: v for k, v in b.items() if k not in ("once", "engine")} for name, b in built.items()}
        Path(args.save).write_text(json.dumps({"table": result, "runs": runs, "bandwidth_gb_s": bandwidth}))

if __name__ == "__main__":
    main()
