"""LoRA adapters per request through `gemmakit serve`, for real: the command in a subprocess with two --adapter
flags over a tiny checkpoint (word-level tokenizer, tests/media_models.py), the official `openai` client.
/v1/models lists the base and both adapters, concurrent requests on both adapters and the base answer what
each adapter merged alone answers, an unknown model is a 404, bad --adapter flags are one-line CLI errors.
Run: .venv/bin/python -m pytest tests/test_serve_adapters.py
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import gemmakit
from gemmakit.cli import main
from gemmakit.serve.metrics import Metrics
from gemmakit.serve.server import ServeOptions, Server
from tests.helpers import hf_model, running_server, tiny
from tests.media_models import word_tokenizer, words
from tests.test_adapters import ADAPTERS, make_adapter

BASE = "tiny-base"  # the checkpoint directory's name: the model id the server gives the base model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Gemma 3 checkpoint with a tokenizer, and the two adapters for it: (base dir, {name: dir})."""
    root = tmp_path_factory.mktemp("serve-adapters")
    base = root / BASE
    hf_model(tiny("gemma3")).save_pretrained(base)
    word_tokenizer().backend.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>"}))
    return base, {name: make_adapter(base, root / name, **spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def served(checkpoint):
    """`gemmakit serve` with both adapters (asked to compile, which adapters turn off): (url, process output)."""
    base, dirs = checkpoint
    out = base.parent / "serve.log"
    with running_server(["--model", str(base), "--context", "128", "--max-batch", "8", "--compile", "on",
                         "--adapter", f"a={dirs['a']}", "--adapter", f"b={dirs['b']}", "--log-level", "warning"],
                        out) as url:
        yield url, out


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_models_lists_the_base_and_both_adapters(served):
    url, out = served
    listed = client(url).models.list().data
    assert [m.id for m in listed] == [BASE, "a", "b"]
    assert [getattr(m, "parent", None) for m in listed] == [None, BASE, BASE]
    assert "note: --compile is off: LoRA adapters served per request" in out.read_text()


def test_concurrent_requests_on_both_adapters_answer_as_each_merged_adapter(served, checkpoint):
    url, _ = served
    base, dirs = checkpoint
    prompts = [words(10 + 7 * i, 3 + i) for i in range(2)]
    asks = [(model, p) for p in prompts for model in ("a", "b", BASE, "b")]  # 8: one batch of --max-batch 8

    def complete(ask: tuple[str, str]) -> openai.types.Completion:
        return client(url).completions.create(model=ask[0], prompt=ask[1], max_tokens=10, temperature=0)

    with ThreadPoolExecutor(len(asks)) as pool:  # all at once: rows on a, b and the base share decode steps
        replies = list(pool.map(complete, asks))
    chat = client(url).chat.completions.create(model="b", messages=[{"role": "user", "content": words(40, 4)}],
                                               max_tokens=10, temperature=0)
    merged = {name: gemmakit.load(base, adapter=dirs.get(name), context=128) for name in ("a", "b", None)}
    want = {(m, p): merged[None if m == BASE else m].generate(p, max_tokens=10, temperature=0) for m, p in set(asks)}
    for (model, prompt), reply in zip(asks, replies, strict=True):
        assert reply.model == model and reply.choices[0].text == want[model, prompt], (model, prompt)
    assert len({r.choices[0].text for r in replies}) == 6  # the adapters answer differently
    answer = merged["b"].chat([{"role": "user", "content": words(40, 4)}], max_tokens=10, temperature=0)
    assert chat.model == "b" and chat.choices[0].message.content == answer.content


def test_an_unknown_model_is_a_404_naming_what_is_served(served):
    url, _ = served
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="c", messages=[{"role": "user", "content": "w5"}], max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    assert "'c' does not exist" in e.value.message and "'a', 'b'" in e.value.message
    r = httpx.post(url + "/v1/completions", json={"model": "base-typo", "prompt": "w5", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_bad_adapter_flags_are_cli_errors(checkpoint, tmp_path, capsys):
    base, dirs = checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    for spec, says in ((str(dirs["a"]), "give NAME=DIR"), (f"a={tmp_path / 'missing'}", "no such directory"),
                       (f"a={empty}", "not a PEFT LoRA adapter (no adapter_config.json or"),
                       ("my model=x", "adapter name 'my model'")):
        assert main(["serve", "--model", str(base), "--adapter", spec]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --adapter") or err.startswith("error: adapter name"), err
        assert says in err, err
    assert main(["serve", "--model", str(base), "--adapter", f"a={dirs['a']}", "--adapter", f"a={dirs['b']}"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_an_adapter_named_like_the_base_model_is_refused(checkpoint):
    base, dirs = checkpoint
    llm = gemmakit.load(base, context=128)
    with pytest.raises(ValueError, match=f"adapter name '{BASE}' is the base model's own name"):
        Server(llm, ServeOptions(adapters={BASE: str(dirs["a"])}), Metrics())
