#!/usr/bin/env bash
# GPU checks on a CUDA machine with torch/triton/transformers/peft but no Quiver install:
# the gpu-marked tests and the kernel benchmarks. Results go to ${OUT:-gpu-results}/.
# bitsandbytes may be carried as a wheel in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
. tests/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)" | tee -a "$OUT/device.txt"
GPU_TESTS=${GPU_TESTS:-"tests/test_kernels_lora.py tests/test_kernels_attention.py tests/test_kernels_nf4.py
  tests/test_kernels_nf4_words.py tests/test_kernels_fused.py tests/test_gpu_engine.py"}
timeout ${TEST_TIMEOUT:-300} python3 -P -m pytest -q -m gpu --maxfail=20 -p no:cacheprovider $GPU_TESTS \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -60
[ "${BENCH:-1}" = 1 ] || exit 0
timeout 150 python3 -P -m quiver.kernels.bench_nf4 --out "$OUT/nf4.json" 2>&1 | tail -30
timeout 120 python3 -P -m quiver.kernels.bench_lora --out "$OUT/lora.json" 2>&1 | tail -25
