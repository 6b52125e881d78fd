"""Measurement utilities for `gemmakit bench` and benchmarks/: memory bandwidth, resident memory, a decode
roofline and Markdown tables.

Why a roofline: single-sequence decode is memory-bound. Every step reads (nearly) all weights plus the KV cache
once and does little arithmetic per byte, so the best possible decode rate is bandwidth / bytes per step.
`roofline_fraction` says how close a measured rate gets to that ceiling, which is a number that means the same
on a laptop and on a server, unlike tokens per second.

Bandwidth conventions (those of STREAM): a copy of N bytes counts 2N (N read + N written; the write-allocate
read of the destination that some CPUs also do is not counted), a reduction of N bytes counts N. The default is
the read-only reduction, because decode is what we compare against and decode reads far more than it writes.
Timings are medians over repeats after one untimed warm-up pass, which faults the pages in.

What this module does not do: run models. The benchmark scripts and the CLI time their own engines and fill a
`BenchResult`.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

MiB = 1 << 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: page faults and first-touch allocation are not bandwidth
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(size_mb: int = 512, repeats: int = 5, device: str | torch.device = "cpu",
                      kind: str = "read") -> float:
    """Achievable memory bandwidth in GB/s (1e9 bytes/s), the median of `repeats` passes over `size_mb` MiB.

    kind "read": sum a buffer (bytes counted once); "copy": copy it into a second buffer (counted twice).
    CPU passes use torch's intra-op threads (torch.set_num_threads), so set those as the workload would.
    The buffer must be much larger than the last-level cache, or this measures the cache.
    """
    if kind not in ("read", "copy"):
        raise ValueError(f"kind must be 'read' or 'copy', got {kind!r}")
    device = torch.device(device)
    n = size_mb * MiB // 4
    src = torch.ones(n, dtype=torch.float32, device=device)  # ones, not empty: the pages must really exist
    if kind == "read":
        seconds = _median_seconds(lambda: src.sum(), repeats, device)
        moved = src.numel() * 4
    else:
        dst = torch.empty_like(src)
        seconds = _median_seconds(lambda: dst.copy_(src), repeats, device)
        moved = 2 * src.numel() * 4
    return moved / seconds / 1e9


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, or since `reset_peak_rss` (the kernel's high-water mark)."""
    from gemmakit.cache import proc_field_bytes

    hwm = proc_field_bytes("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Restart the high-water mark (Linux: /proc/self/clear_refs), so a later peak excludes loading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """Resident memory of this process now; the peak where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except OSError:
        return peak_rss_bytes()
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device: str | torch.device = "cpu") -> int:
    """The memory that limits a run: peak allocated CUDA memory on a GPU, peak RSS on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def roofline_fraction(decode_tok_s: float, bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Fraction of the bandwidth ceiling a decode rate reaches: tok/s x bytes read per step / bytes per second.

    `bytes_per_token` is what one decode step reads: the weights (all of them for a dense model, tied embedding
    included, since it is the output projection) plus the KV cache attended over. For a batch, one step makes
    one token per row from the same weight read: pass steps per second (tokens/s divided by the batch).
    """
    if bandwidth_gb_s <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_gb_s} GB/s")
    return decode_tok_s * bytes_per_token / (bandwidth_gb_s * 1e9)


@dataclass
class BenchResult:
    """One measured generation run. Rates are tokens per second summed over the batch."""

    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float  # request start to first generated token
    peak_rss_bytes: int  # peak CUDA memory allocated when run on a GPU (see peak_memory_bytes)
    batch: int
    prompt_len: int
    new_tokens: int
    weight_bytes: int
    roofline_fraction: float | None = None  # None until a bandwidth is known
    estimate_bytes: int | None = None  # what the engine said it would need (cache.estimate_bytes) + runtime
    acceptance: float | None = None  # with a drafter: drafts accepted / drafted (speculative.DraftStats)
    tokens_per_round: float | None = None  # with a drafter: tokens per speculative step of a row
    plan: str = ""  # the engine's runtime plan, in its one line (runtime.plan.Plan.describe)
    forecast: dict[str, int] | None = None  # and the memory it forecast (cache.estimate_bytes's parts)

    def with_roofline(self, bandwidth_gb_s: float, kv_bytes_per_step: float = 0.0) -> BenchResult:
        """A copy with `roofline_fraction` filled in: one weight read per decode step of the whole batch."""
        steps_per_s = self.decode_tok_s / self.batch
        fraction = roofline_fraction(steps_per_s, self.weight_bytes + kv_bytes_per_step, bandwidth_gb_s)
        return BenchResult(**{**asdict(self), "roofline_fraction": fraction})

    def row(self) -> dict[str, object]:
        """The result as a table row with readable units."""
        return {
            "batch": self.batch,
            "prompt": self.prompt_len,
            "new": self.new_tokens,
            "prefill tok/s": self.prefill_tok_s,
            "decode tok/s": self.decode_tok_s,
            "TTFT s": self.ttft_s,
            "peak MiB": self.peak_rss_bytes / MiB,
            "estimate MiB": None if self.estimate_bytes is None else self.estimate_bytes / MiB,
            "peak/est": None if not self.estimate_bytes else self.peak_rss_bytes / self.estimate_bytes,
            "weights MiB": self.weight_bytes / MiB,
            "roofline": self.roofline_fraction,
            **({} if self.acceptance is None else {"accept": self.acceptance, "tok/round": self.tokens_per_round}),
        }


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")  # a bare pipe would split the cell


