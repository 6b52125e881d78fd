"""One image through Gemma 3 4B's vision tower on CPU: gemmakit against transformers, same weights, same run.

Setup: the tower and projector of google/gemma-3-4b-it's published config.json (SigLIP so400m: 896 px images,
14 px patches so 64 x 64 = 4096 patches, width 1152, MLP 4304, 27 layers, 16 heads; projector average-pooling
to 256 soft tokens in the text model's width 2560) with random weights: the same ones on both sides, made
tensor by tensor from a seed in the checkpoint's key order. transformers runs `Gemma3Model.get_image_features`
(its text model is cut to one narrow layer and a tiny vocabulary, which that call never touches); gemmakit
runs `gemma3_image_embeddings` (gemmakit.media.siglip). The image is tests/fixtures/media/scene.jpg, decoded
once; each side preprocesses it with its own processor (transformers' PIL `Gemma3ImageProcessorPil`,
gemmakit's `preprocess_images`), so one repetition is preprocess + tower + projector, end to end.

Each library runs in its own fresh process per dtype (this script with --worker), so each has its own peak.
The two are built one after the other, then driven a pass at a time, alternately (each goes first in every
other round), so that only one computes at any moment and a busy phase of a shared machine hits both alike:
one untimed warm-up pass each (oneDNN's first-call work, first-touch pages), then --repeats timed passes; the
table shows medians. Definitions, the same on both sides:
- image s: median wall time of one end-to-end pass; preprocess s and tower s split it (tower s is tower +
  projector, the model's share);
- patches/s: 4096 / tower s, the tower's rate over image patches; soft tokens/s: 256 / image s;
- peak above model: the process's resident high-water mark (VmHWM) over the warm-up and the timed passes,
  minus its resident memory just before them. Both are taken after the model is built and its build's freed
  heap is handed back to the OS (malloc_trim), and the high-water mark is restarted there
  (/proc/self/clear_refs), so the figure is what one image costs on top of the weights: activations,
  attention scratch, allocator slack. (tracemalloc cannot see torch's allocations; ru_maxrss alone would
  include the build, whose peak differs between the libraries.) `model MiB` is the weights' own bytes;
- x transformers: gemmakit's patches/s and peak above model over transformers' of the same dtype, this run;
- max |diff|: the largest difference between the two sides' soft tokens of the last pass (as fp32), a check
  that both computed the same thing from the same weights and pixels;
- other load: median over the timed passes of the cores other processes kept busy during a pass (the machine
  may be shared; each pass first waits up to --wait-idle seconds for it to go quiet).

--json PATH writes the rows, the setup and the machine (CPU model and flags, ISA limits, torch's CPU capability,
as benchmarks/engine_vs_peers.py records them), atomically; --render A.json [B.json ...] prints the Markdown of
docs/performance.md from such files, one column group per run. Run it natively and again held to AVX2:

Run: .venv/bin/python benchmarks/image_prefill.py [--repeats 3] [--dtypes fp32 bf16] [--json runs/img.json]
     ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/image_prefill.py --json ...
     .venv/bin/python benchmarks/image_prefill.py --render runs/img.json runs/img_avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_peers import busy_cpu_seconds, machine_info, wait_for_idle  # noqa: E402

from gemmakit.bench import MiB, current_rss_bytes, format_table, peak_rss_bytes, reset_peak_rss  # noqa: E402
from gemmakit.files import write_text_atomic  # noqa: E402

IMAGE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "media" / "scene.jpg"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIDES = ("gemmakit", "transformers")
# google/gemma-3-4b-it's config.json, the parts the tower and projector read (transformers 5.23's Gemma3Config
# defaults to a plain SigLIP base, not this); the text model is only there for Gemma3Model to build.
CONFIG_4B = {
    "model_type": "gemma3", "mm_tokens_per_image": 256,
    "boi_token_index": 290, "eoi_token_index": 291, "image_token_index": 292,
    "text_config": {"hidden_size": 2560, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
                    "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 300, "max_position_embeddings": 64},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}
# Gemma 3 4B's preprocessor_config.json as Gemma3Processor completes it (no pan-and-scan).
PREPROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 1 / 255,
                "size": {"height": 896, "width": 896}}
PATCHES, SOFT_TOKENS = 4096, 256


# ---- the worker process ----------------------------------------------------------------------------------
def fill_random(named: dict[str, torch.Tensor], seed: int) -> None:
    """Overwrite each tensor in place, by checkpoint key (gemmakit's names, which carry `vision_model.`), each
    from its own seeded generator: the same numbers whichever library holds them. Norm scales sit near 1 and
    every weight near the scale real towers use, so activations stay finite in bf16."""
    for i, key in enumerate(sorted(named)):
        t = named[key]
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        values = torch.randn(t.shape, generator=gen)
        if "norm" in key and key.endswith("weight"):
            values = (1.0 if "layer_norm" in key or "layernorm" in key else 0.0) + 0.1 * values
        else:
            values = 0.02 * values
        with torch.no_grad():
            t.copy_(values)


def build_gemmakit(seed: int):
    from gemmakit.media.siglip import Gemma3MultiModalProjector, Gemma3ProjectorConfig, SiglipVisionTower

    c = Gemma3ProjectorConfig.from_hf(CONFIG_4B)
    tower, projector = SiglipVisionTower(c.vision).eval(), Gemma3MultiModalProjector(c).eval()
    fill_random({**{f"vision_tower.{k}": v for k, v in tower.state_dict().items()},
                 **{f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()}}, seed)
    return tower, projector


def build_transformers(seed: int):
    from transformers import Gemma3Config, Gemma3Model

    model = Gemma3Model(Gemma3Config(**CONFIG_4B)).eval()
    named = {}
    for k, v in model.vision_tower.state_dict().items():  # transformers 5 holds SigLIP without `vision_model.`
        named[f"vision_tower.{k if k.startswith('vision_model.') else 'vision_model.' + k}"] = v
    named.update({f"multi_modal_projector.{k}": v for k, v in model.multi_modal_projector.state_dict().items()})
    fill_random({k: v for k, v in named.items() if not k.endswith("position_ids")}, seed)
    return model


def worker(side: str, dtype: str, seed: int, threads: int, out: str) -> None:
    """Build, say `ready`, then one pass per `pass` line on stdin (a JSON line of its times back each), and at
    `end` the peak above the model and the soft tokens (to `out`). The driver alternates two such processes."""
    from PIL import Image

    from gemmakit.checkpoints.common import return_freed_memory

    torch.set_num_threads(threads)
    image = Image.open(IMAGE)
    image.load()
    if side == "gemmakit":
        from gemmakit.media.gemma3_images import Gemma3ImageProcessorConfig, preprocess_images
        from gemmakit.media.siglip import gemma3_image_embeddings
        from gemmakit.runtime.packing import upcast_linears
        from gemmakit.runtime.probe import onednn_packs

        tower, projector = build_gemmakit(seed)
        tower, projector = tower.to(DTYPES[dtype]), projector.to(DTYPES[dtype])
        config = Gemma3ImageProcessorConfig.from_hf(PREPROCESSOR)
        modules = (tower, projector)
        path = "gemma3_image_embeddings, SDPA attention"
        # What gemmakit.load's runtime plan does on a CPU without a fast bf16 GEMM (runtime/plan.py).
        if DTYPES[dtype] == torch.bfloat16 and not onednn_packs(torch.bfloat16):
            upcast_linears(tower), upcast_linears(projector)
            path += ", bf16 products in fp32 (no bf16 GEMM on this CPU)"

        def preprocess():
            return preprocess_images([image], config)[0]

        def embed(pixel_values):
            return gemma3_image_embeddings(tower, projector, pixel_values)[0]
    else:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        model = build_transformers(seed).to(DTYPES[dtype])
        processor = Gemma3ImageProcessorPil(**PREPROCESSOR)
        modules = (model.vision_tower, model.multi_modal_projector)
        path = f"Gemma3Model.get_image_features, attention {model.config.vision_config._attn_implementation}"

        def preprocess():
            return processor([image], return_tensors="pt")["pixel_values"]

        def embed(pixel_values):
            return model.get_image_features(pixel_values.to(DTYPES[dtype])).pooler_output[0]

    model_bytes = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    return_freed_memory()
    before = current_rss_bytes()
    reset_peak_rss()
    say({"model_bytes": model_bytes, "rss_before": before, "path": path})
    soft = None
    for line in sys.stdin:
        if line.strip() == "end":
            break
        with torch.inference_mode():
            t0 = time.perf_counter()
            pixel_values = preprocess()
            t1 = time.perf_counter()
            soft = embed(pixel_values)
            t2 = time.perf_counter()
        say({"times": [t1 - t0, t2 - t1, t2 - t0]})
    if soft is None or tuple(soft.shape) != (SOFT_TOKENS, CONFIG_4B["text_config"]["hidden_size"]):
        raise RuntimeError(f"{side} returned no soft tokens or the wrong shape")
    torch.save(soft.float().clone(), out)
    say({"peak_above_model": peak_rss_bytes() - before})


def say(message: dict) -> None:
    print(json.dumps(message), flush=True)


class Worker:
    """A worker process of one library and dtype, driven a pass at a time."""

    def __init__(self, side: str, dtype: str, args: argparse.Namespace, out: str):
        threads = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        cmd = [sys.executable, __file__, "--worker", side, "--dtypes", dtype, "--seed", str(args.seed),
               "--threads", threads, "--out", out]
        self.name, self.out = f"{side} {dtype}", out
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.hear()

    def hear(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            sys.exit(f"{self.name} worker failed (exit {self.proc.returncode}); its error is above")
        return json.loads(line)

    def tell(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.hear()

    def cpu_seconds(self) -> float:
        """The worker's own CPU time so far (/proc/PID/stat utime + stime), to tell it from other load."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def one_pass(self) -> dict:
        busy0, own0, t0 = busy_cpu_seconds(), self.cpu_seconds(), time.perf_counter()
        r = self.tell("pass")
        other = (busy_cpu_seconds() - busy0 - (self.cpu_seconds() - own0)) / (time.perf_counter() - t0)
        return {**r, "other_load": max(other, 0.0)}

    def finish(self) -> dict:
        r = self.tell("end")
        self.proc.wait()
        return r


# ---- the driver ------------------------------------------------------------------------------------------
def row(side: str, dtype: str, r: dict, peer: dict | None, diff: float | None) -> dict:
    pre, tower, total = (statistics.median(t[j] for t in r["times"]) for j in range(3))
    out = {"library": side, "dtype": dtype, "image s": total, "preprocess s": pre, "tower s": tower,
           "patches/s": PATCHES / tower, "soft tokens/s": SOFT_TOKENS / total,
           "peak above model MiB": r["peak_above_model"] / MiB, "model MiB": r["model_bytes"] / MiB,
           "x transformers speed": None, "x transformers peak": None, "max |diff|": diff,
           "other load": statistics.median(r["other_load"])}
    if peer is not None:
        out["x transformers speed"] = statistics.median(t[1] for t in peer["times"]) / tower
        out["x transformers peak"] = r["peak_above_model"] / peer["peak_above_model"]
    return out


def measure_dtype(dtype: str, args: argparse.Namespace, tmp: str) -> dict[str, dict]:
    """Both libraries' workers, built one after the other, then their passes alternated (warm-up included),
    so a busy phase of a shared machine hits both alike; only one computes at any time."""
    workers = {}
    for side in SIDES:
        workers[side] = Worker(side, dtype, args, os.path.join(tmp, f"{side}-{dtype}.pt"))
    runs = {side: {**w.info, "times": [], "other_load": []} for side, w in workers.items()}
    for i in range(args.repeats + 1):
        for side in SIDES if i % 2 else SIDES[::-1]:  # each library goes first in alternate rounds
            if args.wait_idle:
                wait_for_idle(args.wait_idle)
            r = workers[side].one_pass()
            print(f"  {side} {dtype} pass {i}{' (warm-up)' if i == 0 else ''}: {r['times'][2]:.2f} s, other load "
                  f"{r['other_load']:.2f} cores", file=sys.stderr, flush=True)
            if i:
                runs[side]["times"].append(r["times"])
                runs[side]["other_load"].append(r["other_load"])
    for side, w in workers.items():
        runs[side].update(w.finish())
        runs[side]["soft"] = torch.load(w.out)
    return runs


def measure(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    rows, paths = [], []
    with tempfile.TemporaryDirectory(prefix="image_prefill.") as tmp:
        for dtype in args.dtypes:
            runs = measure_dtype(dtype, args, tmp)
            paths += [f"{side}: {runs[side]['path']}" for side in SIDES]
            diff = (runs["gemmakit"]["soft"] - runs["transformers"]["soft"]).abs().max().item()
            rows.append(row("gemmakit", dtype, runs["gemmakit"], runs["transformers"], diff))
            rows.append(row("transformers", dtype, runs["transformers"], None, None))
    return rows, list(dict.fromkeys(paths))


def render(runs: list[dict]) -> str:
    """Markdown for docs/performance.md: one row per library and dtype, one column group per run (machine class
    from its ISA limits or CPU flags, as render_performance.py names them), then what each run ran on."""
    from render_performance import labels_for

    labels = labels_for(runs, [])
    keys = [("image s", "image s"), ("patches/s", "patches/s"), ("soft tokens/s", "soft tok/s"),
            ("peak above model MiB", "peak MiB"), ("x transformers speed", "x tf speed"),
            ("x transformers peak", "x tf peak")]
    header = ["library", "dtype"] + [f"{label}: {short}" for label in labels for _, short in keys]
    table = []
    for lib_dtype in dict.fromkeys((r["library"], r["dtype"]) for run in runs for r in run["rows"]):
        cells = dict(zip(header[:2], lib_dtype, strict=True))
        for label, run in zip(labels, runs, strict=True):
            found = next((r for r in run["rows"] if (r["library"], r["dtype"]) == lib_dtype), {})
            cells.update({f"{label}: {short}": found.get(key) for key, short in keys})
        table.append(cells)
    lines = [format_table(table), "", "Runs:", ""]
    for label, run in zip(labels, runs, strict=True):
        m, s = run["machine"], run["setup"]
        limits = ", ".join(f"{k}={v}" for k, v in (m.get("isa_limits") or {}).items() if v) or "none"
        diffs = ", ".join(f"{r['dtype']} {r['max |diff|']:.1e}" for r in run["rows"] if r.get("max |diff|") is not None)
        lines.append(f"- **{label}**: {m['cpu_model']} ({m['cpus']} CPUs); flags {' '.join(m['cpu_flags'])}; ISA "
                     f"limits {limits}; torch {m['torch']} (CPU capability {m['torch_cpu_capability']}); "
                     f"{m['threads']} threads; median of {s['repeats']} after a warm-up; max |diff| of the soft "
                     f"tokens {diffs}; other load up to {max(r['other load'] for r in run['rows']):.2f} cores; "
                     f"{m['date']}. Command: `{s['command']}`")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per library and dtype, after one warm-up")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=10.0,
                    help="before each pass, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--json", type=Path, help="write the rows, the setup and the machine here, atomically")
    ap.add_argument("--render", type=Path, nargs="+", help="print the Markdown of earlier --json files and exit")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args()


def command() -> str:
    """This run's command line, with the ISA limits it ran under, so that it reproduces the same column."""
    limits = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)]
    return " ".join([*limits, shlex.join([".venv/bin/python", *sys.argv])])


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args.dtypes[0], args.seed, args.threads, args.out)
        return
    if args.render:
        runs = [json.loads(p.read_text()) for p in args.render]
        if any(run.get("benchmark") != "image_prefill" for run in runs):
            sys.exit("--render reads files written by benchmarks/image_prefill.py --json")
        print(render(runs), end="")
        return
    if not IMAGE.is_file():
        sys.exit(f"{IMAGE} is missing; run from a full checkout (tests/fixtures/media)")
    rows, paths = measure(args)
    title = (f"Gemma 3 4B vision tower + projector (random weights), one 896 px image ({IMAGE.name}), "
             f"{args.threads} threads of {os.cpu_count()} CPUs, median of {args.repeats}")
    shown = [{**r, "max |diff|": None if r["max |diff|"] is None else f"{r['max |diff|']:.1e}"} for r in rows]
    print(f"\n{title}\n\n{format_table(shown)}\n\n" + "\n".join(paths))
    if args.json:
        setup = {"title": title, "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
                 "paths": paths, "config": CONFIG_4B, "command": command()}
        report = {"benchmark": "image_prefill", "version": 1, "setup": setup,
                  "machine": machine_info(args.threads), "rows": rows}
        write_text_atomic(args.json, json.dumps(report, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
