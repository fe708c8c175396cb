#!/usr/bin/env bash
# Sets up (first run) and starts `quiver serve` on the embedded model; extra args go to serve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/quiver serve "$@"
