#!/usr/bin/env bash
# Idempotent set-up: a virtual environment at .venv with the CPU PyTorch wheel (where no CUDA device is
# present), gemmakit in editable mode with the embedded default model, and with --dev the test tools.
# Re-running is cheap: the install step is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
extras="default-model"
[ "${1:-}" = "--dev" ] && extras="default-model,dev"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.gemmakit-setup-$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      .venv/bin/pip install -q torch
    else
      # An unpinned torch would pull a multi-GB CUDA build; this pin takes the CPU wheel.
      .venv/bin/pip install -q torch==2.13.0
    fi
  fi
  if [ "${1:-}" = "--dev" ] && [ "$(uname -m)" = "x86_64" ] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    # The dev extras' llama.cpp (the peer the tests and benchmarks compare with) is built for this CPU, and its
    # AMX kernels segfault where the kernel does not grant AMX tiles (seen on a VM): build it without them,
    # once per machine, in a wheel cache of our own (pip's cache would hand back the AMX build).
    wheels="${XDG_CACHE_HOME:-$HOME/.cache}/gemmakit/wheels-no-amx"
    if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
      flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      CMAKE_ARGS="-DCMAKE_C_FLAGS='$flags' -DCMAKE_CXX_FLAGS='$flags'" .venv/bin/pip wheel -q --no-deps \
        --no-cache-dir --no-binary llama-cpp-python -w "$wheels" llama-cpp-python==0.3.36
    fi
    .venv/bin/pip install -q --no-deps --force-reinstall "$wheels"/llama_cpp_python-0.3.36-*.whl
  fi
  .venv/bin/pip install -q -e ".[${extras}]"
  rm -f .venv/.gemmakit-setup-*
  touch "$stamp"
fi
