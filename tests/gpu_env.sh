#!/usr/bin/env bash
# Source on a CUDA machine with torch/triton/transformers/peft but no Quiver install: puts the
# quiver.* packages on PYTHONPATH (symlinks in /tmp/q) and installs the wheels carried in .whl/
# (bitsandbytes; grpcio-health-checking and grpcio-reflection for the server) into /tmp/site. tests/gpu_check.sh sources it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
rm -rf /tmp/q && mkdir -p /tmp/q/quiver
for d in server adapters kernels loadtest; do ln -s "$PWD/$d" "/tmp/q/quiver/$d"; done
for wheel in .whl/*.whl; do  # each carried wheel once per machine
  [ -e "$wheel" ] && [ ! -e "/tmp/site/.done-$(basename "$wheel")" ] || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" &&
    touch "/tmp/site/.done-$(basename "$wheel")"
done
export PYTHONPATH=/tmp/q:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
