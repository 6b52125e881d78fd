"""Markdown tables for docs/performance.md from `benchmarks/engine_vs_peers.py --json` files.

Each JSON file is one run on one machine class (a CPU, or the same CPU held to AVX2 with
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`). The output puts the runs side by side: one row per engine,
and for each run its tok/s, the ratio to llama.cpp and the ratio to transformers of the same dtype, both
measured in that same run (never across runs, whose machines and days differ). Decode and prefill get a
table each; under them, what each column ran on (CPU model and flags, ISA limits, torch's CPU capability,
torch version, threads, read bandwidth, date) and the command that produced it. A row whose greedy tokens
part from llama.cpp's within AGREE_MIN tokens is shown as wrong, not timed. `--full` adds every run's
complete table as the benchmark printed it.

Run: .venv/bin/python benchmarks/render_performance.py native.json avx2.json [--out perf.md]
     [--label "AVX-512" --label "AVX2 (held)"] [--metric decode|prefill|both] [--full]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = {"decode": "decode tok/s", "prefill": "prefill tok/s"}
# Fewer leading greedy tokens than this in common with llama.cpp's means the engine computed garbage (fp32
# and dequantized rows agree for 100+ tokens on the default GGUF): its speed is not a figure to print.
AGREE_MIN = 16


def load_run(path: str) -> dict:
    with open(path) as f:
        run = json.load(f)
    if run.get("benchmark") != "engine_vs_peers" or not isinstance(run.get("rows"), list):
        raise ValueError(f"{path}: not a benchmarks/engine_vs_peers.py --json file")
    return run


def machine_class(machine: dict) -> str:
    """A short name for the kernels this run could use: the ISA limit when one was set, else the CPU's best."""
    limits = machine.get("isa_limits") or {}
    held = limits.get("ONEDNN_MAX_CPU_ISA") or limits.get("ATEN_CPU_CAPABILITY")
    if held:
        return f"{held.upper()} (held)"
    flags = set(machine.get("cpu_flags") or [])
    if "amx_bf16" in flags:
        return "AVX-512 + AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 + bf16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2" + (" + VNNI" if "avx_vnni" in flags else "")
    return str(machine.get("torch_cpu_capability") or machine.get("arch") or "CPU")


def labels_for(runs: list[dict], given: list[str]) -> list[str]:
    if given and len(given) != len(runs):
        raise ValueError(f"{len(given)} --label for {len(runs)} files: give one per file, or none")
    labels = given or [machine_class(r["machine"]) for r in runs]
    seen: dict[str, int] = {}
    out = []
    for label in labels:  # two runs of one class (before / after a change) stay apart
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def peer_dtype(engine: str) -> str | None:
    """The transformers row a row compares with: the same dtype (quantized gemmakit rows start from fp32)."""
    if engine == "llama.cpp":
        return None
    return "bf16" if "bf16" in engine.split("-") else "fp32"


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def number(v: float | None) -> str:
    """As gemmakit.bench.format_table prints: 2 decimals below 10, 1 below 100, none above; '-' for none."""
    if v is None:
        return "-"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def side_by_side(runs: list[dict], labels: list[str], metric: str) -> str:
    key = METRICS[metric]
    engines = list(dict.fromkeys(row["engine"] for run in runs for row in run["rows"]))
    header = ["engine"]
    for label in labels:
        header += [f"{label}: {key}", f"{label}: x llama.cpp", f"{label}: x transformers"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    by_run = [{row["engine"]: row for row in run["rows"]} for run in runs]
    for engine in engines:
        cells = [engine]
        for rows in by_run:
            row = rows.get(engine)
            if row is None:
                cells += ["-", "-", "-"]
                continue
            if key not in row:  # the benchmark could not run this engine; its note says why
                cells += ["failed", "-", "-"]
                continue
            if engine != "llama.cpp" and isinstance(row.get("agree"), int) and row["agree"] < AGREE_MIN:
                cells += [f"wrong tokens (agree {row['agree']})", "-", "-"]
                continue
            llama = rows.get("llama.cpp", {}).get(key)
            dtype = peer_dtype(engine)
            peer = rows.get(f"transformers-{dtype}", {}).get(key) if dtype else None
            cells += [number(row[key]), number(ratio(row[key], llama)), number(ratio(row[key], peer))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(runs: list[dict], labels: list[str]) -> str:
    lines = []
    for run, label in zip(runs, labels, strict=True):
        m, s = run["machine"], run["setup"]
        limits = ", ".join(f"{k}={v}" for k, v in (m.get("isa_limits") or {}).items() if v) or "none"
        flags = " ".join(m.get("cpu_flags") or []) or "none of avx2 / avx512f / avx512_bf16 / avx512_vnni / amx_bf16"
        lines.append(
            f"- **{label}**: {m.get('cpu_model', '?')} ({m.get('cpus', '?')} CPUs, {m.get('arch', '?')}); "
            f"flags: {flags}; ISA limits: {limits}; torch {m.get('torch', '?')}, CPU capability "
            f"{m.get('torch_cpu_capability', '?')}; {m.get('threads', '?')} threads; read bandwidth "
            f"{number(s.get('read_bandwidth_gb_s'))} GB/s; {m.get('date', '?')}. "
            f"Command: `{s.get('command', 'benchmarks/engine_vs_peers.py')}`")
    return "\n".join(lines)


def full_table(run: dict, label: str) -> str:
    rows = run["rows"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in columns]
    lines = [f"**{label}**: {run['setup'].get('title', '')}", "",
             "| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(number(v) if isinstance(v, int | float) and not isinstance(v, bool)
                                       else "-" if v is None else str(v) for v in (row.get(c) for c in columns))
                     + " |")
    return "\n".join(lines)


def render(runs: list[dict], labels: list[str], metric: str = "both", full: bool = False) -> str:
    # The setup without the bandwidth, which each run measures for itself (the legend gives it per run).
    setups = {run["setup"].get("title", "").split(", read bandwidth")[0] for run in runs}
    parts = []
    if len(setups) == 1 and "" not in setups:
        parts.append(next(iter(setups)) + ".")
    for m in (("decode", "prefill") if metric == "both" else (metric,)):
        parts.append(f"{METRICS[m]}; ratios against llama.cpp and transformers (same dtype) of the same run:\n\n"
                     + side_by_side(runs, labels, m))
    parts.append("Machines:\n\n" + legend(runs, labels))
    if full:
        parts += [full_table(run, label) for run, label in zip(runs, labels, strict=True)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON files written by benchmarks/engine_vs_peers.py --json")
    ap.add_argument("--label", action="append", default=[],
                    help="column name for each file, in order (default: the machine class read from the file)")
    ap.add_argument("--metric", choices=("decode", "prefill", "both"), default="both")
    ap.add_argument("--full", action="store_true", help="add each run's complete table")
    ap.add_argument("--out", help="write the Markdown to this file (atomically) instead of stdout")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.files]
        text = render(runs, labels_for(runs, args.label), args.metric, args.full)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        from gemmakit.files import write_text_atomic

        write_text_atomic(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
