"""The main job and the everyday verbs on a CPU without AVX-512, VNNI or AMX: every command runs in a child
process with oneDNN and ATen held to AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), the real 270M.

This is what a user on an ordinary laptop or an AMD Zen 2/3 server types; before runtime/probe.py the chat
crashed there before its first answer. `.ci/run` also re-runs the engine, chat and server unit tests under the
same limits. Run: .venv/bin/python -m pytest tests/test_avx2.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gemmakit.runtime import gemv
from gemmakit.runtime.probe import fbgemm_fp16

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux" or not torch.backends.mkldnn.is_available(),
                                 reason="holding oneDNN to AVX2 needs an x86 oneDNN")]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
GEMMAKIT = [str(Path(sys.executable).parent / "gemmakit")]


def _run(args: list[str], stdin: str | None = None, timeout: int = 600) -> str:
    env = {**os.environ, **AVX2, "GEMMAKIT_COMPILE": "off"}
    done = subprocess.run(GEMMAKIT + args, input=stdin, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"gemmakit {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_piped_chat_answers_and_says_its_plan(default_model):
    out = _run(["chat", "--max-tokens", "12", "--verbose"], stdin="What is the capital of France?\n")
    assert "Paris" in out
    # No packed bf16 copy of the head there: gemmakit's AVX2 kernels screen an int8 copy where they build (or,
    # for a one-row engine, an int4 copy where its pass timed faster), else an x86 torch screens through fbgemm's
    # fp16 copy.
    screens = (["int8 copy (gemmakit's AVX2 kernel", "int4 copy for one-row steps (gemmakit's AVX2 kernels"]
               if gemv.unavailable() is None else
               ["fp16 copy (fbgemm, every step)" if fbgemm_fp16() else "off (oneDNN cannot pack bf16 here)"])
    assert "plan: cpu (AVX2)" in out and any(f"head screen: {screen}" in out for screen in screens), out
    assert "weights: gemma-3-270m" in out and "Q4_K x " in out  # what loading made of each stored type


@pytest.mark.parametrize("flags", [["--dtype", "float32"], ["--dtype", "bfloat16"], ["--quantize", "int8"],
                                   ["--quantize", "int4"]], ids=["fp32", "bf16", "int8", "int4"])
def test_generate_in_every_precision(default_model, flags):
    prompt = "The capital of France is"
    out = _run(["generate", prompt, "--max-tokens", "8", *flags])
    assert out.startswith(prompt) and len(out[len(prompt):].split()) >= 3, out  # a base model: some continuation


def test_bench_batch_1_and_8(default_model):
    out = _run(["bench", "--batch", "1", "8", "--prompt-len", "16", "--new-tokens", "8"])
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # a header and one row per batch size
    assert "plan: cpu (AVX2)" in out


def test_serve_answers_a_streamed_chat_request(default_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **AVX2, "GEMMAKIT_COMPILE": "off"}
    server = subprocess.Popen(GEMMAKIT + ["serve", "--port", str(port), "--api-key", "k", "--context", "512",
                                          "--max-batch", "2", "--log-level", "warning"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=12, temperature=0, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert "Paris" in text
    finally:
        server.terminate()
        server.wait(timeout=30)
