"""`POST /v1/embeddings` on a real `gemmakit serve --embedding-model DIR`, through the official openai client.

The chat model is a tiny random Gemma 3 checkpoint and the embedding model tests/test_embeddings.py's tiny
EmbeddingGemma; the vectors are checked against the in-process Embedder, which that module checks against
sentence-transformers.

Run: .venv/bin/python -m pytest -q tests/test_serve_embeddings.py
"""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import openai
import pytest

from gemmakit.embeddings import load_embedder
from tests.helpers import hf_model, running_server, tiny
from tests.test_embeddings import MAX_LEN, TEXTS, make_embedding_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, embedding model dir) of `gemmakit serve --model CHAT --embedding-model DIR`."""
    root = tmp_path_factory.mktemp("serve-embeddings")
    st = make_embedding_dir(root)
    chat = root / "chat"
    hf_model(tiny("gemma3")).save_pretrained(chat)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # ids < 300 fit the chat model's 1000 too
        shutil.copy(st / name, chat / name)
    args = ["--model", str(chat), "--embedding-model", str(st), "--context", "128", "--compile", "off",
            "--log-level", "warning"]
    with running_server(args, root / "serve.log") as url:
        yield url, st


@pytest.fixture(scope="module")
def embedder(served):
    return load_embedder(served[1])


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_float_base64_and_dimensions_match_the_embedder(served, embedder):
    """float and base64 (the client's default) carry the same vectors as Embedder.embed; dimensions truncates."""
    url, st = served
    c = client(url)
    got = c.embeddings.create(model="st", input=TEXTS, encoding_format="float")
    assert [d.index for d in got.data] == list(range(len(TEXTS))) and got.model == "st"
    want = embedder.embed(TEXTS).numpy()
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    tokens = sum(len(r) for r in embedder.tokenize(TEXTS))
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    short = c.embeddings.create(model="st", input=TEXTS[:2], dimensions=16)  # base64 on the wire
    np.testing.assert_allclose(np.array([d.embedding for d in short.data]),
                               embedder.embed(TEXTS[:2], dimensions=16).numpy(), atol=1e-5)
    one = c.embeddings.create(model="st", input=TEXTS[0], extra_body={"task": "query"})
    np.testing.assert_allclose(one.data[0].embedding, embedder.embed(TEXTS[:1], task="query")[0].numpy(), atol=1e-5)


def test_token_id_inputs_are_embedded_as_given(served, embedder):
    """input as one list of ids, or a list of them: the same vectors as those ids through embed_ids."""
    rows = embedder.tokenize(TEXTS[:2])
    c = client(served[0])
    many = c.embeddings.create(model="st", input=rows, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in many.data]), embedder.embed_ids(rows).numpy(),
                               atol=1e-5)
    one = c.embeddings.create(model="st", input=rows[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, many.data[0].embedding, atol=1e-6)


def test_models_lists_the_embedding_model(served):
    ids = [m.id for m in client(served[0]).models.list().data]
    assert ids == ["chat", "st"]


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"input": []}, "input", "non-empty"),
    ({"input": ["ok", ""]}, "input[1]", "empty string"),
    ({"input": ["ok", "word " * (4 * MAX_LEN)]}, "input[1]", f"at most {MAX_LEN} tokens"),
    ({"input": "ok", "dimensions": 0}, "dimensions", "from 1 to 48"),
    ({"input": "ok", "dimensions": 49}, "dimensions", "from 1 to 48"),
    ({"input": [[2, 5], [2, -1]]}, "input[1]", "token id -1"),
    ({"input": [[2, 300]]}, "input[0]", "token id 300"),
    ({"input": [[]]}, "input[0]", "non-empty list"),
    ({"input": ["a", 3]}, "input", "mixes"),
    ({"input": "ok", "task": "nope"}, "task", "unknown task"),
    ({"input": [[2, 5]], "task": "query"}, "task", "text inputs"),
    ({"input": "ok", "encoding_format": "int8"}, "encoding_format", ""),
])
def test_bad_requests_are_400s_naming_the_parameter(served, body, param, says):
    r = httpx.post(served[0] + "/v1/embeddings", json={"model": "st", **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_unknown_model_is_a_404(served):
    with pytest.raises(openai.NotFoundError, match="embedding model is 'st'"):
        client(served[0]).embeddings.create(model="other", input="x")


def test_serve_checks_the_embedding_flags_before_loading(tmp_path, capsys):
    """An embedding model given as both models, adapters for an embeddings-only server, or a non-embedding
    --embedding-model: one error line each."""
    from gemmakit.cli import main

    st = make_embedding_dir(tmp_path)
    assert main(["serve", "--model", str(st), "--embedding-model", str(st)]) == 2
    assert "give a chat model as --model" in capsys.readouterr().err
    assert main(["serve", "--model", str(st), "--adapter", f"a={tmp_path}"]) == 2
    assert main(["serve", "--embedding-model", str(tmp_path / "backbone" / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["serve", "--embedding-model", str(tmp_path / "plain")]) == 2
    assert "is not an embedding model" in capsys.readouterr().err


def test_an_embedding_model_as_the_model_is_served_alone(tmp_path):
    """`gemmakit serve --model EMBED_DIR`: no chat model is loaded; /health and /v1/models name the embedding
    model, /v1/embeddings answers, and the chat routes are 404s that say how to serve both."""
    st = make_embedding_dir(tmp_path)
    with running_server(["--model", str(st), "--log-level", "warning"], tmp_path / "serve.log") as url:
        assert httpx.get(url + "/health").json() == {"status": "ok", "model": "st"}
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["st"]
        got = c.embeddings.create(model="st", input=TEXTS[:2], encoding_format="float")
        np.testing.assert_allclose(np.array([d.embedding for d in got.data]),
                                   load_embedder(st).embed(TEXTS[:2]).numpy(), atol=1e-5)
        with pytest.raises(openai.NotFoundError, match="serves only an embedding model"):
            c.chat.completions.create(model="st", messages=[{"role": "user", "content": "hi"}])
