"""MT-bench as FastChat's `llm_judge` scores it: the model under test answers each two-turn question (the
second turn sees the first answer), with FastChat's per-category temperatures; a judge model behind any
OpenAI-compatible endpoint (`gemmakit serve` included) grades each turn 1-10 with the single-answer prompts,
the reference-guided ones for math, reasoning and coding; ratings are parsed from "[[N]]" (else "[N]", else
the judgment counts as failed, -1, and is left out of the means). Scores: overall, first turn, second turn,
and per category.

The judge prompts below are FastChat's `single-v1`, `single-math-v1` and their `-multi-turn` forms
(data/judge_prompts.jsonl); give that file itself with `judge_prompts=` to use it verbatim.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from gemmakit.eval.data import read_records

TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
NEED_REF = ("math", "reasoning", "coding")
_RATE = ('After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly '
         'following this format: "[[rating]]", for example: "Rating: [[5]]".')
_JUDGE = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
          "to the user question{shown}. ")
_GENERAL = ("Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
            "creativity, and level of detail of the response. ")
_MATH = ("Your evaluation should consider correctness and helpfulness. You will be given a reference answer and "
         "the assistant's answer. ")
_SECOND = "You evaluation should focus on the assistant's answer to the second {q}. "
_CONV = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
         "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
         "<|The End of Assistant A's Conversation with User|>")
PROMPTS = {
    "single-v1": ("You are a helpful assistant.",
                  "[Instruction]\n" + _JUDGE.format(shown=" displayed below") + _GENERAL +
                  "Begin your evaluation by providing a short explanation. Be as objective as possible. " + _RATE +
                  "\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
                  "[The End of Assistant's Answer]"),
    "single-math-v1": ("You are a helpful assistant.",
                       "[Instruction]\n" + _JUDGE.format(shown=" displayed below") + _MATH +
                       "Begin your evaluation by comparing the assistant's answer with the reference answer. "
                       "Identify and correct any mistakes. Be as objective as possible. " + _RATE +
                       "\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n"
                       "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
                       "[The End of Assistant's Answer]"),
    "single-v1-multi-turn": (_JUDGE.format(shown=" displayed below") + _GENERAL + _SECOND.format(q="user question") +
                             "Begin your evaluation by providing a short explanation. Be as objective as possible. "
                             + _RATE + "\n\n", _CONV),
    "single-math-v1-multi-turn": (
        _JUDGE.format(shown="") + _MATH + _SECOND.format(q="question") + "Begin your evaluation by comparing the "
        "assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as "
        "possible. " + _RATE + "\n\n",
        "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
        "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
        + _CONV),
}
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+\.?\d*)\]")


def load(path: str | Path) -> list[dict[str, Any]]:
    questions = read_records(path)
    for q in questions:
        if not isinstance(q.get("turns"), list) or len(q["turns"]) < 2 or "category" not in q:
            raise ValueError(f"{path}: question {q.get('question_id', '?')} needs category and two turns")
    return questions


def load_prompts(path: str | Path | None) -> dict[str, tuple[str, str]]:
    if path is None:
        return PROMPTS
    return {r["name"]: (r["system_prompt"], r["prompt_template"]) for r in read_records(path)}


def judge_messages(q: dict[str, Any], answers: list[str], turn: int,
                   prompts: dict[str, tuple[str, str]] = PROMPTS) -> list[dict[str, str]]:
    """The judge's conversation for turn 1 or 2 of question q answered with `answers`."""
    ref = q["category"] in NEED_REF and q.get("reference")
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    system, template = prompts[name]
    fields = {"question": q["turns"][0], "answer": answers[0], "question_1": q["turns"][0],
              "question_2": q["turns"][1], "answer_1": answers[0], "answer_2": answers[1] if len(answers) > 1 else ""}
    if ref:
        fields.update(ref_answer_1=q["reference"][0], ref_answer_2=q["reference"][1] if len(q["reference"]) > 1
                      else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": template.format(**fields)}]


def parse_rating(judgment: str) -> float:
    found = _RATING.search(judgment) or _RATING_LOOSE.search(judgment)
    return float(found.group(1)) if found else -1.0


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    valid = [(s["category"], t, r) for s in samples for t, r in enumerate(s["ratings"], 1) if r >= 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731 - no rating at all: no score
    by_category: dict[str, list[float]] = defaultdict(list)
    for category, _, r in valid:
        by_category[category].append(r)
    return {"score": mean([r for *_, r in valid]), "score_turn1": mean([r for _, t, r in valid if t == 1]),
            "score_turn2": mean([r for _, t, r in valid if t == 2]),
            "categories": {k: mean(v) for k, v in sorted(by_category.items())},
            "judgments": 2 * len(samples), "failed_judgments": 2 * len(samples) - len(valid)}


def record(q: dict[str, Any], answers: list[str], judgments: list[str]) -> dict[str, Any]:
    return {"id": str(q.get("question_id")), "category": q["category"], "answers": answers,
            "judgments": judgments, "ratings": [parse_rating(j) for j in judgments]}
