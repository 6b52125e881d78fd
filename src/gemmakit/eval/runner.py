"""`gemmakit eval`: run benchmark tasks on a model and keep every answer.

Each task reads its local data, builds its requests by its published protocol (mmlu.py, gsm8k.py,
humaneval.py, perplexity in this file, mtbench.py), asks the backend in batches, scores, and aggregates.
Every scored sample is appended to `out/samples/<task>.jsonl` as soon as its batch is done, keyed by the
sample's id: a killed run, started again with the same settings, skips what is already there (the settings
are checked against `out/run.json`, so answers from another model are never mixed in). The summary goes to
`out/results.json` (settings, library versions, metrics), written atomically, and report.py turns one or two
result files into a Markdown/HTML report with charts.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gemmakit.eval import custom, gsm8k, humaneval, mmlu, mtbench
from gemmakit.eval.backends import GenParams, OpenAIBackend
from gemmakit.eval.data import read_records
from gemmakit.files import write_text_atomic

TASKS = ("mmlu", "gsm8k", "humaneval", "perplexity", "mtbench", "custom")


@dataclass
class EvalConfig:
    task: str
    data: str
    out: str = "runs/eval"
    model: str | None = None  # local checkpoint (None: the embedded default) ...
    endpoint: str | None = None  # ... or an OpenAI-compatible base URL
    endpoint_model: str = "default"
    quantize: str = "none"
    adapter: str | None = None
    dtype: str = "auto"
    chat_format: str = "auto"
    chat: bool = False  # prompt through the chat format (instruction-tuned models) instead of raw text
    shots: int | None = None  # None: the protocol's (MMLU 5, GSM8K 8)
    limit: int | None = None  # the first N samples only
    batch_size: int = 8
    samples: int = 1  # HumanEval: completions per problem (pass@k needs k <= samples)
    temperature: float = 0.0
    max_tokens: int | None = None
    seed: int = 0
    judge_endpoint: str | None = None  # MT-bench
    judge_model: str = "default"
    judge_api_key: str | None = None
    judge_max_tokens: int = 2048  # FastChat's
    judge_prompts: str | None = None  # FastChat's judge_prompts.jsonl, to use it verbatim
    media_dir: str | None = None  # custom: where records' images / audio lie (None: the data file's folder)
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The settings a cached answer depends on (not where it is written, not how fast)."""
        skip = {"out", "batch_size", "limit", "judge_api_key"}
        if self.media_dir is None:  # runs started before --media-dir existed resume as they were
            skip.add("media_dir")
        return {k: v for k, v in asdict(self).items() if k not in skip}


