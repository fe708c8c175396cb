#!/usr/bin/env bash
# Source on a CUDA machine with torch/triton/transformers/peft but no Quiver install: puts the
# quiver.* packages on PYTHONPATH (symlinks in /tmp/q) and installs bitsandbytes from .whl/
# (wheels carried there) into /tmp/site. tests/gpu_check.sh sources it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
rm -rf /tmp/q && mkdir -p /tmp/q/quiver
for d in server adapters kernels loadtest; do ln -s "$PWD/$d" "/tmp/q/quiver/$d"; done
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/bitsandbytes ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/q:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
