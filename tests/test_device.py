"""`--device auto` and the dtypes Gemma can run in on each device (runtime/device.py).
Run: .venv/bin/python -m pytest tests/test_device.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemmakit.runtime.device import resolve_device, resolve_dtype


def test_auto_is_cuda_where_present_else_cpu():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_what_to_use():
    with pytest.raises(ValueError, match="torch sees no CUDA device here: use --device cpu"):
        resolve_device("cuda:0")


def test_float16_is_refused_with_the_reason_and_the_alternative():
    with pytest.raises(ValueError, match="overflow.*use bfloat16"):
        resolve_dtype("float16", "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_dtype_follows_bf16_support():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto", "cuda") == want


def test_the_cli_refuses_float16_without_a_traceback(default_model):
    gemmakit = Path(sys.executable).parent / "gemmakit"
    done = subprocess.run([str(gemmakit), "generate", "hi", "--dtype", "float16", "--max-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "float16 is not supported" in done.stderr and "Traceback" not in done.stderr
