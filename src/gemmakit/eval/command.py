"""The `gemmakit eval` and `gemmakit report` verbs (see eval/runner.py and eval/report.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from gemmakit.cli_common import add_load_args, load_llm


def cmd_eval(args: argparse.Namespace) -> None:
    from gemmakit.eval.backends import LocalBackend, OpenAIBackend
    from gemmakit.eval.report import write_report
    from gemmakit.eval.runner import EvalConfig, evaluate
    from gemmakit.eval.sandbox import ENV, describe

    if args.sandbox:
        os.environ[ENV] = args.sandbox
    if args.task == "humaneval":  # refuse before generating for an hour when no sandbox can be made
        print(f"sandbox: {describe()}")
    config = EvalConfig(task=args.task, data=args.data, out=args.out, model=args.model, endpoint=args.endpoint,
                        endpoint_model=args.endpoint_model, quantize=args.quantize, adapter=args.adapter,
                        dtype=args.dtype, chat_format=args.chat_format, chat=args.chat, shots=args.shots,
                        limit=args.limit, batch_size=args.batch_size, samples=args.samples,
                        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                        judge_endpoint=args.judge_endpoint, judge_model=args.judge_model,
                        judge_api_key=args.judge_api_key or os.environ.get("GEMMAKIT_JUDGE_API_KEY"),
                        judge_max_tokens=args.judge_max_tokens, judge_prompts=args.judge_prompts,
                        media_dir=args.media_dir)
    if args.endpoint:
        backend = OpenAIBackend(args.endpoint, args.endpoint_model, args.api_key or os.environ.get("OPENAI_API_KEY"))
    else:
        backend = LocalBackend(load_llm(args), args.batch_size)
    result = evaluate(config, backend)
    report = write_report([Path(args.out) / "results.json"], Path(args.out) / "report")
    print(json.dumps(result["metrics"], indent=2)[:3000])
    print(f"wrote {Path(args.out) / 'results.json'}, per-sample answers in {Path(args.out) / 'samples'}, "
          f"report {report}")


def cmd_report(args: argparse.Namespace) -> None:
    from gemmakit.eval.report import write_report

    print(f"wrote {write_report(args.results, args.out)} (with report.html and chart.png)")


def add_eval_parsers(sub: Any) -> None:
    from gemmakit.eval._box import MODES
    from gemmakit.eval.runner import TASKS

    e = sub.add_parser("eval", help="benchmark a model: mmlu, gsm8k, humaneval, perplexity, mtbench, custom")
    e.add_argument("task", choices=TASKS)
    e.add_argument("--data", required=True, help="local data: a file or directory in the published format")
    e.add_argument("--out", default="runs/eval", help="results.json, samples/ (resumable), report/")
    e.add_argument("--endpoint", default=None, help="evaluate an OpenAI-compatible server instead of --model")
    e.add_argument("--endpoint-model", default="default", help="the model name to send to --endpoint")
    e.add_argument("--api-key", default=None, help="for --endpoint (also: OPENAI_API_KEY)")
    e.add_argument("--chat", action="store_true", help="prompt through the chat format (instruction-tuned models)")
    e.add_argument("--shots", type=int, default=None, help="few-shot examples (default: the protocol's)")
    e.add_argument("--limit", type=int, default=None, help="only the first N samples")
    e.add_argument("--batch-size", type=int, default=8, help="sequences scored or generated together")
    e.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem (pass@k, k<=n)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    e.add_argument("--max-tokens", type=int, default=None, help="generation budget (default: the task's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--sandbox", choices=MODES, default=None,
                   help="humaneval: how model-written code is isolated (also GEMMAKIT_SANDBOX; default auto: "
                        "bubblewrap, else unshare, else refuse). unsafe-none runs it with rlimits only")
    e.add_argument("--judge-endpoint", default=None, help="mtbench: the judge's OpenAI-compatible base URL")
    e.add_argument("--judge-model", default="default", help="mtbench: the judge's model name")
    e.add_argument("--judge-api-key", default=None, help="mtbench: the judge's key (also GEMMAKIT_JUDGE_API_KEY)")
    e.add_argument("--judge-max-tokens", type=int, default=2048, help="mtbench: the judge's budget (FastChat: 2048)")
    e.add_argument("--media-dir", default=None,
                   help="custom: the folder records' \"image\" / \"images\" / \"audio\" names are relative to "
                        "(default: the --data file's folder); nothing outside it is read")
    e.add_argument("--judge-prompts", default=None, help="mtbench: FastChat's judge_prompts.jsonl, used verbatim")
    add_load_args(e)
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("report", help="a Markdown/HTML report with a chart from results.json files, side by side")
    r.add_argument("results", nargs="+", help="results.json files of one task (e.g. base and fine-tune)")
    r.add_argument("--out", required=True, help="the report's directory")
    r.set_defaults(func=cmd_report)
