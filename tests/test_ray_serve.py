"""`gemmakit serve --replicas 2` for real: a local Ray cluster, two replicas of the 270M model behind Ray
Serve's proxy, the official openai client. Run: .venv/bin/python -m pytest tests/test_ray_serve.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(default_model, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": "", "GEMMAKIT_COMPILE": "0"}
    env.pop("RAY_ADDRESS")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--replicas", "2", "--port", str(port),
                                 "--context", "256", "--max-batch", "2", "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    replicas: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                replicas.add(r.headers["x-gemmakit-replica"])
                if len(replicas) == 2:
                    break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    if len(replicas) < 2:
        proc.terminate()
        pytest.fail(f"two replicas did not come up: {log.read_text()[-3000:]}")
    yield url
    # What a supervisor sends, and what reaches a server a shell started in the background (such a job ignores
    # Ctrl-C): Ray's own handler in the driver shuts the local cluster down.
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    left = _wait_until_gone(proc.pid, seconds=30)
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    assert proc.returncode != -signal.SIGKILL, f"SIGTERM did not stop the server: {log.read_text()[-3000:]}"
    assert not left, f"processes of the local Ray cluster outlived the server: {left}"


def _wait_until_gone(session: int, seconds: float) -> list[str]:
    """What still runs in session `session` (the server leads its own) after up to `seconds`."""
    deadline = time.time() + seconds
    while True:
        out = subprocess.run(["ps", "-o", "pid=,args=", "--sid", str(session)], capture_output=True, text=True).stdout
        left = [line.strip() for line in out.splitlines() if line.strip()]
        if not left or time.time() > deadline:
            return left
        time.sleep(1)


def test_two_replicas_answer_behind_one_endpoint(cluster):
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="none", max_retries=0)
    name = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    def ask(_):
        raw = client.chat.completions.with_raw_response.create(model=name, messages=messages, max_tokens=16,
                                                               temperature=0)
        return raw.headers["x-gemmakit-replica"], raw.parse().choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len({who for who, _ in answers}) == 2  # both replicas served
    assert len({text for _, text in answers}) == 1 and "Paris" in answers[0][1]  # same greedy answer everywhere
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answers[0][1]
