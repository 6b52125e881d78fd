"""HumanEval as openai/human-eval scores it: the model completes each function from its prompt (signature
and docstring) and the problem's `check(candidate)` test must pass, with one difference in how it runs.
human-eval runs `prompt + completion + test + check(entry_point)` as one program, which a completion can end
with a forged pass; here `prompt + completion` runs in one sandbox and the test in another, calling the entry
point through a pipe and alone deciding the verdict (eval/sandbox.py). pass@k is the unbiased estimator over
n samples per problem,

    pass@k = 1 - C(n - c, k) / C(n, k)   (= 1 when n - c < k),  averaged over problems,

computed as a product so that large n cannot overflow. Generation stops at the harness's stop sequences (a new
top-level statement ends the function). n = 1 with greedy decoding gives the usual pass@1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.eval.data import read_records
from gemmakit.eval.sandbox import Limits, check_function

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "test", "entry_point")
DEFAULT_LIMITS = Limits(timeout=3.0)  # human-eval's per-program timeout


def load(path: str | Path) -> list[dict[str, Any]]:
    problems = read_records(path)
    for p in problems:
        missing = [f for f in FIELDS if f not in p]
        if missing:
            raise ValueError(f"{path}: problem {p.get('task_id', '?')} lacks {missing} (HumanEval's fields)")
    return problems


def program(problem: dict[str, Any], completion: str) -> str:
    """The whole program as human-eval runs it, for reading; check() splits it between two boxes."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check(problem: dict[str, Any], completion: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Run the completed function in one box and the problem's test in another, which calls it through a pipe
    and alone decides the verdict (eval/sandbox.py): a completion cannot forge a pass."""
    outcome = check_function(problem["prompt"] + completion, problem["test"], problem["entry_point"],
                             setup=problem["prompt"], limits=limits)
    return {"passed": outcome.passed, "result": outcome.status}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of the chance that at least one of k samples (of n, c correct) passes."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def aggregate(samples: Sequence[dict[str, Any]], ks: Sequence[int] = (1, 10, 100)) -> dict[str, Any]:
    by_task: dict[str, list[bool]] = {}
    for s in samples:
        by_task.setdefault(s["task_id"], []).append(bool(s["passed"]))
    n_min = min(len(v) for v in by_task.values())
    out: dict[str, Any] = {"problems": len(by_task), "samples_per_problem": n_min}
    for k in ks:
        if k <= n_min:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in by_task.values()]))
    return out