class SampleCache:
    """out/samples/<task>.jsonl: one scored sample per line, appended batch by batch."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the half-written last line of a killed run
                    continue
                self.done[str(record["id"])] = record

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for r in records:
                self.done[str(r["id"])] = r
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()


def _batched(todo: list[Any], size: int, cache: SampleCache, work: Callable[[list[Any]], list[dict]],
             desc: str) -> None:
    bar = tqdm(total=len(todo), desc=desc, unit="sample", leave=False)
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        cache.add(work(chunk))
        bar.update(len(chunk))
    bar.close()


def _pending(items: list[tuple[str, Any]], cache: SampleCache) -> list[tuple[str, Any]]:
    return [(i, x) for i, x in items if i not in cache.done]


def run_mmlu(c: EvalConfig, backend: Any, cache: SampleCache) -> dict[str, Any]:
    dev, test = mmlu.load(c.data)
    items = [(f"{d['subject']}/{i}", d) for i, d in enumerate(test)][:c.limit]
    shots = 5 if c.shots is None else c.shots

    def work(chunk: list[tuple[str, dict]]) -> list[dict]:
        pairs = [r for _, d in chunk for r in mmlu.requests(d, dev, shots)]
        scores = backend.loglikelihood(pairs)
        out, at = [], 0
        for sample_id, d in chunk:
            lls = [s for s, _ in scores[at:at + len(d["choices"])]]
            at += len(d["choices"])
            pick = max(range(len(lls)), key=lls.__getitem__)
            out.append({"id": sample_id, "subject": d["subject"], "answer": d["answer"], "pick": pick,
                        "loglikelihoods": lls, "correct": pick == d["answer"]})
        return out

    _batched(_pending(items, cache), max(1, c.batch_size // 4), cache, work, "mmlu")
    return mmlu.aggregate([cache.done[i] for i, _ in items]) | {"shots": shots}


def run_gsm8k(c: EvalConfig, backend: Any, cache: SampleCache) -> dict[str, Any]:
    docs = gsm8k.load(c.data)
    items = [(str(d.get("id", i)), d) for i, d in enumerate(docs)][:c.limit]
    shots = 8 if c.shots is None else c.shots
    params = GenParams(c.max_tokens or 256, c.temperature, gsm8k.STOP, c.seed)

    def work(chunk: list[tuple[str, dict]]) -> list[dict]:
        if c.chat:
            outputs = backend.chat([[{"role": "user", "content": gsm8k.prompt(d, shots)}] for _, d in chunk], params)
        else:
            outputs = backend.generate([gsm8k.prompt(d, shots) for _, d in chunk], params)
        return [{"id": i, "question": d["question"], "output": o, **gsm8k.score(o, d)}
                for (i, d), o in zip(chunk, outputs, strict=True)]

    _batched(_pending(items, cache), c.batch_size, cache, work, "gsm8k")
    done = [cache.done[i] for i, _ in items]
    return {f"exact_match_{k}": sum(s[f"exact_match_{k}"] for s in done) / len(done) for k in ("strict", "flexible")
            } | {"n": len(done), "shots": shots}


def run_humaneval(c: EvalConfig, backend: Any, cache: SampleCache) -> dict[str, Any]:
    problems = humaneval.load(c.data)[:c.limit]
    items = [(f"{p['task_id']}#{k}", (p, k)) for p in problems for k in range(c.samples)]
    temperature = c.temperature if c.samples == 1 else (c.temperature or 0.8)
    params = GenParams(c.max_tokens or 512, temperature, humaneval.STOP, c.seed)

    def work(chunk: list[tuple[str, tuple]]) -> list[dict]:
        # Sampled completions are batched too, each with its own seed: a resumed run draws the same ones.
        seeds = None if c.samples == 1 else [c.seed + 1000 * k for _, (_, k) in chunk]
        outputs = backend.generate([p["prompt"] for _, (p, _) in chunk], params, seeds=seeds)
        programs = [(p, o) for (_, (p, _)), o in zip(chunk, outputs, strict=True)]
        with ThreadPoolExecutor(max_workers=4) as pool:  # each check is its own sandboxed process
            checks = list(pool.map(lambda a: humaneval.check(*a), programs))
        return [{"id": i, "task_id": p["task_id"], "completion": o, **r}
                for (i, (p, _)), o, r in zip(chunk, outputs, checks, strict=True)]

    _batched(_pending(items, cache), c.batch_size, cache, work, "humaneval")
    return humaneval.aggregate([cache.done[i] for i, _ in items])


def run_perplexity(c: EvalConfig, backend: Any, cache: SampleCache) -> dict[str, Any]:
    """Token perplexity, bits per byte and word perplexity of a text file (or JSONL "text" records)."""
    path = Path(c.data)
    texts = [path.read_text(encoding="utf-8")] if path.suffix == ".txt" else [r["text"] for r in read_records(path)]
    items = [(str(i), t) for i, t in enumerate(texts)][:c.limit]

    def work(chunk: list[tuple[str, str]]) -> list[dict]:
        scores = backend.loglikelihood_rolling([t for _, t in chunk])
        return [{"id": i, "loglikelihood": ll, "tokens": n, "bytes": len(t.encode()), "words": len(t.split())}
                for (i, t), (ll, n) in zip(chunk, scores, strict=True)]

    _batched(_pending(items, cache), 1, cache, work, "perplexity")
    done = [cache.done[i] for i, _ in items]
    ll, tokens = sum(d["loglikelihood"] for d in done), sum(d["tokens"] for d in done)
    return {"token_perplexity": math.exp(-ll / tokens), "bits_per_byte": -ll / sum(d["bytes"] for d in done) /
            math.log(2), "word_perplexity": math.exp(-ll / sum(d["words"] for d in done)), "tokens": tokens}


def run_mtbench(c: EvalConfig, backend: Any, cache: SampleCache) -> dict[str, Any]:
    if not c.judge_endpoint:
        raise ValueError("mtbench needs a judge: --judge-endpoint URL of an OpenAI-compatible server (e.g. "
                         "`gemmakit serve --model JUDGE`) and --judge-model")
    judge = OpenAIBackend(c.judge_endpoint, c.judge_model, c.judge_api_key)
    prompts = mtbench.load_prompts(c.judge_prompts)
    questions = mtbench.load(c.data)[:c.limit]
    items = [(str(q.get("question_id", i)), q) for i, q in enumerate(questions)]
    judging = GenParams(c.judge_max_tokens, 0.0, (), c.seed)

    def answer(chunk: list[tuple[str, dict]]) -> list[list[str]]:
        answers: list[list[str]] = [[] for _ in chunk]
        for turn in range(2):
            for temperature in sorted({mtbench.TEMPERATURE.get(q["category"], 0.7) for _, q in chunk}):
                rows = [j for j, (_, q) in enumerate(chunk) if mtbench.TEMPERATURE.get(q["category"], 0.7) ==
                        temperature]
                convs = [_conversation(chunk[j][1], answers[j], turn) for j in rows]
                params = GenParams(c.max_tokens or 1024, temperature, (), c.seed)
                for j, text in zip(rows, backend.chat(convs, params), strict=True):
                    answers[j].append(text)
        return answers

    def work(chunk: list[tuple[str, dict]]) -> list[dict]:
        answers = answer(chunk)
        asks = [mtbench.judge_messages(q, a, turn, prompts) for (_, q), a in zip(chunk, answers, strict=True)
                for turn in (1, 2)]
        with ThreadPoolExecutor(max_workers=4) as pool:  # concurrent requests: the server batches them
            verdicts = list(pool.map(lambda m: judge.chat([m], judging)[0], asks))
        return [mtbench.record(q, a, verdicts[2 * k:2 * k + 2]) | {"id": i}
                for k, ((i, q), a) in enumerate(zip(chunk, answers, strict=True))]

    _batched(_pending(items, cache), c.batch_size, cache, work, "mtbench")
    return mtbench.aggregate([cache.done[i] for i, _ in items])


def run_custom(c: EvalConfig, backend: Any, cache: SampleCache) -> dict[str, Any]:
    docs = [custom.check(d, i) for i, d in enumerate(read_records(c.data))]
    media = custom.resolve_media(docs, c.media_dir or Path(c.data).parent)
    kinds = {kind for found in media for kind, _ in found}
    if kinds and hasattr(backend, "check_media"):  # a text-only model refuses here, before any question
        backend.check_media(kinds, chat=c.chat)
    items = [(str(d.get("id", i)), (d, m)) for i, (d, m) in enumerate(zip(docs, media, strict=True))][:c.limit]

    def work(chunk: list[tuple[str, tuple]]) -> list[dict]:
        out = []
        for i, (d, found) in chunk:
            parts = [{"type": kind, "path": str(path)} for kind, path in found]
            names = {k: [n for kind, n in custom.media_names(d) if kind == k] for k in ("image", "audio")}
            shown = {k: v for k, v in (("images", names["image"]), ("audio", names["audio"])) if v}
            if "choices" in d:
                pairs = [(d["prompt"], f" {x}") for x in d["choices"]]
                scores = backend.loglikelihood(pairs, media=[parts] * len(pairs)) if parts else \
                    backend.loglikelihood(pairs)
                out.append({"id": i, **custom.score_choices(d, [ll for ll, _ in scores]), **shown})
                continue
            params = GenParams(int(d.get("max_tokens", c.max_tokens or 64)), c.temperature, tuple(d.get("stop", ())),
                               c.seed)
            if c.chat:
                content = [*parts, {"type": "text", "text": d["prompt"]}] if parts else d["prompt"]
                text = backend.chat([[{"role": "user", "content": content}]], params)[0]
            else:
                text = (backend.generate([d["prompt"]], params, media=[parts]) if parts else
                        backend.generate([d["prompt"]], params))[0]
            out.append({"id": i, **custom.score_output(d, text), **shown})
        return out

    _batched(_pending(items, cache), c.batch_size, cache, work, "custom")
    return custom.aggregate([cache.done[i] for i, _ in items])


def _conversation(q: dict[str, Any], answers: list[str], turn: int) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": q["turns"][0]}]
    if turn == 1:
        messages += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": q["turns"][1]}]
    return messages


RUNNERS: dict[str, Callable[[EvalConfig, Any, SampleCache], dict[str, Any]]] = {
    "mmlu": run_mmlu, "gsm8k": run_gsm8k, "humaneval": run_humaneval, "perplexity": run_perplexity,
    "mtbench": run_mtbench, "custom": run_custom}


def versions() -> dict[str, str]:
    import torch

    import gemmakit

    return {"gemmakit": gemmakit.__version__, "torch": torch.__version__, "python": platform.python_version()}


def check_run(out: Path, c: EvalConfig) -> None:
    """Refuse to mix answers of different settings in one output directory."""
    marker = out / "run.json"
    identity = c.identity()
    if marker.exists():
        before = json.loads(marker.read_text())
        if before != identity:
            changed = sorted(k for k in identity.keys() | before.keys() if identity.get(k) != before.get(k))
            raise ValueError(f"{out} holds answers from other settings ({', '.join(changed)} differ): choose "
                             "another --out, or delete it to start over")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(identity, indent=2))


def evaluate(c: EvalConfig, backend: Any) -> dict[str, Any]:
    if c.task not in RUNNERS:
        raise ValueError(f"unknown task {c.task!r}: choose one of {', '.join(RUNNERS)}")
    out = Path(c.out)
    check_run(out, c)
    metrics = RUNNERS[c.task](c, backend, SampleCache(out / "samples" / f"{c.task}.jsonl"))
    result = {"task": c.task, "model": getattr(backend, "name", c.model), "config": asdict(c), "versions": versions(),
              "metrics": metrics}
    result["config"].pop("judge_api_key", None)
    write_text_atomic(out / "results.json", json.dumps(result, indent=2, ensure_ascii=False))
    return result
