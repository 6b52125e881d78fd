"""GSM8K as lm-evaluation-harness's `gsm8k_cot` reports it: 8-shot chain of thought with Wei et al.'s
exemplars, greedy, generation cut at "Q:", and exact match of the final number under two extractions:

- strict: the number in "The answer is N." (the exemplars' own phrasing), first occurrence;
- flexible: the last number-like run in the output.

Both sides are normalised the harness's way before comparing: commas, dollar signs, everything up to "#### "
and a final period are removed, case ignored. The target is the text after "####" in the data set's answer.
Chat models can be evaluated the same way on the chat format (`--chat`): the question goes in as a user turn,
thoughts are removed from the answer before extraction.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gemmakit.eval.data import read_records

# Wei et al. (2022), "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models", appendix table 20.
EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
STOP = ("Q:", "</s>", "<|im_end|>")
STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]


def load(path: str | Path) -> list[dict[str, Any]]:
    docs = read_records(path)
    for i, d in enumerate(docs):
        if "question" not in d or "answer" not in d:
            raise ValueError(f"{path}: record {i + 1} lacks question/answer (GSM8K's fields)")
    return docs


def prompt(doc: dict[str, Any], shots: int = 8) -> str:
    blocks = [f"Q: {q}\nA: {a}" for q, a in EXEMPLARS[:shots]] + [f"Q: {doc['question']}\nA:"]
    return "\n\n".join(blocks)


def target(doc: dict[str, Any]) -> str:
    return str(doc["answer"]).split("####")[-1].strip()


def extract(output: str) -> dict[str, str]:
    """The strict and flexible answers in a model's output ("[invalid]" when none is found)."""
    strict = STRICT.search(output)
    flexible = [next(g for g in m if g) for m in FLEXIBLE.findall(output)]
    return {"strict": strict.group(1) if strict else "[invalid]", "flexible": flexible[-1] if flexible else "[invalid]"}


def normalise(text: str) -> str:
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def score(output: str, doc: dict[str, Any]) -> dict[str, Any]:
    answers = extract(output)
    gold = normalise(target(doc))
    return {"answers": answers, "target": target(doc),
            **{f"exact_match_{k}": normalise(v) == gold for k, v in answers.items()}}
