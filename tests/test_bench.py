"""Measurement utilities: bandwidth, resident memory, roofline arithmetic, Markdown tables.

Run: .venv/bin/python -m pytest tests/test_bench.py -q
"""

from __future__ import annotations

import pytest

from gemmakit.bench import (
    BenchResult,
    current_rss_bytes,
    format_table,
    measure_bandwidth,
    peak_rss_bytes,
    roofline_fraction,
)


@pytest.mark.parametrize("kind", ["read", "copy"])
def test_bandwidth_is_plausible(kind):
    """Any machine that runs the tests streams more than 0.5 GB/s and less than 100 TB/s."""
    gb_s = measure_bandwidth(size_mb=64, repeats=3, kind=kind)
    assert 0.5 < gb_s < 100_000


def test_bandwidth_rejects_unknown_kind():
    """A typo in the kind is an error, not a silent default."""
    with pytest.raises(ValueError, match="kind"):
        measure_bandwidth(size_mb=1, kind="write")


def test_rss_is_positive_and_peak_bounds_current():
    """The high-water mark is never below what is resident now, even right after allocating."""
    buffer = bytearray(32 << 20)  # touch 32 MiB so the peak moves
    current, peak = current_rss_bytes(), peak_rss_bytes()
    assert current > 32 << 20
    assert peak >= current
    del buffer


def test_roofline_on_known_numbers():
    """100 tok/s x 1 GB per token on a 200 GB/s machine is half the ceiling."""
    assert roofline_fraction(100.0, 1e9, 200.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bandwidth"):
        roofline_fraction(1.0, 1.0, 0.0)


def test_batched_roofline_counts_one_weight_read_per_step():
    """A batch of 8 at 800 tok/s is 100 steps/s: the same fraction as one sequence at 100 tok/s."""
    r = BenchResult(prefill_tok_s=1.0, decode_tok_s=800.0, ttft_s=0.1, peak_rss_bytes=1, batch=8,
                    prompt_len=128, new_tokens=128, weight_bytes=10**9)
    assert r.with_roofline(200.0).roofline_fraction == pytest.approx(0.5)
    assert r.roofline_fraction is None  # with_roofline returns a copy


def test_format_table():
    """Columns in first-seen order, numbers right-aligned and rounded, missing cells and pipes handled."""
    table = format_table([
        {"engine": "llama.cpp", "decode tok/s": 123.456, "ratio": 1.0},
        {"engine": "a|b", "decode tok/s": 45.67, "ratio": None, "MiB": 7},
    ])
    assert table.splitlines() == [
        "| engine | decode tok/s | ratio | MiB |",
        "|---|---:|---:|---:|",
        "| llama.cpp | 123 | 1.00 | - |",
        "| a\\|b | 45.7 | - | 7 |",
    ]
    assert format_table([]) == ""
