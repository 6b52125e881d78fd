"""The safety verbs: `gemmakit classify`, `gemmakit watermark keys|detect` and `gemmakit redteam`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gemmakit.cli_common import add_load_args, load_llm


def cmd_watermark(args: argparse.Namespace) -> None:
    from gemmakit.files import write_text_atomic
    from gemmakit.safety import watermark as W

    if args.action == "keys":
        if Path(args.file).exists():
            raise ValueError(f"{args.file} exists; keys are never overwritten (text marked with them would be lost)")
        keys = json.dumps({"keys": W.new_keys(args.depth), "ngram_len": args.ngram_len})
        write_text_atomic(Path(args.file), keys, mode=0o600)  # a secret: whoever reads it can forge or strip
        print(f"wrote {args.file}: {args.depth} keys, n-gram length {args.ngram_len} (keep it secret)")
        return
    if not args.keys:
        raise ValueError("detect needs --keys KEYS.json (the file the text was generated with)")
    from gemmakit.checkpoints import resolve
    from gemmakit.tokenizer import Tokenizer

    config = W.load_config(args.keys)
    path = resolve(args.model)
    tokenizer = Tokenizer.from_file(path) if path.is_dir() else Tokenizer.from_gguf(path)
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    found = W.detect(config, tokenizer.encode(text, add_bos=False), skip=(tokenizer.eos_id,))
    verdict = "watermarked" if found.p_value < args.alpha else "no watermark found"
    print(json.dumps({"verdict": verdict, "score": round(found.score, 4), "p_value": found.p_value,
                      "tokens_scored": found.tokens, "alpha": args.alpha}))


def add_watermark_parser(sub: Any) -> None:
    w = sub.add_parser("watermark", help="SynthID-style watermark keys, and detection in a text file")
    w.add_argument("action", choices=("keys", "detect"))
    w.add_argument("file", help="keys: the key file to create; detect: the text file (- for stdin)")
    w.add_argument("--keys", default=None, help="detect: the key file the text was generated with")
    w.add_argument("--model", default=None, help="detect: whose tokenizer (default: the embedded 270M's)")
    w.add_argument("--alpha", type=float, default=1e-3, help="detect: p-value below which text counts as marked")
    w.add_argument("--depth", type=int, default=30, help="keys: how many (the tournament depth)")
    w.add_argument("--ngram-len", type=int, default=5, help="keys: context length + 1")
    w.set_defaults(func=cmd_watermark)


def cmd_redteam(args: argparse.Namespace) -> None:
    from gemmakit.eval.backends import LocalBackend, OpenAIBackend
    from gemmakit.safety import redteam
    from gemmakit.safety.classifier import POLICIES, PolicyClassifier, load_policies

    policies = load_policies(args.policies) if args.policies else dict(POLICIES)
    cases = redteam.load_suite(args.suite, policies)
    thresholds = json.loads(Path(args.thresholds).read_text()) if args.thresholds else {}
    args.compiled = False
    llm = load_llm(args)  # the model under test (unless --endpoint), and the classifier unless --classifier
    judge = llm
    if args.classifier:
        from gemmakit.api import load

        judge = load(args.classifier, args.dtype, args.device)
    backend = (OpenAIBackend(args.endpoint, args.endpoint_model, args.api_key or os.environ.get("OPENAI_API_KEY"))
               if args.endpoint else LocalBackend(llm, 8))
    results = redteam.run(cases, backend, PolicyClassifier(judge.model, judge.tokenizer), policies, thresholds,
                          args.max_tokens)
    report = redteam.write_report(results, args.out, args.endpoint_model if args.endpoint else llm.name)
    print(report.read_text())


def add_redteam_parser(sub: Any) -> None:
    r = sub.add_parser("redteam", help="adversarial prompts against a model or endpoint, judged by the classifier")
    r.add_argument("--suite", required=True, help="JSONL cases: category, prompt, expected (refuse | comply)")
    r.add_argument("--out", default="runs/redteam", help="redteam.json, report.md, chart.png")
    r.add_argument("--endpoint", default=None, help="test an OpenAI-compatible server instead of --model")
    r.add_argument("--endpoint-model", default="default")
    r.add_argument("--api-key", default=None)
    r.add_argument("--classifier", default=None, help="the judging model (default: the --model under test)")
    r.add_argument("--policies", default=None, help="custom policies YAML (categories may name them)")
    r.add_argument("--thresholds", default=None, help="thresholds.json from gemmakit classify --data")
    r.add_argument("--max-tokens", type=int, default=128)
    add_load_args(r)
    r.set_defaults(func=cmd_redteam)


def cmd_classify(args: argparse.Namespace) -> None:
    from gemmakit.eval.data import read_records
    from gemmakit.files import write_text_atomic
    from gemmakit.safety.classifier import POLICIES, PolicyClassifier, calibrate_on, load_policies

    policies = load_policies(args.policies) if args.policies else dict(POLICIES)
    if args.policy:
        unknown = [p for p in args.policy if p not in policies]
        if unknown:
            raise ValueError(f"unknown policy {unknown}; known: {', '.join(policies)}")
        policies = {k: policies[k] for k in args.policy}
    if (args.text is None) == (args.data is None):
        raise ValueError("give TEXT to classify, or --data LABELLED.jsonl to calibrate thresholds")
    args.compiled = False
    llm = load_llm(args)
    classifier = PolicyClassifier(llm.model, llm.tokenizer, args.batch_size)
    if args.text is not None:
        thresholds = json.loads(Path(args.thresholds).read_text()) if args.thresholds else {}
        (scores,) = classifier.score([(args.text, args.response)], policies)
        for key, p in scores.items():
            t = thresholds.get(key, 0.5)
            print(f"{key:12s} P(violation) {p:.3f}  threshold {t:.3f}  {'FLAGGED' if p >= t else 'ok'}")
        return
    report = calibrate_on(classifier, read_records(args.data), policies)
    out = Path(args.out)
    write_text_atomic(out / "calibration.json", json.dumps(report, indent=2))
    write_text_atomic(out / "thresholds.json", json.dumps({k: v["threshold"] for k, v in report.items()}, indent=2))
    print("| policy | n | AUROC | threshold | F1 | accuracy at threshold | accuracy at 0.5 |")
    print("|---|---|---|---|---|---|---|")
    for k, v in report.items():
        print(f"| {k} | {v['n']} | {v['auroc']:.3f} | {v['threshold']:.4f} | {v['f1']:.3f} | "
              f"{v['accuracy_at_threshold']:.3f} | {v['accuracy_at_0.5']:.3f} |")
    print(f"wrote {out / 'thresholds.json'} and {out / 'calibration.json'}")


def add_classify_parser(sub: Any) -> None:
    c = sub.add_parser("classify", help="P(policy violation) the ShieldGemma way, or calibrate thresholds")
    c.add_argument("text", nargs="?", default=None, help="the user prompt to classify")
    c.add_argument("--response", default=None, help="classify this model response to TEXT instead")
    c.add_argument("--policy", action="append", default=[], help="only these policies (dangerous, harassment, "
                                                                  "hate, sexual, or keys of --policies)")
    c.add_argument("--policies", default=None, help="custom policies (YAML: key: {name, description})")
    c.add_argument("--thresholds", default=None, help="thresholds.json from a calibration (default 0.5)")
    c.add_argument("--data", default=None, help="labelled JSONL (policy, prompt, [response], label) to calibrate")
    c.add_argument("--out", default="runs/classify", help="where calibration writes thresholds.json")
    c.add_argument("--batch-size", type=int, default=8)
    add_load_args(c)
    c.set_defaults(func=cmd_classify)


def add_safety_parsers(sub: Any) -> None:
    add_classify_parser(sub)
    add_watermark_parser(sub)
    add_redteam_parser(sub)
