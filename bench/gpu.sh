#!/usr/bin/env bash
# bench/gpu.sh [bench.gpu options]: on a fresh GPU machine (an NVIDIA driver, Python 3.11+, the
# network), in about 8 minutes: install the project with onnxruntime-gpu (the pin of pyproject's `gpu`
# extra, with CUDA and cuDNN from NVIDIA's wheels) and TensorRT's wheels, run the GPU-relevant tests
# with VITSERVE_DEVICE=cuda, then measure (python -m bench.gpu: one markdown table per figure, naming
# the GPU). No GPU has run it yet: see the README's GPU section.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

VENV=${VENV:-.venv-gpu}
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --upgrade pip
# torch's CPU build traces the benchmark graph; of the dev tools, only pytest and the HTTP client
dev=$(python -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; print(" ".join(p for p in d if p.startswith(("pytest=", "httpx2="))))')
# shellcheck disable=SC2086
pip install -q -e '.[train]' $dev --extra-index-url https://download.pytorch.org/whl/cpu
pin=$(python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"][0])')
pip uninstall -q -y onnxruntime   # onnxruntime-gpu installs the same module
pip install -q "${pin/onnxruntime-gpu/onnxruntime-gpu[cuda,cudnn]}"
# unpinned: the TensorRT major version onnxruntime-gpu 1.32 was built with is not recorded here yet
pip install -q tensorrt-cu12 || echo "no TensorRT wheels: the TensorRT rows will say why they are missing"

# CUDA, cuDNN and TensorRT libraries from the wheels, for this shell and the service processes it starts
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(find "$site/nvidia" "$site/tensorrt_libs" -maxdepth 2 -type d \( -name lib -o -name tensorrt_libs \) 2>/dev/null | paste -sd: - || true)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'

# the tests whose Settings follow VITSERVE_DEVICE (sessions, I/O binding, the cache pool, TensorRT's
# options and its refusal), then the fp16 serving tests (on the CPU provider of onnxruntime-gpu)
export VITSERVE_DEVICE=cuda
tests=0
timeout 180 python -m pytest -q tests/unit/test_runtime.py tests/unit/test_tensorrt.py \
    tests/unit/test_cache_pool.py tests/unit/test_cuda_graphs.py tests/api/test_fp16.py || tests=$?
timeout 330 python -m bench.gpu --device cuda --json bench/results/gpu.json "$@"
exit "$tests"   # the measurements are printed either way; a failed test still fails the script