def format_table(rows: list[dict]) -> str:
    """A Markdown table: columns are the keys in order of first appearance, numeric columns right-aligned.

    Floats get 2 decimals below 10, 1 below 100, none above; None and NaN print as "-".
    """
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in columns]
    lines = [
        "| " + " | ".join(str(c) for c in columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def run_engine_bench(model: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int,
                     context: int | None = None, compile: bool = False, drafter: object = None,
                     draft_tokens: int = 4, slack: int = 8, prompt: list[int] | None = None) -> BenchResult:
    """Time one engine run: `batch` random prompts of `prompt_len` tokens, `new_tokens` greedy tokens each.
    Prefill is timed on its own (the admission of all rows); decode covers the remaining batched steps.
    A compiled engine is built (warmed up) before the clock starts. With a `drafter` (speculative.py, built
    for `batch` rows and the context) decoding is speculative, `draft_tokens` a row per step, and the result
    carries the acceptance rate and tokens per row-step; decode tok/s counts the tokens actually produced.
    `prompt`: every row's prompt instead of random tokens (its first `prompt_len` tokens; drafting depends on
    the text).

    Memory: the peak is the high-water mark from just before the engine is built (so loading's transients
    do not count, the resident weights do) to the end of the run; the estimate is the engine's own forecast
    (weights + KV cache + working memory + compiled code, cache.estimate_bytes) plus the runtime, measured
    at the same moment: what the process holds besides the weights (Python, torch, the tokenizer)."""
    from gemmakit.engine import Engine
    from gemmakit.runtime.plan import model_bytes, model_dtype_device
    from gemmakit.sampling import SamplingParams
    from gemmakit.speculative import speculation_stats

    on_cpu = model_dtype_device(model)[1].type == "cpu"
    runtime = max(current_rss_bytes() - model_bytes(model), 0) if on_cpu else 0
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(model, max_batch=batch, context=context or prompt_len + new_tokens + 8, compile=compile,
                    drafter=drafter, draft_tokens=draft_tokens, slack=slack)
    engine.warmup()
    device = engine.device
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, model.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    if prompt is not None:
        prompts = [list(prompt[:prompt_len])] * batch
    reqs = [engine.submit(p, SamplingParams(max_tokens=new_tokens)) for p in prompts]  # no stop ids: full length
    t0 = time.perf_counter()
    engine.step()  # admits and prefills every row, each producing its first token
    _sync(device)
    t_prefill = time.perf_counter() - t0
    before = speculation_stats(engine).as_dict()
    while engine.has_work:
        engine.step()
    _sync(device)
    t_decode = time.perf_counter() - t0 - t_prefill
    decoded = sum(len(r.tokens) for r in reqs) - batch  # the first token of each row came with its prefill
    spec = {k: v - before[k] for k, v in speculation_stats(engine).as_dict().items() if k != "acceptance"}
    return BenchResult(prefill_tok_s=batch * prompt_len / t_prefill, decode_tok_s=decoded / max(t_decode, 1e-9),
                       ttft_s=t_prefill / batch, peak_rss_bytes=peak_memory_bytes(device), batch=batch,
                       prompt_len=prompt_len, new_tokens=new_tokens, weight_bytes=engine.runtime.read_bytes_per_step(),
                       estimate_bytes=runtime + engine.memory["total"],
                       acceptance=spec["accepted"] / max(spec["drafted"], 1) if drafter is not None else None,
                       tokens_per_round=spec["tokens"] / max(spec["rounds"] * batch, 1) if drafter is not None
                       else None, plan=engine.plan.describe(), forecast=dict(engine.memory))
