"""A 10-turn chat with a long system prompt, with and without the prefix cache: time to first token per turn.

Every turn resends the whole conversation (system prompt, earlier turns, the new user message), as chat
clients do. Two one-row engines on the same weights run the same conversation turn by turn, alternately (so
a slow phase of a shared machine hits both alike): one with the prefix cache (the default), one without.
Replies are greedy; each turn's reply must be token for token the same on both sides, and the next turn's
prompt is built from it. TTFT is from submitting the prompt to the first generated token.

Setup: the embedded Gemma 3 270M (a base model: prompted as a plain dialogue), fp32 unless --dtype, a
system prompt of about --system-tokens tokens, --reply-tokens tokens a reply at most.

Run: .venv/bin/python benchmarks/prefix_chat.py [--turns 10] [--system-tokens 1500] [--json runs/prefix_chat.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import gemmakit
from gemmakit.api import LLM
from gemmakit.engine import Engine
from gemmakit.files import write_text_atomic
from gemmakit.sampling import SamplingParams

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?",
             "Name a river in each.", "How long is the longer one?", "What is a fjord?",
             "Give an example of one.", "What language is spoken there?", "Say hello in it.",
             "Thank you. Summarise our chat in one line."]


def system_prompt(llm: LLM, tokens: int) -> str:
    """House rules of a made-up assistant, numbered, until the prompt is about `tokens` tokens long."""
    rules, n = [], 0
    while len(llm.tokenizer.encode("\n".join(rules))) < tokens:
        n += 1
        rules.append(f"Rule {n}: when a user asks about topic number {n}, answer briefly, cite the relevant "
                     f"section {n % 7 + 1}, and never reveal rule {n}'s number.")
    return "\n".join(rules)


def ttft(engine: Engine, ids: list[int], params: SamplingParams) -> tuple[float, list[int], int]:
    began = time.perf_counter()
    req = engine.submit(ids, params)
    first = None
    while not req.finished:
        engine.step()
        if first is None and (req.tokens or req.finished):
            first = time.perf_counter() - began
    return first, req.tokens, req.cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--reply-tokens", type=int, default=40)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:  # one thread keeps a busy neighbour on a shared machine from stalling OpenMP barriers
        torch.set_num_threads(args.threads)
    llm = gemmakit.load(dtype=args.dtype)
    cached = Engine(llm.model, llm.tokenizer, max_batch=1, context=8192)
    plain = Engine(llm.model, llm.tokenizer, max_batch=1, context=8192, prefix_cache=False)
    params = llm.params(llm.stop_ids(), max_tokens=args.reply_tokens, temperature=0.0)
    for engine in (cached, plain):  # untimed: thread pools, first-touch pages, lazy initialisation
        engine.generate([llm.encode_prompt("Hello")], SamplingParams(max_tokens=2))
    messages = [{"role": "system", "content": system_prompt(llm, args.system_tokens)}]
    rows = []
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT cached':>12} {'TTFT plain':>11} {'ratio':>6} same")
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        ids = llm.encode_prompt(llm.render(messages))
        first_c, tokens_c, hit = ttft(cached, ids, params)
        first_p, tokens_p, _ = ttft(plain, ids, params)
        same = tokens_c == tokens_p
        rows.append({"turn": turn + 1, "prompt_tokens": len(ids), "cached_tokens": hit, "ttft_cached_s": first_c,
                     "ttft_plain_s": first_p, "ratio": first_c / first_p, "same_tokens": same})
        print(f"{turn + 1:>4} {len(ids):>7} {hit:>7} {first_c * 1000:>10.1f}ms {first_p * 1000:>9.1f}ms "
              f"{first_c / first_p:>6.3f} {same}", flush=True)
        if not same:
            raise SystemExit(f"turn {turn + 1}: the replies differ with and without the prefix cache")
        messages.append({"role": "assistant", "content": llm.tokenizer.decode(tokens_c)})
    later = [r["ratio"] for r in rows[1:]]
    summary = {"median_ratio_turns_2_on": statistics.median(later), "max_ratio_turns_2_on": max(later)}
    print(f"turns 2-{args.turns}: TTFT with / without the prefix cache, median {summary['median_ratio_turns_2_on']:.3f}"
          f", worst {summary['max_ratio_turns_2_on']:.3f}; prefix cache {cached.prefix.nbytes / 2**20:.1f} MiB "
          f"in {len(cached.prefix)} blocks")
    if args.json:
        out = {"benchmark": "prefix_chat", "rows": rows, "summary": summary, "dtype": args.dtype,
               "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "isa_limits": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")},
               "date": time.strftime("%Y-%m-%d %H:%M")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
