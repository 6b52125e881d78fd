"""Your own task, without code: one JSON object per line, in either of two shapes.

- Multiple choice: {"prompt": "...", "choices": ["...", "..."], "answer": 1}: each choice is scored as the
  log-likelihood of " " + choice after the prompt (answer: the index or the choice's text); metrics `acc` and
  `acc_norm` (log-likelihood per byte of the choice, lm-eval's length normalisation).
- Generation: {"prompt": "...", "reference": "..." or ["...", ...], "metric": "exact_match" | "contains" |
  "regex", "stop": ["\\n"], "max_tokens": 64}: the model writes greedily (through the chat format with --chat)
  and the output is compared to any of the references: exactly after trimming and lower-casing, by containment,
  or as a regular expression. The metric defaults to exact_match.
An "id" field names the sample (else its line number). Records of both shapes may be mixed.

Either shape may ask about an image or a clip: "image": "cats/1.jpg" (or "images": [...], "audio": "a.wav" or a
list), named relative to --media-dir (default: the task file's directory). The names are resolved before any
work and must stay inside that directory, as a task file may come from someone else: an absolute path, a `..`
or a symlink that leads out, and a missing file are each reported with the record's number, all at once. A
choice's context is then the raw prompt with the items' placeholders before it (how pretrained multimodal
Gemma is prompted); a generated answer is, with --chat, a chat message holding the items then the question,
and without it the same raw prompt as a choice's. A model that cannot read a kind the task holds is refused
before the first question, and results count the questions with images / audio.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

METRICS = ("exact_match", "contains", "regex")
MEDIA_FIELDS = (("image", "image"), ("images", "image"), ("audio", "audio"))  # (record field, media kind)


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
    for key, _ in MEDIA_FIELDS:
        value = doc.get(key)
        if value is not None and not (isinstance(value, str) or isinstance(value, list) and value and
                                      all(isinstance(v, str) for v in value)):
            raise ValueError(f"custom task record {index + 1}: '{key}' must be a file name (or a list of them) "
                             "relative to --media-dir")
    return doc


def media_names(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, name as written) of a record's images, then its audio."""
    out = []
    for key, kind in MEDIA_FIELDS:
        value = doc.get(key)
        out += [(kind, v) for v in ([] if value is None else [value] if isinstance(value, str) else value)]
    return out


def resolve_media(docs: list[dict[str, Any]], media_dir: str | Path) -> list[list[tuple[str, Path]]]:
    """Each record's media as (kind, real path inside `media_dir`); one error naming every bad record."""
    root = Path(media_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--media-dir {media_dir} is not a directory (give the folder the records' image "
                                "and audio names are relative to)")
    out, problems = [], []
    for index, doc in enumerate(docs):
        found = []
        for kind, name in media_names(doc):
            where = f"record {index + 1} (id {doc.get('id', index)})"
            real = (root / name).resolve()
            if Path(name).is_absolute():
                problems.append(f"{where}: {kind} {name!r} is an absolute path; name it relative to {root}")
            elif not real.is_relative_to(root):
                problems.append(f"{where}: {kind} {name!r} leads outside the media directory {root}; keep media "
                                "inside it (or point --media-dir at a folder that holds it)")
            elif not real.is_file():
                problems.append(f"{where}: {kind} {name!r} is not a file in {root}")
            else:
                found.append((kind, real))
        out.append(found)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{len(problems)} media reference(s) of the custom task cannot be used:\n  {shown}")
    return out


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
    for kind, key in (("images", "questions_with_images"), ("audio", "questions_with_audio")):
        if any(s.get(kind) for s in samples):
            out[key] = sum(bool(s.get(kind)) for s in samples)
    if choice:
        out.update(acc=sum(s["acc"] for s in choice) / len(choice),
                   acc_norm=sum(s["acc_norm"] for s in choice) / len(choice))
    if gen:
        out["generation_accuracy"] = sum(s["correct"] for s in gen) / len(gen)
    return out
