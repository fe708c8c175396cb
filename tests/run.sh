#!/usr/bin/env bash
# Sets up (first run) and runs the CPU test suite; GPU-marked tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/python -m pytest -q "$@"
