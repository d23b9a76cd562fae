#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh installs on the GPU machine, which has no network, no trl and no datasets:
# downloaded here (PyPI) into build/wheels (ignored by git), then carried there with the working tree.
# About 57 MB, most of it pyarrow (installed there only when its own is older than datasets needs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d build/wheels \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 fsspec==2026.9.0
ls -l build/wheels
