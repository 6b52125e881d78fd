"""GGUF load time and peak memory: does loading hold about the final model, not the file plus the model?

Every measurement is a fresh Python process (its peak resident set is VmHWM from /proc/self/status, read at its
end), so nothing a previous step imported or cached counts.

- small: the embedded Gemma 3 270M, loaded by `load_model` in each mode of --modes. Reports the load time,
  the peak RSS, the model's own bytes (`quantize.quantized_bytes`) and the ratio peak / model. The interpreter
  with torch imported is part of the peak, which a 270M model cannot hide: the ratio says more the larger
  the model.
- big (--big): a file of gemma-4-26b-a4b's real shape (`registry.config_for`), random weights, written by
  `export_gguf4.write_gemma4_gguf` in --big-dtype from a fetch that makes each tensor when the writer asks for
  it (file size, write time, the writer's peak RSS). Then the loader's streaming pass alone (open the file,
  build the config, decode every tensor in file order to float and let it go: what `load_gguf` does before
  handing each tensor to the model; its peak is what loading adds on top of the model it keeps). With the
  default Q4_0 (Google's QAT releases are Q4_0) the file is also loaded for real with `--quantize int4`, which
  keeps the file's codes for the linears, the experts and the tied head, so the model fits a machine that
  holds it in no other mode; that process reports peak / model bytes and runs one forward step. The file is
  deleted at the end.

Run: .venv/bin/python benchmarks/gguf_load.py [--modes fp32 int8 int4] [--big] [--json runs/gguf_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEAK = """
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

SMALL = PEAK + """
import json, time, torch
t0 = time.perf_counter()
from gemmakit.checkpoints import load_model
from gemmakit.quantize import quantized_bytes
model = load_model(None, quantize={mode!r})
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "peak": _peak(), "model_bytes": quantized_bytes(model)}}))
"""

WRITE = PEAK + """
import json, time, torch
from gemmakit.checkpoints.export_gguf4 import hf_shapes, write_gemma4_gguf
from gemmakit.registry import config_for
config = config_for("gemma-4-26b-a4b")
SHAPES = hf_shapes(config)
gen = torch.Generator().manual_seed(0)

def fetch(name):  # made when the writer asks for it: the model never exists whole
    shape = SHAPES[name]
    return torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 0.02

t0 = time.perf_counter()
write_gemma4_gguf({path!r}, config, fetch, dtype={dtype!r})
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak": _peak(),
                  "weights": sum(int(torch.Size(s).numel()) for s in SHAPES.values())}}))
"""

PASS = PEAK + """
import json, time
t0 = time.perf_counter()
from gemmakit.checkpoints.gguf import _dequantize, config_from_gguf
from gemmakit.checkpoints.gguf_reader import open_gguf, release_pages
reader = open_gguf({path!r})
config = config_from_gguf(reader, {path!r})
largest = 0
for t in reader.tensors:
    shape = tuple(int(n) for n in reversed(t.shape))
    w = _dequantize(t, t.data, shape, {path!r})
    largest = max(largest, w.numel() * w.element_size())
    del w
    release_pages(reader, t.data_offset, t.n_bytes)
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak": _peak(), "largest_f32": largest,
                  "tensors": len(reader.tensors), "layers": config.num_hidden_layers}}))
"""

