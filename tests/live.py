"""A real server for tests: uvicorn in a thread on a free localhost port, and the shared settings the server
tests use (the context every served model gets, the question every server answers)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import uvicorn

CONTEXT = 512
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


class Live:
    """A uvicorn server in a thread, on a free localhost port, until close()."""

    def __init__(self, app, wait_ready: bool = True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.app, self.url = app, f"http://127.0.0.1:{port}"
        # Open streams get 2 s at shutdown, so a test that leaves requests running still ends promptly.
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        while wait_ready and httpx.get(self.url + "/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
