#!/usr/bin/env bash
# Every CUDA check in one run, for a GPU machine that has PyTorch but no network and no gemmakit install:
# the tests marked gpu (parity with transformers on CUDA, quantized kernels, the engine, CUDA-graph decode),
# then benchmarks/cuda_engine.py (gemmakit against transformers on the same GPU). Logs and the JSON table go
# to OUTDIR. Wheels for packages that machine lacks (gguf; the pinned transformers) can be put in .whl/:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.23.0 gguf
# Usage: benchmarks/cuda_check.sh [OUTDIR] [extra cuda_engine.py arguments]; TESTS_K narrows the tests (-k).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/cuda-check}
shift || true
mkdir -p "$out"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gemmakit-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gemmakit-site
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  torch.cuda.get_device_name())"
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py \
  tests/test_quantize.py -k "${TESTS_K:-cuda}" 2>&1 | tee "$out/tests.log"
timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/cuda_engine.py --save "$out/cuda_engine.json" "$@" 2>&1 \
  | tee "$out/bench.log"
