"""dSFT then dDPO on the real SmolLM2-135M-Instruct on CUDA in bf16 (`gpu`), the default recipe's precision:
fp32 master weights under bf16 autocast, the packed varlen attention throughout.

Checked: every packed forward on the GPU took the varlen kernel; the DPO loss of step 0 is ln 2 (policy =
reference, both in bf16); `zephyr logps` on the GPU (bf16 autocast) equals the CPU's fp32 log-probs of the
same checkpoint within bf16's precision. The asset is never fetched here (the GPU machine has no network):
benchmarks/gpu_e2e.sh builds it from carried parts; where it is not built the test skips.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rounding import tolerance
from zephyr.core.config import load_recipe

pytestmark = pytest.mark.gpu

ASSET = "smollm2-135m-instruct"
PAIRS = "recipes/data/tiny_pairs.jsonl"


@pytest.fixture(scope="module")
def smollm():
    from zephyr.models import assets

    if not assets.is_fetched(ASSET):
        pytest.skip(f"{ASSET} is not built here (benchmarks/gpu_e2e.sh builds it from build/gpu-model)")
    return assets.asset_dir(ASSET)


def test_sft_then_dpo_in_bf16_starts_at_ln2_and_scores_as_the_cpu(tmp_path, smollm, monkeypatch):
    from zephyr.stages.dpo.run import DPOTask
    from zephyr.stages.sft.run import run_sft
    from zephyr.training import attention
    from zephyr.training.loop import train
    from zephyr.training.tracking import read_metrics

    monkeypatch.setattr(attention, "_PATHS", {})
    sft_cfg = load_recipe(
        "recipes/smollm2/sft.yaml",
        [f"sft.model={smollm}", f"sft.output_dir={tmp_path / 'sft'}", "sft.precision=bf16"],
    ).sft
    assert sft_cfg.master_weights == "fp32"  # the default: autocast over fp32 weights
    sft = run_sft(sft_cfg)

    dpo_cfg = load_recipe(
        "recipes/smollm2/dpo.yaml",
        [f"dpo.model={sft.final_dir}", f"dpo.output_dir={tmp_path / 'dpo'}", "dpo.precision=bf16"],
    ).dpo
    result = train(DPOTask(dpo_cfg, cache_dir=tmp_path / "ref_cache"), dpo_cfg)
    first = read_metrics(result.metrics_path)[0]
    # Policy and reference: the same weights in bf16, in other row shapes; each log-prob sum within one bf16
    # rounding of its size, and −log σ(β·margin) moves by at most β per nat of any one of them.
    logps = (first["logps/chosen"], first["logps/rejected"])
    limit = dpo_cfg.beta * 2 * sum(tolerance(x, torch.bfloat16, roundings=1) for x in logps)
    assert first["loss"] == pytest.approx(math.log(2), abs=limit)
    assert attention.attention_paths() == [("varlen", "float32 cast to bfloat16 under autocast")]

    on_gpu = zephyr_logps(sft.final_dir, tmp_path / "gpu.jsonl")
    on_cpu = cpu_fp32_logps(sft.final_dir)
    assert [r["prompt_id"] for r in on_gpu] == [r["prompt_id"] for r in on_cpu]
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        for side in ("chosen", "rejected"):
            tokens = cpu[f"{side}_tokens"]
            assert gpu[f"{side}_tokens"] == tokens
            # two bf16 roundings at the sum's size, plus one nat per token (short answers' sums are small)
            limit = tolerance(abs(cpu[f"{side}_logps"]) + tokens, torch.bfloat16, roundings=2)
            assert gpu[f"{side}_logps"] == pytest.approx(cpu[f"{side}_logps"], abs=limit), gpu["prompt_id"]


def zephyr_logps(model_dir, out) -> list[dict]:
    """`zephyr logps` as the command runs it (on the GPU: bf16 autocast over fp32 weights)."""
    from zephyr.cli import main

    assert main(["logps", "--model", str(model_dir), "--data", PAIRS, "--out", str(out)]) == 0
    return [json.loads(line) for line in Path(out).read_text(encoding="utf-8").splitlines()]


def cpu_fp32_logps(model_dir) -> list[dict]:
    from zephyr.models.load import load_model, load_tokenizer
    from zephyr.scoring.attention import register_packed_attention
    from zephyr.training.logps import compute_logps
    from zephyr.training.pairs import read_pairs

    tokenizer = load_tokenizer(str(model_dir), chat_template="auto")
    pairs, _ = read_pairs(tokenizer, PAIRS, max_length=None, max_prompt_length=None, on_bad_record="error")
    net = load_model(str(model_dir), dtype=torch.float32, attn_implementation=register_packed_attention())
    table = compute_logps(net, pairs, batch_size=8, device="cpu")
    return table.rows([p.prompt_id for p in pairs])