LOAD = PEAK + """
import json, time, torch
t0 = time.perf_counter()
from gemmakit.checkpoints import load_model
from gemmakit.quantize import quantized_bytes
model = load_model({path!r}, quantize="int4")
seconds = time.perf_counter() - t0
with torch.no_grad():
    t1 = time.perf_counter()
    logits = model(torch.tensor([[2, 818, 5279]]))
    step = time.perf_counter() - t1
print(json.dumps({{"seconds": seconds, "peak": _peak(), "model_bytes": quantized_bytes(model),
                  "forward_seconds": step, "finite": bool(torch.isfinite(logits).all()),
                  "note": model.weights_note}}))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"measurement process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def small(modes: list[str]) -> list[dict]:
    rows = []
    for mode in modes:
        r = run(SMALL.format(mode=None if mode == "fp32" else mode))
        rows.append({"what": f"270M Q4_K_M GGUF, load_model quantize={mode}", **r,
                     "ratio": r["peak"] / r["model_bytes"]})
        print(f"  {rows[-1]['what']}: {r['seconds']:.1f} s, peak {gib(r['peak'])} GiB, model {gib(r['model_bytes'])}"
              f" GiB", file=sys.stderr, flush=True)
    return rows


def big(path: Path, dtype: str) -> list[dict]:
    if path.exists():
        sys.exit(f"{path} exists: give another --big-path or delete it")
    try:
        print(f"  writing {path} ({dtype}) ...", file=sys.stderr, flush=True)
        w = run(WRITE.format(path=str(path), dtype=dtype))
        size = path.stat().st_size
        print(f"  written: {gib(size)} GiB in {w['seconds']:.0f} s, peak {gib(w['peak'])} GiB", file=sys.stderr,
              flush=True)
        p = run(PASS.format(path=str(path)))
        print(f"  pass: {p['seconds']:.0f} s, peak {gib(p['peak'])} GiB", file=sys.stderr, flush=True)
        loaded = run(LOAD.format(path=str(path))) if dtype == "q4_0" else None
        if loaded:
            print(f"  int4 load: {loaded['seconds']:.0f} s, peak {gib(loaded['peak'])} GiB, model "
                  f"{gib(loaded['model_bytes'])} GiB; {loaded['note']}", file=sys.stderr, flush=True)
    finally:
        path.unlink(missing_ok=True)
    rows = [{"what": f"gemma-4-26b-a4b shape, random, write_gemma4_gguf {dtype}", "seconds": w["seconds"],
             "peak": w["peak"], "file_bytes": size, "weights": w["weights"]},
            {"what": "the same file: open, config, decode every tensor to f32 in file order, keep none",
             "seconds": p["seconds"], "peak": p["peak"], "file_bytes": size, "largest_f32": p["largest_f32"],
             "bf16_model_bytes": 2 * w["weights"]}]
    if loaded:
        rows.append({"what": "the same file: load_model(quantize=int4), then one 3-token forward "
                             f"({loaded['forward_seconds']:.1f} s, logits finite: {loaded['finite']})",
                     **loaded, "ratio": loaded["peak"] / loaded["model_bytes"]})
    return rows


def render(rows: list[dict]) -> str:
    out = ["| what | seconds | peak RSS GiB | model / file GiB | peak / model |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "model_bytes" in r:
            out.append(f"| {r['what']} | {r['seconds']:.1f} | {gib(r['peak'])} | model {gib(r['model_bytes'])} | "
                       f"{r['ratio']:.2f} |")
        else:
            extra = f"; largest tensor as f32 {gib(r['largest_f32'])} GiB" if "largest_f32" in r else ""
            out.append(f"| {r['what']}{extra} | {r['seconds']:.0f} | {gib(r['peak'])} | file "
                       f"{gib(r['file_bytes'])} | - |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="*", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    ap.add_argument("--big", action="store_true", help="also write and read a gemma-4-26b-a4b-shaped file")
    ap.add_argument("--big-path", type=Path, default=Path("/tmp/gemmakit-26b-a4b-random.gguf"))
    ap.add_argument("--big-dtype", default="q4_0", choices=["q4_0", "q8_0", "bf16", "f16"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = small(args.modes) + (big(args.big_path, args.big_dtype) if args.big else [])
    print(render(rows))
    if args.json:
        from gemmakit.files import write_atomic

        run_info = {"benchmark": "gguf_load", "rows": rows, "date": time.strftime("%Y-%m-%d"),
                    "cpus": os.cpu_count(), "command": "python " + " ".join(sys.argv)}
        write_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(run_info, indent=1)))


if __name__ == "__main__":
    main()
