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
  .venv/bin/pip install -q -e ".[${extras}]"
  rm -f .venv/.gemmakit-setup-*
  touch "$stamp"
fi
