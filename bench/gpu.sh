#!/usr/bin/env bash
# bench/gpu.sh WHEELS [RESULTS] [bench.gpu options]: the GPU check, offline. For a machine with an NVIDIA
# driver (580 or later), Python 3.12 with torch, onnx and scikit-learn (the benchmark's export and the
# tests use them) and no network: it installs only from the folder WHEELS, which `tools/gpu-wheels
# WHEELS` fills on a machine with the network. Each step's output lands in RESULTS (default
# bench/results/gpu-<time>) as it is made, gpu.log holding the whole run:
#   1. the machine: the GPU and driver, onnxruntime's providers and the CUDA its wheel was built for;
#   2. correctness, before any timing (python -m bench.gpu_check: check.jsonl): every shipped graph
#      opened on CUDA with and without CUDA graphs (the nodes left on the CPU, a refused capture),
#      replays at batch sizes 1 to 11 against the CPU provider, the device cache pool against the
#      host cache with one seed;
#   3. the GPU tests with VITSERVE_DEVICE=cuda (tests.xml, tests.log);
#   4. timing (python -m bench.gpu: gpu.md, gpu.json, the services' logs), run even if 2 or 3 failed.
# Exits 1 when a check or a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=$(realpath "${1:?usage: bench/gpu.sh WHEELS_DIR [RESULTS_DIR] [bench.gpu options]}")
results=$(realpath -m "${2:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}")
shift $(($# < 2 ? $# : 2))
mkdir -p "$results"
exec > >(tee -a "$results/gpu.log") 2>&1
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "the machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
venv=${VENV:-$results/venv}
python3 -m venv --system-site-packages "$venv"   # torch, onnx, scikit-learn: the machine's own
# shellcheck disable=SC1091
. "$venv/bin/activate"
has() { compgen -G "$wheels/$1" >/dev/null && echo 1 || echo 0; }
mapfile -t requirements < <(python bench/gpu_requirements.py --cuda-libs "$(has 'nvidia_cudnn_cu*.whl')" \
  --tensorrt "$(has 'tensorrt_cu*_libs-*.whl')")
if ! python -m pip install -q --no-index --find-links "$wheels" "${requirements[@]}" >"$results/install.log" 2>&1; then
  tail -20 "$results/install.log"
  echo "the install from $wheels failed (all of it: $results/install.log)"
  exit 1
fi
export PYTHONPATH=$PWD
python - <<'PY'
import onnxruntime as ort
from onnxruntime.capi import build_and_package_info as built
print("onnxruntime", ort.__version__, "built for CUDA", getattr(built, "cuda_version", "none"), ort.get_available_providers())
PY

status=0
step "correctness: python -m bench.gpu_check"
timeout 900 python -m bench.gpu_check --device cuda --results "$results" || status=1

step "the GPU tests, VITSERVE_DEVICE=cuda"
VITSERVE_DEVICE=cuda timeout 900 python -m pytest -q -p no:cacheprovider --junitxml "$results/tests.xml" \
  tests/unit/test_runtime.py tests/unit/test_tensorrt.py tests/unit/test_device_fallback.py \
  tests/unit/test_cache_pool.py tests/unit/test_cuda_graphs.py tests/api/test_fp16.py >"$results/tests.log" 2>&1 || status=1
tail -15 "$results/tests.log"

step "timing: python -m bench.gpu"
timeout 1200 python -m bench.gpu --device cuda --results "$results" "$@" \
  || echo "bench.gpu stopped early: the tables it finished are in $results/gpu.md"
step "done: $results (status $status)"
exit "$status"
