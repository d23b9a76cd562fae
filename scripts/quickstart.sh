#!/usr/bin/env bash
# zephyr on the embedded default model (SmolLM2-135M-Instruct), on CPU, in a few minutes:
# curate teacher dialogues, dSFT, dDPO from the dSFT model, then measure. Every step is a plain zephyr
# command: copy one to run it on your own data, model or GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
Z=.venv/bin/zephyr
RUN=${RUN:-runs/quickstart}
rm -rf "$RUN"

echo "== 1/6 a training conversation rendered with its chat template ([[trained tokens]] marked)"
$Z data show recipes/data/tiny_chat.jsonl --limit 1 --no-color

echo "== 2/6 curation of raw teacher dialogues"
$Z curate recipes/smollm2/curate.yaml "curate.output_dir=$RUN/curate"

echo "== 3/6 dSFT on SmolLM2-135M-Instruct"
$Z sft recipes/smollm2/sft.yaml "sft.output_dir=$RUN/sft"

echo "== 4/6 dDPO from the dSFT model, which is also its reference"
$Z dpo recipes/smollm2/dpo.yaml "dpo.model=$RUN/sft/final" "dpo.output_dir=$RUN/dpo"

echo "== 5/6 multiple choice (lm-evaluation-harness semantics): base model and dDPO model"
$Z eval mc --model asset:smollm2-135m-instruct --data tests/data/mc/arc_like.jsonl --out "$RUN/eval/base"
$Z eval mc --model "$RUN/dpo/final" --data tests/data/mc/arc_like.jsonl --out "$RUN/eval/dpo"

echo "== 6/6 summary"
.venv/bin/python - "$RUN" <<'PY'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])


def last_eval(path):
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if any(k.startswith("eval/") for k in x)][-1]


sft, dpo = last_eval(run / "sft/metrics.jsonl"), last_eval(run / "dpo/metrics.jsonl")
base_mc = json.loads((run / "eval/base/results.json").read_text())
dpo_mc = json.loads((run / "eval/dpo/results.json").read_text())
print(f"dSFT  held-out loss                         {sft['eval/loss']:.4f}")
print(f"dDPO  held-out reward accuracy              {dpo['eval/rewards/accuracies']:.3f}")
print(f"dDPO  held-out reward margin                {dpo['eval/rewards/margins']:.4f}")
print(f"MC    acc_norm  base {base_mc['acc_norm']:.3f}   dDPO {dpo_mc['acc_norm']:.3f}")
print(f"models: {run}/sft/final  {run}/dpo/final   (load with AutoModelForCausalLM.from_pretrained)")
PY
