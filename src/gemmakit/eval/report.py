"""Reports people can read: one or more `results.json` files (e.g. a base model and its fine-tune or its int4
quantization) become `report.md`, `report.html` and a bar chart, runs side by side.

The chart shows per-subject accuracy for MMLU (per category when there are many subjects) and the headline
metrics for the other tasks; the tables give every number with the settings that produced it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from gemmakit.files import write_atomic, write_text_atomic
from gemmakit.flags import normalize_quantize

HEADLINE = {"mmlu": ["acc_micro", "acc_macro"], "gsm8k": ["exact_match_strict", "exact_match_flexible"],
            "humaneval": ["pass@1", "pass@10", "pass@100"], "perplexity": ["token_perplexity", "bits_per_byte"],
            "mtbench": ["score", "score_turn1", "score_turn2"], "custom": ["acc", "acc_norm", "generation_accuracy"]}


def _label(result: dict[str, Any]) -> str:
    c = result["config"]
    parts = [str(result.get("model") or c.get("model") or "default")]
    if quantize := normalize_quantize(c.get("quantize")):
        parts.append(quantize)
    if c.get("adapter"):
        parts.append(f"+{Path(c['adapter']).parent.name or Path(c['adapter']).name}")
    return " ".join(parts)


def _bars(results: list[dict[str, Any]]) -> tuple[list[str], list[list[float]]]:
    """Names of the bars and one value per run for each."""
    task, metrics = results[0]["task"], [r["metrics"] for r in results]
    if task == "mmlu":
        key = "subjects" if len(metrics[0]["subjects"]) <= 12 else "categories"
        names = sorted(metrics[0][key])
        return names, [[m[key].get(n, 0.0) for n in names] for m in metrics]
    names = [k for k in HEADLINE.get(task, sorted(metrics[0])) if k in metrics[0]]
    number = lambda v: v if isinstance(v, (int, float)) else 0.0  # noqa: E731 - a missing score draws no bar
    return names, [[number(m.get(n)) for n in names] for m in metrics]


def chart(results: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values = _bars(results)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4), dpi=120)
    for i, (result, row) in enumerate(zip(results, values, strict=True)):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, row, width, label=_label(result))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=20, ha="right")
    ax.set_title(f"{results[0]['task']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _grid(results: list[dict[str, Any]]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(column labels, metric names in first-seen order, one flat metrics dict per run): both tables' content."""
    rows = [_flat(r["metrics"]) for r in results]
    return [_label(r) for r in results], list(dict.fromkeys(k for row in rows for k in row)), rows


def markdown(results: list[dict[str, Any]], png_name: str) -> str:
    labels, keys, rows = _grid(results)
    lines = [f"# {results[0]['task']} results", "", f"![chart]({png_name})", "",
             "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {k} | " + " | ".join(_cell(row.get(k, "")) for row in rows) + " |" for k in keys]
    lines += ["", "## Settings", ""]
    for label, r in zip(labels, results, strict=True):
        settings = {k: v for k, v in r["config"].items() if v not in (None, "", {}, False)}
        lines.append(f"- **{label}**: `{json.dumps(settings)}`; versions `{json.dumps(r['versions'])}`")
    return "\n".join(lines) + "\n"


def write_report(result_files: list[str | Path], out: str | Path) -> Path:
    """report.md, report.html and chart.png in `out` for the given results.json files (same task)."""
    results = [json.loads(Path(f).read_text()) for f in result_files]
    tasks = {r["task"] for r in results}
    if len(tasks) != 1:
        raise ValueError(f"a report compares runs of one task, not {sorted(tasks)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chart(results, out / "chart.png")
    text = markdown(results, "chart.png")
    write_text_atomic(out / "report.md", text)
    table = _html_table(results)
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(results[0]['task'])} results</title>"
            f"<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .6em;"
            f"border-bottom:1px solid #ddd;text-align:right}}</style><h1>{html.escape(results[0]['task'])} "
            f"results</h1><img src=chart.png alt=chart style='max-width:100%'>{table}")
    write_text_atomic(out / "report.html", page)
    return out / "report.md"


def _html_table(results: list[dict[str, Any]]) -> str:
    labels, keys, rows = _grid(results)
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(x)}</th>" for x in labels) + "</tr>"
    body = "".join("<tr><th>" + html.escape(k) + "</th>" + "".join(
        f"<td>{html.escape(_cell(row.get(k, '')))}</td>" for row in rows) + "</tr>" for k in keys)
    return f"<table>{head}{body}</table>"
