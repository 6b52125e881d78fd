"""Running streams while a long prompt arrives: their time per output token, with paced prefill and without.

A `gemmakit serve` (the embedded 270M) streams completions to --clients clients (EOS banned, so every stream
runs its full length). Once every stream is producing, one more client sends a --long-tokens prompt. Per
stream, each gap between two streamed tokens is "before" (it ended before the long prompt was sent) or
"during" (it overlaps the time from sending the long prompt to its first token); the table gives p50 / p95 of
each and p95 during / p95 before. The same run is made against a server with paced prefill (the default: the
long prompt goes in a share of a decode step at a time) and one started with GEMMAKIT_PACED_PREFILL=off (the
whole prompt in one step, while every stream waits), one after the other on the same machine; the long
prompt's own time to first token is shown for both, since pacing trades some of it for the streams.

Run: .venv/bin/python benchmarks/stream_stall.py [--clients 8] [--long-tokens 4000] [--json runs/stream_stall.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from pathlib import Path

import openai
from serve_load import start_server  # benchmarks/serve_load.py: starts a server as a user does

from gemmakit.bench import format_table
from gemmakit.files import write_text_atomic

STREAM_PROMPT = "Here is a long story about a lighthouse keeper and the sea:"


def long_prompt(tokens: int) -> str:
    """Plain text of about `tokens` tokens for the 270M's tokenizer (numbered sentences of about 14.7 tokens;
    the table shows the exact count the server reported)."""
    return " ".join(f"Sentence {i} tells of ships that passed the cape in winter." for i in range(int(tokens / 14.7)))


async def stream(client: openai.AsyncOpenAI, model: str, max_tokens: int, times: list[float]) -> None:
    out = await client.completions.create(model=model, prompt=STREAM_PROMPT, max_tokens=max_tokens,
                                          temperature=0.8, stream=True, logit_bias={"1": -100})
    async for chunk in out:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def measure(url: str, clients: int, max_tokens: int, long_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
    model = (await client.models.list()).data[0].id
    times: list[list[float]] = [[] for _ in range(clients)]
    tasks = [asyncio.create_task(stream(client, model, max_tokens, t)) for t in times]
    while min(len(t) for t in times) < 8:  # every stream is in and decoding
        for task in tasks:
            if task.done():
                task.result()  # a stream that failed says why, rather than waiting for ever
                raise SystemExit("a stream ended before the long prompt was sent; raise --max-tokens")
        await asyncio.sleep(0.05)
    sent = time.perf_counter()
    done = await client.completions.create(model=model, prompt=long_prompt(long_tokens), max_tokens=1)
    first = time.perf_counter()
    await asyncio.gather(*tasks)
    await client.close()
    before, during = [], []
    for t in times:
        for a, b in zip(t, t[1:], strict=False):
            if b <= sent:
                before.append(b - a)
            elif a < first:
                during.append(b - a)
    return {"long prompt tokens": done.usage.prompt_tokens, "long TTFT s": first - sent,
            "TPOT p50 before ms": 1000 * statistics.median(before), "TPOT p95 before ms": 1000 * quantile(before, .95),
            "TPOT p50 during ms": 1000 * statistics.median(during), "TPOT p95 during ms": 1000 * quantile(during, .95),
            "p95 during / before": quantile(during, .95) / quantile(before, .95), "gaps during": len(during)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=400, help="tokens per stream (enough to outlast the prompt)")
    ap.add_argument("--compile", default="off")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for paced in ("on", "off"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(port, args.clients + 1, args.compile, None, context=args.long_tokens + 1024,
                            env={"GEMMAKIT_PACED_PREFILL": paced})
        try:
            row = asyncio.run(measure(f"http://127.0.0.1:{port}", args.clients, args.max_tokens, args.long_tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        rows.append({"paced prefill": paced, **row})
        print(format_table([rows[-1]]), flush=True)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), json.dumps({"benchmark": "stream_stall", "clients": args.clients,
                                                 "compile": args.compile, "rows": rows,
                                                 "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))


if __name__ == "__main__":
    main()
