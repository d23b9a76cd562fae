#!/usr/bin/env bash
# zephyr's GPU-only paths in one call of at most 10 minutes: the CUDA tests of the fast paths (varlen kernel,
# prefix sharing, sliding window, autocast, the compiled StochasticAdamW, the memory preflight), the
# optimizer step, then benchmarks/dpo.py and benchmarks/sft.py against TRL 1.16, one process per engine.
# The shape and engines fit the card found (benchmarks/plan.py: the 7B shape on an H200 or an 80 GB H100,
# other engines on the latter). The steps share a budget of BUDGET seconds (540: one 600 s call with room
# for start-up): each gets at most its own limit and leaves the later ones their share. Each engine's row is
# written to $OUT as soon as it finishes.
#
# The machine has no network and neither trl nor datasets: run benchmarks/fetch_wheels.sh beforehand and
# carry build/wheels; they are installed into a temporary folder, nothing else changes. The end-to-end test
# on the real SmolLM2-135M is benchmarks/gpu_e2e.sh (its model travels in calls of its own).
#
# Without CUDA it stops after printing the versions (exit 3). DRY_RUN=1 runs every step on the CPU at the
# tiny shape instead (the CUDA tests skip): DRY_RUN=1 PYTHON=.venv/bin/python bash benchmarks/gpu.sh
#
# $OUT (default runs/benchmarks) receives 6 files: versions.txt, gpu_tests.txt, optimizer.md, dpo.md,
# sft.md, log.txt (the benchmarks' own output).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/benchmarks}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
DRY_RUN=${DRY_RUN:-0}
TMP=${TMPDIR:-/tmp}
SITE=$TMP/zephyr-bench-site
t0=$SECONDS
USER_SHAPE=${SHAPE:-} USER_DPO=${DPO_ENGINES:-} USER_SFT=${SFT_ENGINES:-}  # set: they override the plan
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

# seconds for the next step: at most $1, leaving $2 for the steps after it
limit() {
  local left=$((BUDGET - (SECONDS - t0) - $2))
  ((left > $1)) && left=$1
  ((left < 1)) && left=1  # (timeout 0 would mean no limit at all)
  echo "$left"
}
stamp() { echo "== $1: $((SECONDS - t0)) s of $BUDGET"; }

# --- wheels -------------------------------------------------------------------------------------------------
has() { "$PYTHON" -c "$1" >/dev/null 2>&1; }
install() {
  timeout "$(limit 40 490)" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$@"
}
wheels=()
has "import trl" || wheels+=(build/wheels/trl-*.whl)
has "import datasets" || wheels+=(build/wheels/datasets-*.whl build/wheels/dill-*.whl build/wheels/multiprocess-*.whl)
has "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" || wheels+=(build/wheels/pyarrow-*.whl)
has "import fsspec" || wheels+=(build/wheels/fsspec-*.whl)
if ((${#wheels[@]})); then install "${wheels[@]}" || echo "wheel install failed (run benchmarks/fetch_wheels.sh and carry build/wheels)"; fi
if ! has "import datasets, trl"; then  # datasets pins fsspec and pyarrow: take the carried ones too
  install build/wheels/fsspec-*.whl build/wheels/pyarrow-*.whl
fi
stamp wheels

# --- versions, the card and what fits on it -----------------------------------------------------------------
timeout "$(limit 40 470)" "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as m, torch
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / 2**30:.1f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print(f"no CUDA; torch {torch.__version__}")
for name in ("transformers", "accelerate", "trl", "datasets", "pyarrow", "fsspec"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
from zephyr.scoring import attention
kernel = attention._varlen_attn()
print("torch.nn.attention.varlen:", "missing" if kernel is None else "present",
      "(enable_gqa argument)" if attention._varlen_has_gqa() else "(no enable_gqa argument)")
if torch.cuda.is_available() and kernel is not None:
    # the GQA probe: does the kernel take fewer KV heads than query heads, with the repeated heads' results?
    print("varlen kernel, KV heads:", attention.gqa_mode(torch.device("cuda")))
PY
if [[ $DRY_RUN == 1 ]]; then
  SHAPE=${SHAPE:-tiny} DPO_ENGINES=${DPO_ENGINES:-zephyr,zephyr-ckpt,trl} SFT_ENGINES=${SFT_ENGINES:-zephyr,zephyr-ckpt,trl}
  echo "DRY_RUN=1: every step on the CPU at shape $SHAPE" | tee -a "$OUT/versions.txt"
elif plan=$("$PYTHON" benchmarks/plan.py); then
  eval "$plan"
  SHAPE=${USER_SHAPE:-$SHAPE} DPO_ENGINES=${USER_DPO:-$DPO_ENGINES} SFT_ENGINES=${USER_SFT:-$SFT_ENGINES}
  echo "plan: $CARD ($CARD_GIB GiB): shape $SHAPE; DPO $DPO_ENGINES; SFT $SFT_ENGINES ($PLAN_WHY)" | tee -a "$OUT/versions.txt"
else
  echo "no CUDA device: stopping before the GPU steps (DRY_RUN=1 runs them on the CPU at the tiny shape)"
  exit 3
fi
stamp versions

# --- CUDA tests of the fast paths (skipped in a dry run) ----------------------------------------------------
timeout "$(limit 75 420)" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_prefix_sharing.py \
  tests/test_forward.py tests/test_optim.py tests/test_training_memory.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
stamp "gpu tests"

# --- the optimizer step alone: StochasticAdamW (compiled) against torch's fused AdamW ----------------------
timeout "$(limit 50 370)" "$PYTHON" benchmarks/optimizer.py --shape "$SHAPE" --table-out "$OUT/optimizer.md" \
  >> "$OUT/log.txt" 2>&1
stamp optimizer; cat "$OUT/optimizer.md" 2>/dev/null || tail -20 "$OUT/log.txt"

# --- training: 2 warm-up + 6 timed steps of 8 pairs (DPO) or 4 bins of 2048 tokens (SFT) --------------------
run_bench() {  # script engines limit reserve
  local seconds
  seconds=$(limit "$3" "$4")
  timeout "$seconds" "$PYTHON" "benchmarks/$1.py" --shape "$SHAPE" --warmup 2 --steps 6 --engines "$2" \
    --timeout 100 --budget $((seconds > 10 ? seconds - 10 : 0)) --table-out "$OUT/$1.md" >> "$OUT/log.txt" 2>&1
  stamp "$1"; cat "$OUT/$1.md" 2>/dev/null || tail -40 "$OUT/log.txt"
}
run_bench dpo "$DPO_ENGINES" 210 160
run_bench sft "$SFT_ENGINES" 200 0

echo; echo "== all tables"; cat "$OUT/versions.txt" "$OUT/optimizer.md" "$OUT/dpo.md" "$OUT/sft.md" 2>/dev/null
tail -1 "$OUT/gpu_tests.txt"
