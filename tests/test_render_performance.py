"""benchmarks/render_performance.py: ratios come from the same run, and a run whose tokens were wrong is shown
as wrong rather than as a speed.
Run: .venv/bin/python -m pytest tests/test_render_performance.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import render_performance  # noqa: E402


def run(rows: list[dict], limits: dict | None = None) -> dict:
    return {"benchmark": "engine_vs_peers", "setup": {"title": "t", "read_bandwidth_gb_s": 20.0},
            "machine": {"cpu_flags": ["avx2", "avx512f"], "isa_limits": limits or {}}, "rows": rows}


def test_ratios_are_within_a_run_and_wrong_tokens_are_not_a_speed(tmp_path):
    native = run([{"engine": "llama.cpp", "decode tok/s": 50.0, "prefill tok/s": 500.0, "agree": 128},
                  {"engine": "transformers-fp32", "decode tok/s": 20.0, "prefill tok/s": 800.0, "agree": 128},
                  {"engine": "gemmakit-fp32", "decode tok/s": 40.0, "prefill tok/s": 600.0, "agree": 128}])
    held = run([{"engine": "llama.cpp", "decode tok/s": 40.0, "prefill tok/s": 400.0, "agree": 128},
                {"engine": "transformers-fp32", "decode tok/s": 10.0, "prefill tok/s": 700.0, "agree": 128},
                {"engine": "gemmakit-fp32", "decode tok/s": 90.0, "prefill tok/s": 650.0, "agree": 1}],
               {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    paths = []
    for name, r in (("a", native), ("b", held)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "t.md"
    assert render_performance.main([str(p) for p in paths] + ["--metric", "decode", "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| gemmakit-fp32 |"))
    assert row == "| gemmakit-fp32 | 40.0 | 0.80 | 2.00 | wrong tokens (agree 1) | - | - |"
    assert "AVX2 (held)" in out.read_text()
