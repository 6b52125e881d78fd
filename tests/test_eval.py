"""The evaluation harness: each task's protocol on small fixtures written in the published formats (the exact
prompt text, BOS once, answer extraction, pass@k), the scorer's log-likelihoods against a plain forward pass,
resumable runs, reports, and a real run of the 270M on every fixture.
Run: .venv/bin/python -m pytest tests/test_eval.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gemmakit.eval import gsm8k, humaneval, mmlu
from gemmakit.eval.backends import LocalBackend, encode_pair
from gemmakit.eval.runner import EvalConfig, evaluate

FIX = Path(__file__).parent / "fixtures" / "eval"


# --- protocols -----------------------------------------------------------------------------------
def test_mmlu_prompt_is_the_harness_text():
    dev, test = mmlu.load(FIX / "mmlu")
    doc = next(d for d in test if d["question"].startswith("Which planet is known"))
    pairs = mmlu.requests(doc, dev)
    assert [x for _, x in pairs] == [" A", " B", " C", " D"]
    text = pairs[0][0]
    assert text.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n"
                           "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\n"
                           "Answer: B\n\nWhat is the Moon?\n")
    assert text.endswith("Answer: C\n\nWhich planet is known as the Red Planet?\nA. Mars\nB. Venus\n"
                         "C. Jupiter\nD. Mercury\nAnswer:")
    assert text.count("Answer:") == 6  # five shots, then the question


def test_mmlu_aggregates_micro_macro_and_categories():
    samples = [{"subject": "astronomy", "correct": c} for c in (True, True, False)] + \
              [{"subject": "philosophy", "correct": False}]
    out = mmlu.aggregate(samples)
    assert out["acc_micro"] == 0.5 and out["acc_macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["categories"] == {"humanities": 0.0, "stem": pytest.approx(2 / 3)}


def test_gsm8k_prompt_and_extraction():
    doc = gsm8k.load(FIX / "gsm8k_test.jsonl")[3]
    text = gsm8k.prompt(doc)
    assert text.startswith("Q: There are 15 trees in the grove.") and text.count("Q: ") == 9
    assert text.endswith("The answer is 8.\n\nQ: A farm has 1,200 chickens and sells 200. How many chickens are "
                         "left?\nA:")
    assert gsm8k.target(doc) == "1,000"
    cases = {
        " 1,200 - 200 = 1,000. The answer is 1,000.": (True, True),
        " So it costs $1,000.00 in total.": (False, False),  # flexible takes "$1,000.00": not 1000
        " First 1200 - 200 = 1000 chickens.\n": (False, True),  # no "The answer is": strict fails
        " The answer is 999. Wait, 1000": (False, True),
        " I do not know.": (False, False),
    }
    for output, (strict, flexible) in cases.items():
        scored = gsm8k.score(output, doc)
        assert (scored["exact_match_strict"], scored["exact_match_flexible"]) == (strict, flexible), output
    assert gsm8k.extract("no numbers")["strict"] == "[invalid]"


def test_pass_at_k_equals_its_closed_form():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (20, 20, 10), (200, 13, 100), (5, 4, 2)]:
        closed = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
    samples = [{"task_id": "a", "passed": p} for p in (True, False, False, False)] + \
              [{"task_id": "b", "passed": p} for p in (True, True, False, True)]
    out = humaneval.aggregate(samples, ks=(1, 2, 10))
    assert out["pass@1"] == pytest.approx((0.25 + 0.75) / 2) and "pass@10" not in out


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    problems = humaneval.load(FIX / "HumanEval_fixture.jsonl.gz")
    assert len(problems) == 4
    for p in problems:
        assert humaneval.check(p, p["canonical_solution"])["passed"], p["task_id"]
    add, pal, fib, vowels = problems
    assert not humaneval.check(add, "    return a - b\n")["passed"]
    assert humaneval.check(pal, "    return text[::-1]\n")["result"].startswith("failed")
    slow = humaneval.check(fib, "    while True:\n        pass\n")
    assert slow == {"passed": False, "result": "timed out"}
    assert humaneval.check(vowels, "    return len(\n")["result"].startswith("failed: SyntaxError")


def test_custom_tasks_score_choices_and_generations():
    from gemmakit.eval import custom

    doc = custom.check({"prompt": "Q", "choices": ["a", "bbbbbbbb"], "answer": "bbbbbbbb"}, 0)
    assert doc["answer"] == 1
    scored = custom.score_choices(doc, [-2.0, -4.0])  # a wins raw, the long choice wins per byte
    assert (scored["acc"], scored["acc_norm"]) == (False, True)
    gen = {"prompt": "Q", "reference": ["Paris", "paris, france"]}
    assert custom.score_output(gen, " paris ")["correct"] and not custom.score_output(gen, "Lyon")["correct"]
    assert custom.score_output({**gen, "metric": "contains"}, "It is Paris.")["correct"]
    assert custom.score_output({"prompt": "Q", "reference": r"^\d+$", "metric": "regex"}, " 42 ")["correct"]
    for bad, why in (({"choices": ["a", "b"]}, "string 'prompt'"), ({"prompt": "Q", "choices": ["a"]}, r"2\+"),
                     ({"prompt": "Q"}, "give 'choices'"), ({"prompt": "Q", "reference": "x", "metric": "bleu"},
                                                           "metric must be")):
        with pytest.raises(ValueError, match=why):
            custom.check(bad, 0)


# --- the scorer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(default_model):
    import gemmakit

    return gemmakit.load(default_model)


def test_bos_once_and_the_harness_pair_encoding(llm):
    ctx, cont = encode_pair(llm.tokenizer, "Question: 2+2=\nAnswer: ", "4")
    assert ctx[0] == llm.tokenizer.bos_id and llm.tokenizer.bos_id not in ctx[1:] + cont
    assert llm.tokenizer.decode(cont) == " 4"  # the trailing space moves to the continuation


def test_loglikelihoods_equal_a_plain_forward_pass(llm):
    backend = LocalBackend(llm, batch_size=3)
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " a city in Europe"),
             ("1, 2, 3,", " 4"), ("Once upon a time", " there was")]
    got = backend.loglikelihood(pairs)
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        ctx, cont = encode_pair(llm.tokenizer, context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(llm.model(ids).float()[0, len(ctx) - 1:-1], -1)
        want = logp.gather(1, torch.tensor(cont)[:, None]).sum()
        assert ll == pytest.approx(float(want), abs=2e-3)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    assert got[0][0] > got[1][0] + 5  # " Paris" is far likelier than a vague continuation
    rolling = backend.loglikelihood_rolling(["The Sun is a star."])
    ids = llm.tokenizer.encode("The Sun is a star.")
    assert rolling[0][1] == len(ids) - 1
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(torch.tensor([ids])).float()[0, :-1], -1)
    assert rolling[0][0] == pytest.approx(float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum()), abs=2e-3)


# --- runs ----------------------------------------------------------------------------------------
class Counting(LocalBackend):
    calls = 0

    def generate(self, prompts, params):
        Counting.calls += len(prompts)
        return super().generate(prompts, params)


def test_a_killed_run_resumes_where_it_stopped(llm, tmp_path):
    backend = Counting(llm, batch_size=2)
    config = EvalConfig(task="gsm8k", data=str(FIX / "gsm8k_test.jsonl"), out=str(tmp_path / "run"), limit=2,
                        max_tokens=16)
    evaluate(config, backend)
    assert Counting.calls == 2
    lines = (tmp_path / "run" / "samples" / "gsm8k.jsonl").read_text().splitlines()
    (tmp_path / "run" / "samples" / "gsm8k.jsonl").write_text("\n".join(lines) + '\n{"id": "2", "trunc')
    config.limit = None  # the rest of the data set, as a restarted full run
    result = evaluate(config, backend)
    assert Counting.calls == 4 and result["metrics"]["n"] == 4  # two new answers, two from the cache
    config.max_tokens = 32
    with pytest.raises(ValueError, match="other settings \\(max_tokens differ\\)"):
        evaluate(config, backend)


class Recording(LocalBackend):
    def generate(self, prompts, params, seeds=None):
        self.calls = [*getattr(self, "calls", []), (len(prompts), seeds, params.temperature)]
        return super().generate(prompts, params, seeds)


def test_sampled_humaneval_runs_in_batches_with_a_seed_per_sample(llm, tmp_path):
    """n > 1 completions per problem go to the engine together, each with the seed of its (problem, k), so
    the batch a sample lands in (say after a resume) does not pick its seed."""
    backend = Recording(llm, batch_size=4)
    config = EvalConfig(task="humaneval", data=str(FIX / "HumanEval_fixture.jsonl.gz"), out=str(tmp_path / "run"),
                        limit=2, samples=2, max_tokens=8, seed=5)
    result = evaluate(config, backend)
    assert backend.calls == [(4, [5, 1005, 5, 1005], 0.8)]
    metrics = result["metrics"]
    assert metrics["problems"] == 2 and metrics["samples_per_problem"] == 2 and 0 <= metrics["pass@1"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("task,data", [("mmlu", "mmlu"), ("gsm8k", "gsm8k_test.jsonl"),
                                       ("humaneval", "HumanEval_fixture.jsonl.gz"), ("perplexity", "perplexity.txt"),
                                       ("custom", "custom_task.jsonl")])
def test_the_270m_runs_every_task_end_to_end(task, data, tmp_path):
    import subprocess
    import sys

    out = tmp_path / task
    done = subprocess.run([sys.executable, "-m", "gemmakit.cli", "eval", task, "--data", str(FIX / data), "--out",
                           str(out), "--max-tokens", "96"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["task"] == task and result["versions"]["torch"]
    assert (out / "report" / "report.md").read_text().startswith(f"# {task} results")
    assert (out / "report" / "chart.png").read_bytes()[:4] == b"\x89PNG"
    metrics = result["metrics"]
    expected = {"mmlu": "acc_micro", "gsm8k": "exact_match_flexible", "humaneval": "pass@1",
                "perplexity": "token_perplexity", "custom": "acc"}[task]
    assert isinstance(metrics[expected], float)
    samples = (out / "samples" / f"{task}.jsonl").read_text().splitlines()
    assert len(samples) == {"mmlu": 7, "gsm8k": 4, "humaneval": 4, "perplexity": 1, "custom": 4}[task]


def test_reports_put_two_runs_side_by_side(tmp_path):
    from gemmakit.eval.report import write_report

    files = []
    for name, acc in (("base", 0.25), ("tuned", 0.5)):
        result = {"task": "mmlu", "model": name, "config": {"model": name, "quantize": "none"}, "versions": {},
                  "metrics": {"acc_micro": acc, "acc_macro": acc, "categories": {"stem": acc},
                              "subjects": {"astronomy": acc}, "n": 4}}
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result))
    write_report(files, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| acc_micro | 0.2500 | 0.5000 |" in text and "| metric | base | tuned |" in text
    assert "<table>" in (tmp_path / "report" / "report.html").read_text()
    assert (tmp_path / "report" / "chart.png").stat().st_size > 5000


# --- MT-bench ------------------------------------------------------------------------------------
def test_mtbench_judge_prompts_and_ratings():
    from gemmakit.eval import mtbench

    writing, math_q = mtbench.load(FIX / "mt_bench_question.jsonl")[:2]
    system, user = (m["content"] for m in mtbench.judge_messages(writing, ["Dear Sam, ...", "P..."], 1))
    assert system == "You are a helpful assistant."
    assert user.startswith("[Instruction]\nPlease act as an impartial judge and evaluate the quality of the "
                           "response provided by an AI assistant to the user question displayed below. Your "
                           "evaluation should consider factors such as the helpfulness, relevance, accuracy, "
                           "depth, creativity, and level of detail of the response. Begin your evaluation by "
                           "providing a short explanation. Be as objective as possible. After providing your "
                           "explanation, you must rate the response on a scale of 1 to 10 by strictly following "
                           'this format: "[[rating]]", for example: "Rating: [[5]]".\n\n[Question]\nWrite a '
                           "two-sentence postcard")
    assert user.endswith("[The Start of Assistant's Answer]\nDear Sam, ...\n[The End of Assistant's Answer]")
    system, user = (m["content"] for m in mtbench.judge_messages(math_q, ["84", "21"], 2))
    assert "focus on the assistant's answer to the second question" in system
    assert "### Reference answer:\n84 divided by 4 is 21." in user and "### Assistant A:\n21\n\n" in user
    assert [mtbench.parse_rating(t) for t in ("Good. Rating: [[8]]", "[[7.5]]", "score [6]", "great!")] == \
        [8.0, 7.5, 6.0, -1.0]
    out = mtbench.aggregate([{"category": "math", "ratings": [8.0, -1.0]}, {"category": "writing",
                                                                           "ratings": [4.0, 6.0]}])
    assert out["score"] == 6.0 and out["score_turn2"] == 6.0 and out["failed_judgments"] == 1
    assert out["categories"] == {"math": 8.0, "writing": 5.0}


@pytest.mark.slow
def test_mtbench_with_gemmakit_serving_the_judge(default_model, tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port), "--context",
                              "2048", "--compile", "off", "--served-model-name", "judge", "--log-level", "warning"],
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:  # noqa: S310
                    break
            except OSError:
                time.sleep(0.5)
        out = tmp_path / "mt"
        done = subprocess.run([sys.executable, "-m", "gemmakit.cli", "eval", "mtbench", "--data",
                               str(FIX / "mt_bench_question.jsonl"), "--out", str(out), "--max-tokens", "48",
                               "--judge-endpoint", f"http://127.0.0.1:{port}/v1", "--judge-model", "judge",
                               "--judge-max-tokens", "48"], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        judge.terminate()
        judge.wait(timeout=30)
    samples = [json.loads(line) for line in (out / "samples" / "mtbench.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["answers"]) == 2 and len(s["judgments"]) == 2 for s in samples)
    assert all(s["judgments"][0] and s["answers"][1] for s in samples)  # every turn answered and judged
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["judgments"] == 8 and 0 <= metrics["failed_judgments"] <= 8
    assert (out / "report" / "report.md").is_file()


# --- lm-evaluation-harness -----------------------------------------------------------------------
def test_lm_eval_runs_a_task_with_gemmakits_loglikelihoods(default_model, tmp_path, monkeypatch):
    """A harness task (multiple choice over a local JSONL) on a tiny random Gemma 3 with the real tokenizer:
    the harness's per-sample log-likelihoods are gemmakit's scorer's."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the local json loader only; nothing from the hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import dataclasses

    import lm_eval
    from lm_eval.tasks import TaskManager

    from gemmakit.api import load
    from gemmakit.checkpoints.export import export_hf
    from gemmakit.config import default_layer_types
    from gemmakit.eval.lm_eval_model import GemmakitLM
    from gemmakit.model import Gemma
    from gemmakit.tokenizer import Tokenizer
    from tests.helpers import tiny

    torch.manual_seed(0)
    config = dataclasses.replace(tiny("gemma3"), vocab_size=262144, num_hidden_layers=2,
                                 layer_types=default_layer_types(2, period=2), max_position_embeddings=512)
    model = Gemma(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    export_hf(model, tmp_path / "tiny", Tokenizer.from_gguf(default_model))
    llm = load(tmp_path / "tiny")
    tasks = FIX / "lm_eval"
    monkeypatch.chdir(tasks)  # the task's data_files path is relative to it
    result = lm_eval.simple_evaluate(model=GemmakitLM(llm=llm, batch_size=2), tasks=["gemmakit_capitals"],
                                     task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    samples = result["samples"]["gemmakit_capitals"]
    assert len(samples) == 3 and "acc,none" in result["results"]["gemmakit_capitals"]
    ours = LocalBackend(llm, batch_size=8)
    for s in samples:
        pairs = [tuple(a) for a in s["arguments"]]
        harness = [r[0] for r in s["resps"]]
        assert [x for _, x in pairs][:1] == [" " + s["doc"]["choices"][0]]
        for (ll, greedy), (want, want_greedy) in zip(harness, ours.loglikelihood(pairs), strict=True):
            assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_mmlu_reads_the_hub_layout_as_parquet_or_jsonl(tmp_path):
    """cais/mmlu's dev/test files (question, subject, choices, answer index) load like the original CSVs."""
    dev_csv, test_csv = mmlu.load(FIX / "mmlu")
    rows = lambda docs: [{"question": d["question"], "subject": d["subject"], "choices": d["choices"],  # noqa: E731
                          "answer": d["answer"]} for d in docs]
    (tmp_path / "jsonl").mkdir()
    for split, docs in (("dev", [d for v in dev_csv.values() for d in v]), ("test", test_csv)):
        (tmp_path / "jsonl" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(docs)))
    dev_j, test_j = mmlu.load(tmp_path / "jsonl")
    assert sorted(map(str, test_j)) == sorted(map(str, test_csv)) and dev_j.keys() == dev_csv.keys()
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    (tmp_path / "parquet").mkdir()
    pq.write_table(pyarrow.Table.from_pylist(rows(test_csv)), tmp_path / "parquet" / "test-00000-of-00001.parquet")
    pq.write_table(pyarrow.Table.from_pylist(rows([d for v in dev_csv.values() for d in v])),
                   tmp_path / "parquet" / "dev-00000-of-00001.parquet")
    dev_p, test_p = mmlu.load(tmp_path / "parquet")
    assert sorted(map(str, test_p)) == sorted(map(str, test_csv))
    doc = test_p[0]
    assert mmlu.requests(doc, dev_p) == mmlu.requests(doc, dev_csv)
