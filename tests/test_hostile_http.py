"""Hostile clients at the HTTP layer, against the real server (uvicorn, the embedded 270M): oversized bodies,
requests for more sequences than the server queues, clients that leave while tokens flow, auth under a mount
prefix, metrics that random paths cannot grow, and chat templates made to run long or large by their input.
After each, the server still answers a normal request from another client, and /health is 200.
Run: .venv/bin/python -m pytest tests/test_hostile_http.py
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time

import httpx
import openai
import pytest
from fastapi import FastAPI

from gemmakit.chat import jinja
from gemmakit.serve.app import ServeOptions, create_app
from tests.live import CAPITAL, CONTEXT, Live
from tests.test_hostile import assert_still_serving
from tests.test_serve import ENDLESS

KEY = "hostile-test-key"


@pytest.fixture(scope="module")
def live(llm):
    server = Live(create_app(llm, ServeOptions(max_batch=2, max_queue=8, context=CONTEXT,
                                               max_body_bytes=1 << 20)))
    yield server
    server.close()


@pytest.mark.slow
def test_an_oversized_body_is_a_413_by_length_and_while_it_streams(live):
    big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = httpx.post(live.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413  # refused by its declared length, before a byte is read (Starlette's plain text)

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'
    r = httpx.post(live.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "larger than this server takes (1048576 bytes)" in r.json()["error"]["message"]
    assert_still_serving(live.client())


@pytest.mark.slow
def test_more_sequences_than_the_queue_holds_are_refused_before_any_work(live):
    server = live.app.state.server
    r = httpx.post(live.url + "/v1/completions", json={"prompt": ["a b c"] * 5, "n": 2, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "asks for 10 sequences" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": CAPITAL, "n": 9, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert server.loop.waiting == 0 and server.loop.running == 0
    assert_still_serving(live.client())


@pytest.mark.slow
def test_a_plain_request_whose_client_leaves_is_cancelled_while_tokens_flow(live):
    """Tokens never pause for the old 0.5 s silence check, so only a check at every update stops the row."""
    server = live.app.state.server
    before = server.metrics.generated_tokens._value.get()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(live.url + "/v1/completions", json=ENDLESS, timeout=httpx.Timeout(5, read=1.5))
    deadline = time.time() + 10
    while server.loop.running and time.time() < deadline:
        time.sleep(0.05)
    assert server.loop.running == 0
    generated = server.metrics.generated_tokens._value.get() - before
    assert 0 < generated < ENDLESS["max_tokens"] - 100, generated
    assert_still_serving(live.client())


@pytest.mark.slow
def test_auth_holds_under_a_mount_prefix_and_health_says_little_without_the_key(llm):
    inner = create_app(llm, ServeOptions(max_batch=1, context=CONTEXT, api_key=KEY))

    @contextlib.asynccontextmanager
    async def lifespan(app):  # a mounted app's own lifespan (which loads the model) does not run by itself
        async with inner.router.lifespan_context(inner):
            yield

    outer = FastAPI(lifespan=lifespan)
    outer.mount("/api", inner)  # as behind a proxy or Ray Serve's route prefix
    live = Live(outer, wait_ready=False)
    try:
        deadline = time.time() + 60
        while httpx.get(live.url + "/api/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        for path in ("/api/v1/models", "/api/metrics"):
            assert httpx.get(live.url + path).status_code == 401
            assert httpx.get(live.url + path, headers={"authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(live.url + "/api/v1/chat/completions", json={"messages": CAPITAL, "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/api/v1/models", headers={"x-api-key": KEY}).status_code == 200
        assert httpx.get(live.url + "/api/health").json() == {"status": "ok"}  # no model name, no paths
        auth = {"authorization": f"Bearer {KEY}"}
        assert httpx.get(live.url + "/api/health", headers=auth).json()["model"]
        assert "gemmakit_requests_total" in httpx.get(live.url + "/api/metrics", headers=auth).text
        assert_still_serving(openai.OpenAI(base_url=live.url + "/api/v1", api_key=KEY, max_retries=0))
    finally:
        live.close()


@pytest.mark.slow
def test_random_paths_do_not_grow_the_metrics(live):
    for i in range(30):
        assert httpx.get(f"{live.url}/v1/no-such-route-{i}").status_code == 404
    text = httpx.get(live.url + "/metrics").text
    assert "no-such-route" not in text
    assert 'gemmakit_requests_total{endpoint="unmatched",status="404"} 30.0' in text
    assert_still_serving(live.client())


# --- chat templates: data that makes a template run long or large ------------------------------------------
def test_a_template_that_loops_too_long_is_stopped(monkeypatch):
    monkeypatch.setattr(jinja, "RENDER_SECONDS", 0.3)
    spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="ran longer than"):
        jinja.render_jinja(spin, CAPITAL)
    assert time.monotonic() - t0 < 5  # bounded: unbounded, this loop runs for hours


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{% for i in range(100000) %}{{ m.content }}{% endfor %}{% endfor %}",
     "output passed"),
    ("{{ messages[0].content * 100000000 }}", "built a value"),
    ("{% set ns = namespace(s=messages[0].content) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s | length }}", "built a value"),
    ("{{ 7 ** 100000000 }}", "power"),
])
def test_templates_cannot_grow_values_past_the_bound(template, match):
    with pytest.raises(ValueError, match=match):
        jinja.render_jinja(template, [{"role": "user", "content": "x" * 1000}])


def test_bounds_leave_ordinary_templates_alone():
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content * 2 }}{% endfor %}{{ 2 ** 10 }}"
    assert jinja.render_jinja(template, CAPITAL) == "<user>" + CAPITAL[0]["content"] * 2 + "1024"


def test_a_render_in_one_thread_does_not_shorten_another_threads_deadline(monkeypatch):
    """The deadline is per thread: the server renders requests in worker threads at once."""
    monkeypatch.setattr(jinja, "RENDER_SECONDS", 1.0)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    errors: list[str] = []
    worker = threading.Thread(target=lambda: errors.append(_error_of(slow)))
    worker.start()
    time.sleep(0.2)
    assert jinja.render_jinja("{{ messages[0].content }}", CAPITAL) == CAPITAL[0]["content"]
    worker.join(10)
    assert errors and "ran longer than" in errors[0]


def _error_of(template: str) -> str:
    try:
        jinja.render_jinja(template, CAPITAL)
    except ValueError as e:
        return str(e)
    return ""


@pytest.mark.slow
def test_a_flood_of_streams_that_leave_midway_returns_memory(llm):
    """32 streaming clients that disconnect after their first tokens, three times over: every row is freed,
    nothing piles up in the loop, and after the first flood (which touches every cache row and the client
    threads' memory for the first time) resident memory stays where it was: later floods leave nothing behind."""
    from gemmakit.cache import proc_field_bytes

    live = Live(create_app(llm, ServeOptions(max_batch=4, max_queue=64, context=CONTEXT)))
    server = live.app.state.server
    try:
        before = None

        def leave_early() -> None:
            with contextlib.suppress(httpx.HTTPError), httpx.stream(
                    "POST", live.url + "/v1/completions", json={**ENDLESS, "stream": True}, timeout=60) as r:
                lines = r.iter_lines()
                next(lines), next(lines)
        for flood in range(3):
            if flood == 1:
                before = proc_field_bytes("/proc/self/status", "VmRSS")
            clients = [threading.Thread(target=leave_early) for _ in range(32)]
            for c in clients:
                c.start()
            for c in clients:
                c.join(120)
            deadline = time.time() + 30
            while (server.loop.running or server.loop.waiting) and time.time() < deadline:
                time.sleep(0.05)
            assert (server.loop.running, server.loop.waiting) == (0, 0) and not server.loop._tickets
            time.sleep(1.5)  # the loop hands freed heap back to the OS once it has gone idle
            gc.collect()
        assert_still_serving(live.client())
        grown = proc_field_bytes("/proc/self/status", "VmRSS") - before
        assert grown < 32 << 20, f"resident memory grew {grown / 2**20:.0f} MiB over two floods"
    finally:
        live.close()
