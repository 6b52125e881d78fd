"""Speculative decoding and the prefix cache as users reach them: `gemmakit serve --draft` and
`--prefix-cache off` in subprocesses over a tiny checkpoint (word-level tokenizer), queried with the official
`openai` client, and `gemmakit generate --draft`. The checkpoint drafts for itself, so every draft is accepted:
greedy output must equal a server without a drafter, and /metrics must say 1.0. A prompt sharing a long
beginning with an earlier one reports `usage.prompt_tokens_details.cached_tokens` (0 with the cache off).
Run: .venv/bin/python -m pytest tests/test_serve_speculative.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import hf_model, running_server, tiny
from tests.media_models import word_tokenizer, words

SHARED = words(1, 70)  # 70 words + BOS: two full 32-token prefix-cache blocks


def save_checkpoint(path: Path, **changes: int) -> Path:
    hf_model(dataclasses.replace(tiny("gemma3"), **changes) if changes else tiny("gemma3")).save_pretrained(path)
    word_tokenizer().backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>"}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("spec") / "tiny-spec")


@contextlib.contextmanager
def serve(model: Path, *flags: str):
    out = model.parent / f"serve-{len(list(model.parent.glob('serve-*.log')))}.log"
    with running_server(["--model", str(model), "--context", "256", "--max-batch", "4", "--log-level", "info",
                         *flags], out) as url:
        yield url, out


@pytest.fixture(scope="module")
def drafted(checkpoint):
    """The checkpoint served with itself as the draft model (compile asked for: the drafter turns it off)."""
    with serve(checkpoint, "--draft", str(checkpoint), "--draft-tokens", "3", "--compile", "on") as got:
        yield got


@pytest.fixture(scope="module")
def plain(checkpoint):
    """The same checkpoint without a drafter and with the prefix cache off."""
    with serve(checkpoint, "--prefix-cache", "off") as got:
        yield got


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def complete(url: str, prompt: str, **kw):
    return client(url).completions.create(model="tiny-spec", prompt=prompt, max_tokens=16, temperature=0, **kw)


def test_drafted_greedy_completions_equal_plain_ones(drafted, plain):
    for prompt in (words(5, 6), words(300, 12) + " w5 w5"):
        a, b = complete(drafted[0], prompt), complete(plain[0], prompt)
        assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 16
    assert "--compile is off: speculative decoding" in drafted[1].read_text()


def test_a_shared_prefix_is_reported_as_cached_tokens(drafted, plain):
    """The second prompt starts like the first: OpenAI's usage.prompt_tokens_details.cached_tokens says how many
    prompt tokens came from the cache, in plain and streamed responses; 0 with --prefix-cache off."""
    for url in (drafted[0], plain[0]):
        first = complete(url, SHARED + " w900")
        assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = complete(drafted[0], SHARED + " w901 w902")
    assert second.usage.prompt_tokens_details.cached_tokens == 64
    chunks = list(complete(drafted[0], SHARED + " w903", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 64
    assert complete(plain[0], SHARED + " w901 w902").usage.prompt_tokens_details.cached_tokens == 0
    messages = [{"role": "user", "content": SHARED}]
    chat = [client(drafted[0]).chat.completions.create(model="tiny-spec", messages=messages, max_tokens=4,
                                                       temperature=0) for _ in range(2)]
    assert chat[1].usage.prompt_tokens_details.cached_tokens >= 64
    metrics = httpx.get(drafted[0] + "/metrics").text
    assert float(re.search(r"^gemmakit_prefix_cache_hit_tokens_total (\S+)", metrics, re.M)[1]) >= 64 * 3


def test_metrics_show_the_acceptance(drafted, plain):
    complete(drafted[0], words(40, 8))
    metrics = httpx.get(drafted[0] + "/metrics").text
    drafted_n = float(re.search(r"^gemmakit_speculative_drafted_tokens_total (\S+)", metrics, re.M)[1])
    accepted = float(re.search(r"^gemmakit_speculative_accepted_tokens_total (\S+)", metrics, re.M)[1])
    assert drafted_n > 0 and accepted == drafted_n
    assert re.search(r"^gemmakit_speculative_acceptance_rate 1\.0$", metrics, re.M)
    assert re.search(r"^gemmakit_speculative_drafted_tokens_total 0\.0$", httpx.get(plain[0] + "/metrics").text,
                     re.M)


def gemmakit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_generate_with_a_draft_prints_the_same_text(checkpoint):
    args = ("generate", words(7, 5), "--model", str(checkpoint), "--max-tokens", "12")
    plain, drafted = gemmakit(*args), gemmakit(*args, "--draft", str(checkpoint), "--verbose")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout
    assert re.search(r"speculative decoding: (\d+) of \1 drafted tokens accepted \(100%\)", drafted.stderr)


def test_a_bad_draft_is_one_clear_error(checkpoint, tmp_path):
    other = save_checkpoint(tmp_path / "other-vocab", vocab_size=512)
    (tmp_path / "notes.txt").write_text("not a model")
    cases = {str(tmp_path / "missing"): "no such file or directory",
             str(tmp_path / "notes.txt"): "neither a model directory nor a GGUF file",
             str(other): "vocabulary of 512 tokens"}
    for path, message in cases.items():
        out = gemmakit("generate", "w1 w2", "--model", str(checkpoint), "--max-tokens", "2", "--draft", path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("error: draft model") and message in out.stderr, out.stderr
