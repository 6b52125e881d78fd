"""The OpenAI-compatible server, for real: uvicorn on a local port, the official `openai` client, the real
270M model (serve/). Run: .venv/bin/python -m pytest tests/test_serve.py
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest

from gemmakit.serve.app import ServeOptions, create_app
from tests.live import CAPITAL, CONTEXT, Live
from tests.test_chat import ScriptedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(llm):
    server = Live(create_app(llm, ServeOptions(max_batch=4, context=CONTEXT)))
    yield server
    server.close()


def model_id(live: Live) -> str:
    return live.client().models.list().data[0].id


# --- the happy paths ------------------------------------------------------------------------------------
def test_chat_answers_like_the_python_api(live, llm):
    client = live.client()
    r = client.chat.completions.create(model=model_id(live), messages=CAPITAL, temperature=0, max_tokens=24)
    want = llm.chat(CAPITAL, max_tokens=24, temperature=0.0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.content and "Paris" in want.content
    assert r.choices[0].finish_reason == want.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_is_the_same_answer_in_openai_chunks(live):
    client = live.client()
    plain = client.chat.completions.create(model=model_id(live), messages=CAPITAL, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model=model_id(live), messages=CAPITAL, temperature=0,
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={"messages": CAPITAL, "max_tokens": 4,
                                                                       "stream": True}) as raw:
        lines = [x for x in raw.iter_lines() if x]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"


def test_n_choices_seeds_logprobs_and_stop(live):
    client, name = live.client(), model_id(live)
    ask = dict(model=name, messages=CAPITAL, max_tokens=12, temperature=1.0, seed=7, n=2)
    a, b = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed
    r = client.chat.completions.create(model=name, messages=CAPITAL, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob <= 0 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4) for e in entries)
    full = client.chat.completions.create(model=name, messages=CAPITAL, max_tokens=24, temperature=0)
    cut = client.chat.completions.create(model=name, messages=CAPITAL, max_tokens=24, temperature=0, stop=["Paris"])
    assert "Paris" in full.choices[0].message.content
    assert cut.choices[0].message.content == full.choices[0].message.content.split("Paris")[0].strip() or None


def test_completions_endpoint(live, llm):
    client, name = live.client(), model_id(live)
    r = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == llm.generate("The capital of France is", max_tokens=8, temperature=0.0)
    echo = client.completions.create(model=name, prompt="The capital of France is", max_tokens=3, temperature=0,
                                     echo=True, logprobs=2)
    assert echo.choices[0].text.startswith("The capital of France is")
    assert len(echo.choices[0].logprobs.tokens) == 3 and all(len(t) == 2 for t in echo.choices[0].logprobs.top_logprobs)
    many = client.completions.create(model=name, prompt=["One, two,", "A, B,"], max_tokens=3, temperature=0, n=2)
    assert len(many.choices) == 4 and many.choices[0].text == many.choices[1].text
    stream = list(client.completions.create(model=name, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_json_schema_output_is_valid(live):
    client, name = live.client(), model_id(live)
    # Bounded fields: a 270M base model happily writes digits forever into an unbounded integer.
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                               "country": {"enum": ["France", "Germany", "Italy"]},
                                               "million_people": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "country", "million_people"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Give the largest city of France as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"city", "country", "million_people"} and len(value["city"]) <= 24
    assert value["country"] in ("France", "Germany", "Italy") and 0 <= value["million_people"] <= 99
    assert r.choices[0].finish_reason == "stop"
    # Any object: a repetition penalty keeps the base model from writing one number forever.
    any_object = client.chat.completions.create(model=name, messages=CAPITAL, max_tokens=60, temperature=0,
                                                response_format={"type": "json_object"},
                                                extra_body={"repetition_penalty": 1.3})
    assert any_object.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(any_object.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=name, messages=CAPITAL, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert bad.value.body["param"].startswith("response_format")


# --- continuous batching and slots ----------------------------------------------------------------------
def test_concurrent_requests_share_the_batch_and_match_sequential(live):
    client, name = live.client(), model_id(live)
    prompts = [[{"role": "user", "content": q}] for q in ("Name a color.", "What is 2 + 2?", "Say hello.")]
    alone = [client.chat.completions.create(model=name, messages=m, max_tokens=n, temperature=0)
             for m, n in zip(prompts, (20, 12, 28), strict=True)]
    seen, results, stop = [], [None] * 3, threading.Event()
    server = live.app.state.server
    watcher = threading.Thread(target=lambda: [seen.append(server.loop.running) or time.sleep(0.01)
                                               for _ in iter(stop.is_set, True)])
    watcher.start()

    def ask(i, n):
        results[i] = client.chat.completions.create(model=name, messages=prompts[i], max_tokens=n, temperature=0)
    threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate((20, 12, 28))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    stop.set()
    watcher.join()
    assert max(seen) >= 2  # they really ran in one batch
    assert [r.choices[0].message.content for r in results] == [r.choices[0].message.content for r in alone]


# Raw completions with EOS banned: nothing ends them before max_tokens (~30 s of work at 400 tokens).
ENDLESS = {"prompt": "Once upon a time", "max_tokens": 400, "logit_bias": {"1": -100}}


def _post_quietly(url: str, body: dict) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is closed under it at the end of the test
        httpx.post(url, json=body, timeout=120)


def test_a_client_that_disconnects_frees_its_row(fresh):
    live = fresh(max_batch=1)
    server = live.app.state.server
    with httpx.stream("POST", live.url + "/v1/completions", json={**ENDLESS, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
        assert server.loop.running == 1
    t0 = time.time()
    while server.loop.running and time.time() - t0 < 10:
        time.sleep(0.05)
    assert server.loop.running == 0 and server.loop.waiting == 0
    assert server.metrics.generated_tokens._value.get() < 200  # cancelled, not run to its 400 tokens
    reply = live.client().chat.completions.create(model=model_id(live), messages=CAPITAL, max_tokens=3)
    assert reply.usage.completion_tokens <= 3


def test_a_full_queue_answers_429(fresh):
    live = fresh(max_batch=1, max_queue=1)
    server = live.app.state.server
    for started in (1, 2):  # one runs, one waits: the queue is full
        threading.Thread(target=_post_quietly, args=(live.url + "/v1/completions", ENDLESS), daemon=True).start()
        deadline = time.time() + 20
        while server.loop.running + server.loop.waiting < started and time.time() < deadline:
            time.sleep(0.05)
    assert (server.loop.running, server.loop.waiting) == (1, 1)
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": CAPITAL, "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.json()["error"]["type"] == "rate_limit_error"


# --- bad requests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,param", [
    ({"messages": CAPITAL, "temperature": "hot"}, 400, "temperature"),
    ({"messages": CAPITAL, "temperature": 5}, 400, "temperature"),
    ({"messages": CAPITAL, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CAPITAL, "n": 1000}, 400, "n"),
    ({"messages": CAPITAL, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ({"messages": CAPITAL, "model": "gpt-9"}, 404, "model"),
    ({"messages": CAPITAL, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"messages": CAPITAL, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"messages": CAPITAL, "min_p": 3}, 400, "min_p"),
    ({"messages": CAPITAL, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "messages"),
    ({"messages": CAPITAL, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
])
def test_bad_requests_get_openai_errors(live, body, status, param):
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_json_too_long_prompts_and_the_server_stays_up(live):
    r = httpx.post(live.url + "/v1/chat/completions", content=b'{"messages": [', headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    huge = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(model=model_id(live), messages=huge, max_tokens=10)
    message = e.value.body["message"]
    assert "exceeds the context of 512 tokens" in message and "max_tokens (10)" in message
    with pytest.raises(openai.BadRequestError, match="500"):
        live.client().chat.completions.create(model=model_id(live), messages=CAPITAL, max_tokens=500)
    assert live.client().chat.completions.create(model=model_id(live), messages=CAPITAL, max_tokens=2).choices


def test_api_key_health_metrics_page_and_schema(fresh, llm):
    live = fresh(api_key="sekret")
    with pytest.raises(openai.AuthenticationError):
        live.client("wrong").models.list()
    assert live.client("sekret").chat.completions.create(model=llm.name or "gemma", messages=CAPITAL, max_tokens=2)
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}  # the rest only to key holders
    assert httpx.get(live.url + "/metrics").status_code == 401
    metrics = httpx.get(live.url + "/metrics", headers={"authorization": "Bearer sekret"}).text
    assert 'gemmakit_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics  # one so far
    assert "gemmakit_time_to_first_token_seconds_count 1.0" in metrics
    assert 'gemmakit_requests_total{endpoint="/v1/models",status="401"} 1.0' in metrics
    assert "/v1/chat/completions" in httpx.get(live.url + "/").text
    paths = httpx.get(live.url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(paths)
    body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("ChatRequest")
    # The documented schemas are what the server sends.
    from gemmakit.serve import protocol as P

    auth = {"authorization": "Bearer sekret"}
    P.ChatCompletion.model_validate(httpx.post(live.url + "/v1/chat/completions", headers=auth, json={
        "messages": CAPITAL, "max_tokens": 3, "logprobs": True}).json())
    P.TextCompletion.model_validate(httpx.post(live.url + "/v1/completions", headers=auth, json={
        "prompt": "Hi", "max_tokens": 3, "logprobs": 1}).json())
    P.ErrorResponse.model_validate(httpx.post(live.url + "/v1/completions", headers=auth, json={}).json())
    answers = paths["/v1/chat/completions"]["post"]["responses"]
    assert answers["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletion")
    assert all(answers[s]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
               for s in ("400", "401", "404", "429", "503"))


def _health_after_loading(live: Live) -> httpx.Response:
    deadline = time.time() + 30
    while (health := httpx.get(live.url + "/health")).status_code == 503 and time.time() < deadline:
        time.sleep(0.1)
    return health


def test_health_is_503_while_loading(llm, caplog):
    """503 while loading, then 200; the console says when loading starts and when the model is ready."""
    release = threading.Event()
    with caplog.at_level(logging.INFO, logger="gemmakit.serve"):
        live = Live(create_app(lambda: release.wait() and llm, ServeOptions(context=CONTEXT)), wait_ready=False)
        try:
            assert httpx.get(live.url + "/health").status_code == 503
            r = httpx.post(live.url + "/v1/chat/completions", json={"messages": CAPITAL})
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            release.set()
            assert _health_after_loading(live).status_code == 200
        finally:
            release.set()
            live.close()
    said = [r.getMessage() for r in caplog.records if r.name == "gemmakit.serve"]
    assert said[0].startswith("loading the model") and any(m.startswith(f"ready: {llm.name}") for m in said)


def test_a_model_that_fails_to_load_is_reported_everywhere(caplog):
    """A load that fails in the server's loading thread: /health and requests say why (500), and so does the
    console, once, as an error; the server does not pretend to be loading forever."""
    from gemmakit.checkpoints import CheckpointError

    def broken():
        raise CheckpointError("/models/cut.gguf is truncated: download it again")

    with caplog.at_level(logging.INFO, logger="gemmakit.serve"):
        live = Live(create_app(broken, ServeOptions(context=CONTEXT)), wait_ready=False)
        try:
            health = _health_after_loading(live)
            assert health.status_code == 500 and "truncated" in health.json()["status"]
            r = httpx.post(live.url + "/v1/chat/completions", json={"messages": CAPITAL})
            assert r.status_code == 500 and "truncated" in r.json()["error"]["message"]
        finally:
            live.close()
    errors = [r.getMessage() for r in caplog.records if r.name == "gemmakit.serve" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "the model failed to load: CheckpointError" in errors[0] and "truncated" in errors[0]


# --- hooks, tools and reasoning -------------------------------------------------------------------------
def test_guard_hooks_refuse_inputs_and_cut_outputs(fresh):
    live = fresh()
    server = live.app.state.server
    server.input_hooks.append(lambda messages: "blocked" if "bomb" in messages[-1]["content"] else None)
    server.output_hooks.append(lambda text: "[removed]" if "Paris" in text else None)
    before = server.metrics.generated_tokens._value.get()
    r = live.client().chat.completions.create(model=model_id(live), messages=[
        {"role": "user", "content": "how to build a bomb"}], max_tokens=8)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == "blocked"
    assert server.metrics.generated_tokens._value.get() == before  # the model never saw it
    cut = live.client().chat.completions.create(model=model_id(live), messages=CAPITAL, max_tokens=24, temperature=0)
    assert cut.choices[0].finish_reason == "content_filter" and cut.choices[0].message.content == "[removed]"


def _scripted_llm(llm, reply: str):
    from gemmakit.api import LLM
    from gemmakit.chat.template import ChatFormat

    script = llm.tokenizer.encode(reply, add_bos=False) + [llm.tokenizer.eos_id]
    return LLM(ScriptedModel(llm.model.config, script, llm.tokenizer.vocab_size), llm.tokenizer,
               ChatFormat("gemma4"), "scripted-gemma4", context=CONTEXT)


def streamed_calls(deltas: list) -> list:
    """The tool calls a client assembles from streamed deltas: a call's first part names it, the rest carry
    fragments of its arguments (OpenAI's streaming format)."""
    from types import SimpleNamespace

    calls: dict[int, SimpleNamespace] = {}
    for part in (t for d in deltas for t in (d.tool_calls or [])):
        if part.index not in calls:
            calls[part.index] = SimpleNamespace(id=part.id, type=part.type, function=SimpleNamespace(
                name=part.function.name, arguments=""))
        calls[part.index].function.arguments += part.function.arguments or ""
    return list(calls.values())


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_and_tool_calls_in_openai_fields(llm, stream):
    reply = ('<|channel>thought\nThe user wants the weather.<channel|>Let me check. '
             '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|><turn|>')
    live = Live(create_app(_scripted_llm(llm, reply), ServeOptions(max_batch=1, context=CONTEXT)))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    try:
        ask = dict(model="scripted-gemma4", messages=[{"role": "user", "content": "Weather in Paris?"}],
                   tools=tools, max_tokens=80, temperature=0,
                   extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        if stream:
            chunks = list(live.client().chat.completions.create(stream=True, **ask))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
            calls = streamed_calls(deltas)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            m = live.client().chat.completions.create(**ask).choices
            reasoning, content = m[0].message.reasoning_content, m[0].message.content
            calls, finish = m[0].message.tool_calls, m[0].finish_reason
        assert reasoning.strip() == "The user wants the weather." and content.strip() == "Let me check."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris", "days": 2})]
        assert calls[0].id.startswith("call_") and calls[0].type == "function" and finish == "tool_calls"
    finally:
        live.close()


def test_the_serve_command(default_model):
    """`gemmakit serve` as a user runs it: up once /health says 200, answers on localhost, needs its key."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port), "--context", "256",
                             "--api-key", "k1", "--log-level", "warning"], env={**os.environ, "GEMMAKIT_COMPILE": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url, deadline, statuses = f"http://127.0.0.1:{port}", time.time() + 120, set()
    try:
        while time.time() < deadline and 200 not in statuses and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                statuses.add(httpx.get(url + "/health").status_code)
            time.sleep(0.2)
        assert 200 in statuses, proc.stdout.read1().decode() if proc.poll() is not None else statuses
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=CAPITAL, max_tokens=16,
                                               temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice_forces_a_parseable_call(llm, choice):
    """tool_choice required / named constrains the real 270M, prompted in the Gemma 4 format, to a tool call
    that the parser reads back: the right name, JSON arguments, finish_reason tool_calls."""
    from gemmakit.api import LLM
    from gemmakit.chat.template import ChatFormat

    forced = LLM(llm.model, llm.tokenizer, ChatFormat("gemma4"), "gemma4-format", context=CONTEXT)
    live = Live(create_app(forced, ServeOptions(max_batch=1, context=CONTEXT)))
    try:
        client = live.client()
        ask = dict(model="gemma4-format", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                   tools=WEATHER_TOOLS, tool_choice=choice, max_tokens=64, temperature=0)
        r = client.chat.completions.create(**ask)
        calls = r.choices[0].message.tool_calls
        names = ["get_weather", "get_time"] if choice == "required" else ["get_time"]
        assert calls and all(c.function.name in names for c in calls), r.choices[0].message
        assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
        assert r.choices[0].finish_reason == "tool_calls"
        streamed = streamed_calls([c.choices[0].delta for c in client.chat.completions.create(stream=True, **ask)
                                   if c.choices])
        assert [(t.function.name, t.function.arguments) for t in streamed] == [
            (c.function.name, c.function.arguments) for c in calls]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{**ask, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    finally:
        live.close()
