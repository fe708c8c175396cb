#!/usr/bin/env bash
# Sets up (first run) and runs the CPU test suite; GPU-marked tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
# the pytest script, not `python -m pytest`: -m would put this checkout first on sys.path, where
# the kernels/ folder shadows the PyPI `kernels` package that transformers (>= 5.25) imports
exec .venv/bin/pytest -q "$@"
