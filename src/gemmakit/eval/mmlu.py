"""MMLU as lm-evaluation-harness reports it (`mmlu` default task): 5-shot, the first five dev questions of the
same subject, the answer scored as the log-likelihood of " A" .. " D" after the prompt; accuracy per subject,
micro (over questions), macro (over subjects), and per category (stem, humanities, social sciences, other,
size-weighted as the harness's groups are).

    The following are multiple choice questions (with answers) about high school physics.

    <question>
    A. <choice>
    B. <choice>
    C. <choice>
    D. <choice>
    Answer: B

    ... (5 shots, blank lines between) ...

    <question>
    A. ...
    Answer:

Data: the original release (`data/dev/<subject>_dev.csv`, `data/test/<subject>_test.csv`, header-less rows
question, A, B, C, D, answer letter), or Hugging Face's `cais/mmlu` layout (`dev.*` and `test.*` files, JSONL
or parquet, with question / subject / choices / answer index), from a local directory.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from gemmakit.eval.data import files_under, read_records

LETTERS = "ABCD"
CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
CATEGORY_OF = {s: c for c, subjects in CATEGORIES.items() for s in subjects.split()}


def _doc(record: dict[str, Any], subject: str | None = None) -> dict[str, Any]:
    if "choices" in record:  # cais/mmlu
        answer = record["answer"]
        index = LETTERS.index(answer) if isinstance(answer, str) and answer in LETTERS else int(answer)
        return {"question": record["question"], "choices": list(record["choices"]), "answer": index,
                "subject": record.get("subject") or subject}
    choices = [record[k] for k in ("A", "B", "C", "D")]
    return {"question": record["question"], "choices": choices, "answer": LETTERS.index(record["answer"].strip()),
            "subject": subject}


def load(path: str | Path) -> tuple[dict[str, list[dict]], list[dict]]:
    """(dev questions by subject, test questions) from an MMLU directory in either published layout."""
    dev: dict[str, list[dict]] = defaultdict(list)
    test: list[dict] = []
    header = ["question", "A", "B", "C", "D", "answer"]
    for file in files_under(path, ("*_dev.csv", "*_test.csv", "dev*.jsonl", "dev*.parquet", "test*.jsonl",
                                   "test*.parquet")):
        name = file.name
        split = "dev" if name.startswith("dev") or name.endswith("_dev.csv") else "test"
        subject = name.rsplit("_", 1)[0] if name.endswith(".csv") else None
        records = read_records(file, header if name.endswith(".csv") else None)
        for record in records:
            doc = _doc(record, subject)
            if split == "dev":
                dev[doc["subject"]].append(doc)
            else:
                test.append(doc)
    if not test:
        raise ValueError(f"{path}: no MMLU test questions found (expected data/test/<subject>_test.csv or "
                         "test*.jsonl / test*.parquet)")
    return dict(dev), test


def question_text(doc: dict[str, Any]) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"], strict=True))
    return f"{doc['question'].strip()}{options}\nAnswer:"


def prompt(doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    subject = doc["subject"].replace("_", " ")
    blocks = [f"{question_text(s)} {LETTERS[s['answer']]}" for s in shots] + [question_text(doc)]
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" + "\n\n".join(blocks)


def requests(doc: dict[str, Any], dev: dict[str, list[dict]], shots: int = 5) -> list[tuple[str, str]]:
    text = prompt(doc, dev.get(doc["subject"], [])[:shots])
    return [(text, f" {letter}") for letter in LETTERS[:len(doc["choices"])]]


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples carry subject and correct (bool): accuracy micro / macro / by category / by subject."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        by_subject[s["subject"]].append(bool(s["correct"]))
    subjects = {k: sum(v) / len(v) for k, v in sorted(by_subject.items())}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for subject, hits in by_subject.items():
        by_category[CATEGORY_OF.get(subject, "other")] += hits
    return {"acc_micro": sum(s["correct"] for s in samples) / len(samples),
            "acc_macro": sum(subjects.values()) / len(subjects),
            "categories": {k: sum(v) / len(v) for k, v in sorted(by_category.items())},
            "subjects": subjects, "n": len(samples)}
