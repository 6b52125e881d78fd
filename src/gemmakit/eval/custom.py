"""Your own task, without code: one JSON object per line, in either of two shapes.

- Multiple choice: {"prompt": "...", "choices": ["...", "..."], "answer": 1}: each choice is scored as the
  log-likelihood of " " + choice after the prompt (answer: the index or the choice's text); metrics `acc` and
  `acc_norm` (log-likelihood per byte of the choice, lm-eval's length normalisation).
- Generation: {"prompt": "...", "reference": "..." or ["...", ...], "metric": "exact_match" | "contains" |
  "regex", "stop": ["\\n"], "max_tokens": 64}: the model writes greedily (through the chat format with --chat)
  and the output is compared to any of the references: exactly after trimming and lower-casing, by containment,
  or as a regular expression. The metric defaults to exact_match.
An "id" field names the sample (else its line number). Records of both shapes may be mixed.
"""

from __future__ import annotations

import re
from typing import Any

METRICS = ("exact_match", "contains", "regex")


def check(doc: dict[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(doc.get("prompt"), str):
        raise ValueError(f"custom task record {index + 1}: needs a string 'prompt'")
    if "choices" in doc:
        choices = doc["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or "answer" not in doc:
            raise ValueError(f"custom task record {index + 1}: 'choices' needs a list of 2+ and an 'answer'")
        answer = doc["answer"]
        doc = {**doc, "answer": choices.index(answer) if isinstance(answer, str) else int(answer)}
    elif "reference" in doc:
        if doc.get("metric", "exact_match") not in METRICS:
            raise ValueError(f"custom task record {index + 1}: metric must be one of {METRICS}")
    else:
        raise ValueError(f"custom task record {index + 1}: give 'choices' + 'answer' or a 'reference'")
    return doc


def score_choices(doc: dict[str, Any], lls: list[float]) -> dict[str, Any]:
    normed = [ll / max(1, len(c.encode())) for ll, c in zip(lls, doc["choices"], strict=True)]
    pick, pick_norm = (max(range(len(v)), key=v.__getitem__) for v in (lls, normed))
    return {"kind": "choice", "pick": pick, "acc": pick == doc["answer"], "acc_norm": pick_norm == doc["answer"],
            "loglikelihoods": lls}


def score_output(doc: dict[str, Any], output: str) -> dict[str, Any]:
    refs = doc["reference"] if isinstance(doc["reference"], list) else [doc["reference"]]
    metric = doc.get("metric", "exact_match")
    text = output.strip()
    if metric == "exact_match":
        hit = any(text.lower() == str(r).strip().lower() for r in refs)
    elif metric == "contains":
        hit = any(str(r).lower() in text.lower() for r in refs)
    else:
        hit = any(re.search(str(r), text) for r in refs)
    return {"kind": "generation", "output": output, "metric": metric, "correct": hit}


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    choice = [s for s in samples if s["kind"] == "choice"]
    gen = [s for s in samples if s["kind"] == "generation"]
    out: dict[str, Any] = {"n": len(samples)}
    if choice:
        out.update(acc=sum(s["acc"] for s in choice) / len(choice),
                   acc_norm=sum(s["acc_norm"] for s in choice) / len(choice))
    if gen:
        out["generation_accuracy"] = sum(s["correct"] for s in gen) / len(gen)
    return out
