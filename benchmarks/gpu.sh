#!/usr/bin/env bash
# Training speed on one H200, zephyr against TRL 1.16 at the Mistral-7B shape (bf16): the CUDA tests of the
# fast paths, the optimizer step, then benchmarks/dpo.py and benchmarks/sft.py, one process per engine. About 6
# minutes; the time limits below bound it at 9 min 55 s. Tables and logs go to $OUT (default runs/benchmarks).
#
# The machine has no network and neither trl nor datasets: run benchmarks/fetch_wheels.sh beforehand and carry
# build/wheels with the working tree; they are installed into a temporary folder, nothing else changes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/benchmarks}
PYTHON=${PYTHON:-python3}
SHAPE=${SHAPE:-mistral-7b}  # SHAPE=tiny PYTHON=.venv/bin/python: a dry run of this script on the CPU
SITE=${TMPDIR:-/tmp}/zephyr-bench-site
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

has() { "$PYTHON" -c "$1" >/dev/null 2>&1; }
install() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
wheels=()
has "import trl" || wheels+=(build/wheels/trl-*.whl)
has "import datasets" || wheels+=(build/wheels/datasets-*.whl build/wheels/dill-*.whl build/wheels/multiprocess-*.whl)
has "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" || wheels+=(build/wheels/pyarrow-*.whl)
has "import fsspec" || wheels+=(build/wheels/fsspec-*.whl)
if ((${#wheels[@]})); then install "${wheels[@]}" || echo "wheel install failed (run benchmarks/fetch_wheels.sh and carry build/wheels)"; fi
if ! has "import datasets, trl"; then  # datasets pins fsspec and pyarrow: take the carried ones too
  install build/wheels/fsspec-*.whl build/wheels/pyarrow-*.whl
fi
"$PYTHON" - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as m, torch
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA", "torch", torch.__version__)
for name in ("transformers", "accelerate", "trl", "datasets", "pyarrow", "fsspec"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
PY

start=$SECONDS
timeout 75 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_prefix_sharing.py tests/test_forward.py \
  tests/test_optim.py \
  2>&1 | tee "$OUT/gpu_tests.txt"
echo "gpu tests: $((SECONDS - start)) s"
# the optimizer step alone: StochasticAdamW (compiled) against torch's fused AdamW over the 7B tensors
timeout 60 "$PYTHON" benchmarks/optimizer.py --shape "$SHAPE" --table-out "$OUT/optimizer.md" > "$OUT/optimizer.log" 2>&1
echo "optimizer: $((SECONDS - start)) s"; cat "$OUT/optimizer.md" 2>/dev/null || tail -20 "$OUT/optimizer.log"
# 2 warm-up + 6 timed steps of 8 pairs (DPO) or 4 bins of 2048 tokens (SFT); one process per engine
timeout 280 "$PYTHON" benchmarks/dpo.py --shape "$SHAPE" --warmup 2 --steps 6 --engines zephyr,zephyr-ckpt,trl \
  --timeout 90 --table-out "$OUT/dpo.md" > "$OUT/dpo.log" 2>&1
echo "dpo: $((SECONDS - start)) s"; cat "$OUT/dpo.md" 2>/dev/null || tail -40 "$OUT/dpo.log"
timeout 180 "$PYTHON" benchmarks/sft.py --shape "$SHAPE" --warmup 2 --steps 6 --engines zephyr,zephyr-ckpt,trl \
  --timeout 60 --table-out "$OUT/sft.md" > "$OUT/sft.log" 2>&1
echo "sft: $((SECONDS - start)) s"; cat "$OUT/sft.md" 2>/dev/null || tail -40 "$OUT/sft.log"
