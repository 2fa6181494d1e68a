#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU: install the CuPy extra, run the GPU tests (every core and
# block test that takes the `be` fixture, on CuPy arrays), then benchmark ours on CuPy against torch's
# CUDA scaled_dot_product_attention. Meant to finish in under 5 minutes.
#
#   scripts/gpu_check.sh                 # picks cuda12x or cuda13x from the driver's CUDA version
#   CUDA_EXTRA=cuda13x scripts/gpu_check.sh
#
# torch is not installed here: a CUDA build of torch is a multi-GB download. When the environment already
# has one (torch.cuda.is_available()), the benchmark puts it side by side; otherwise it runs without it.
# Results: gpu-tests.log and bench-results-gpu.json in the repository root. The extras install CuPy with its
# CUDA libraries from PyPI (`cupy-cuda12x[ctk]`), so only the NVIDIA driver has to be on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: this machine has no NVIDIA driver, nothing to check" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ -z "${CUDA_EXTRA:-}" ]; then
    cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
    if [ "${cuda_major:-12}" -ge 13 ]; then CUDA_EXTRA=cuda13x; else CUDA_EXTRA=cuda12x; fi
fi
echo "gpu_check: installing the '$CUDA_EXTRA' extra"

test -x "$VENV/bin/python" || "$PYTHON" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q -e ".[test,$CUDA_EXTRA]"
"$VENV/bin/python" -c "import cupy; print('cupy', cupy.__version__, 'devices:', cupy.cuda.runtime.getDeviceCount())"

# the tests' failure must not stop the benchmark from running: each step's status is kept, the worst returned
status=0
echo "gpu_check: GPU tests (pytest -m gpu)"
timeout 180 "$VENV/bin/python" -m pytest -q -m gpu 2>&1 | tee gpu-tests.log || status=$?

echo "gpu_check: benchmark, CuPy against torch CUDA SDPA where available"
timeout 240 "$VENV/bin/python" -m attention_ref bench --backend cupy --sizes 1024 4096 16384 --repeats 3 \
    --json bench-results-gpu.json || status=$?
exit "$status"
