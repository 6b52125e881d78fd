"""Load test of `gemmakit serve`: concurrent streaming clients against one server, with the official client.

A server is started as a user starts it (`gemmakit serve`, the embedded 270M, continuous batching with
`--max-batch` rows, compiled decode steps), then phases of 1, 8 and 32 concurrent clients each send a fixed
number of streaming requests (`openai.AsyncOpenAI`, /v1/completions with `max_tokens` tokens and EOS banned,
so every request does the same work). Per phase: requests that failed, generated tokens/s over the phase's wall
time, that throughput over the single client's (continuous batching in effect: 8 clients should get >= 3x one
client), and p50/p95 time to first token. A phase that runs past `--time-limit` stops and counts what is left
as failed. The table is printed as Markdown (and written with --out).

Run: .venv/bin/python benchmarks/serve_load.py [--clients 1 8 32] [--requests 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from gemmakit.bench import format_table

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


def start_server(port: int, max_batch: int, compile: str, threads: int | None, context: int = 1024,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--compile", compile, "--context", str(context), "--log-level", "warning"]
    env = {**os.environ, **(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 600  # a cold compile of two decode graphs takes a few minutes on 2 cores
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy in 10 minutes")


async def one_request(client: openai.AsyncOpenAI, model: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens) of one streamed completion."""
    t0, first, tokens = time.perf_counter(), None, 0
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0.8,
                                             stream=True, logit_bias={"1": -100},
                                             stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens != max_tokens:
        raise RuntimeError(f"got {tokens} tokens, asked for {max_tokens}")
    return first if first is not None else float("nan"), tokens


async def phase(url: str, model: str, clients: int, requests: int, max_tokens: int, limit: float) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=limit)
    results: list[tuple[float, int]] = []
    failures: list[str] = []

    async def user() -> None:
        for _ in range(requests):
            try:
                results.append(await one_request(client, model, max_tokens))
            except Exception as e:  # counted, and shown: a load test must not hide errors
                failures.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(user()) for _ in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=limit)
    for t in pending:
        t.cancel()
    wall = time.perf_counter() - t0
    await client.close()
    ttft = sorted(r[0] for r in results)
    missing = clients * requests - len(results) - len(failures)
    return {"clients": clients, "requests": clients * requests, "failed": len(failures) + missing,
            "tokens": sum(r[1] for r in results), "wall s": wall,
            "tok/s": sum(r[1] for r in results) / wall,
            "TTFT p50 s": statistics.median(ttft) if ttft else None,
            "TTFT p95 s": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else None,
            "errors": "; ".join(sorted(set(failures)))[:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--compile", default="on", choices=("on", "off"))
    ap.add_argument("--server-threads", type=int, default=None,
                    help="torch threads of the server (default: torch's, one per core); the clients share the "
                         "machine, and a thread pool whose cores are taken spins")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    proc = start_server(port, args.max_batch, args.compile, args.server_threads)
    print(f"server up in {time.time() - t0:.0f} s (pid {proc.pid})", file=sys.stderr)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(phase(url, model, 1, 1, 8, args.time_limit))  # warm-up: thread pools, first shapes
        rows = []
        for n in args.clients:
            rows.append(asyncio.run(phase(url, model, n, args.requests, args.max_tokens, args.time_limit)))
            rows[-1]["x 1 client"] = rows[-1]["tok/s"] / rows[0]["tok/s"]
            print(f"  {n} clients: {rows[-1]['tok/s']:.1f} tok/s, {rows[-1]['failed']} failed", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    title = (f"`gemmakit serve` load, embedded 270M (fp32, compile {args.compile}), --max-batch {args.max_batch}, "
             f"server threads {args.server_threads or 'default'}, "
             f"{args.requests} streamed completions of {args.max_tokens} tokens per client, "
             f"{os.cpu_count()} CPUs\n\n")
    table = title + format_table([{k: v for k, v in r.items() if k != "errors" or v} for r in rows])
    print(table)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(table + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
