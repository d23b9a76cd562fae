"""LoRA through peft on the shared training loop (tiny random Llama, SmolLM2 tokenizer, fp32, CPU).

- SFT: only the target modules change, and only by a low-rank update (rank ≤ r); every other tensor of
  `final/` is bit-identical to the starting model; `final/` is a plain merged model (no peft, no lora_
  keys) while checkpoints hold the adapters alone.
- DPO: the reference is the model with its adapters disabled. Step 0 is ln 2 (LoRA B starts at zero, so the
  initial policy equals the base model); with non-zero adapters the reference still equals the base model
  in both reference modes, while the policy does not.
- Without peft, a LoRA recipe fails with a ConfigError naming the extra.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from conftest import make_tiny_llama
from rounding import BUG_FACTOR, step_zero_tolerance, tolerance
from zephyr.core.config import DPOConfig, LoraConfig, SFTConfig
from zephyr.core.errors import ConfigError

LN2 = math.log(2)
DATA = Path(__file__).parents[1] / "recipes" / "data"
TARGETS = ("q_proj", "v_proj")
LORA = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=list(TARGETS))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_lora_model")
    make_tiny_llama(len(smollm_tokenizer)).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def sft_cfg(model_dir, tmp_path, **overrides) -> SFTConfig:
    values = dict(
        model=str(model_dir),
        train_data=str(DATA / "tiny_chat.jsonl"),
        max_samples=8,
        max_length=256,
        per_device_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,  # large enough that 2 steps move the adapters visibly
        warmup_ratio=0.0,
        lr_scheduler="constant",
        logging_steps=1,
        save_steps=1,
        output_dir=str(tmp_path / "sft"),
        precision="fp32",
        lora=LORA,
    )
    values.update(overrides)
    return SFTConfig(**values)


# --- SFT -------------------------------------------------------------------------------------------------


def test_sft_with_lora_changes_only_the_targets_by_a_low_rank_update_and_merges(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from zephyr.stages.sft.run import run_sft

    result = run_sft(sft_cfg(model_dir, tmp_path))
    assert result.steps == 2

    base = read_tensors(model_dir)
    final = read_tensors(result.final_dir)
    assert not [k for k in final if "lora_" in k or "base_model" in k]
    assert set(final) == set(base)  # the same plain Llama layout, nothing added or missing
    targets = [k for k in base if any(f".{t}." in k for t in TARGETS)]
    assert len(targets) == 2 * len(TARGETS)  # 2 layers × (q_proj, v_proj) weights
    for name, tensor in base.items():
        if name in targets:
            continue
        assert final[name].dtype == tensor.dtype and torch.equal(final[name], tensor), name
    for name in targets:
        delta = (final[name] - base[name]).double()
        assert delta.abs().max() > 1e-4, name  # trained
        # merged = W + (alpha / r)·B·A: the update has rank at most r
        assert torch.linalg.matrix_rank(delta, atol=1e-5).item() <= LORA.r, name

    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config.get("dtype") == "float32"
    assert not (result.final_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)  # a plain model: no peft involved
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, final[targets[0]])

    # a checkpoint holds the adapters alone (the base weights are the starting model's)
    ckpt = Path(result.output_dir) / "checkpoint-1"
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert sorted(adapter_config["target_modules"]) == sorted(TARGETS)
    adapters = read_tensors(ckpt)
    assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)
    assert len(adapters) == 2 * len(targets)


def test_sft_with_lora_resumes_from_an_adapter_checkpoint(model_dir, tmp_path):
    """A run cut after step 1 and resumed ends with the same merged weights as an uninterrupted one."""
    from zephyr.stages.sft.run import run_sft
    from zephyr.training.checkpoint import FINAL_DIR

    full = run_sft(sft_cfg(model_dir, tmp_path, output_dir=str(tmp_path / "full")))
    cut = sft_cfg(model_dir, tmp_path, output_dir=str(tmp_path / "cut"))
    run_sft(cut)
    # drop what step 2 wrote, keep checkpoint-1: as if the run had been killed after it
    out = Path(cut.output_dir)
    shutil.rmtree(out / FINAL_DIR)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n")
    resumed = run_sft(cut, resume=True)
    a, b = read_tensors(full.final_dir), read_tensors(resumed.final_dir)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)  # one process, same shapes


# --- DPO -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    lines = (DATA / "tiny_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("lora_pairs") / "pairs.jsonl"
    path.write_text("\n".join(lines[:6] + lines[-2:]) + "\n", encoding="utf-8")  # 2 multi-turn
    return path


def dpo_cfg(model_dir, pairs_file, tmp_path, reference, **overrides) -> DPOConfig:
    values = dict(
        model=str(model_dir),
        train_data=str(pairs_file),
        reference=reference,
        per_device_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        logging_steps=1,
        output_dir=str(tmp_path / f"dpo-{reference}"),
        precision="fp32",
        lora=LORA,
    )
    values.update(overrides)
    return DPOConfig(**values)


@pytest.mark.parametrize("reference", ["precomputed", "online"])
def test_dpo_with_lora_starts_at_ln2(model_dir, pairs_file, tmp_path, monkeypatch, reference):
    from zephyr.models import assets
    from zephyr.stages.dpo.run import run_dpo

    monkeypatch.setattr(assets, "home", lambda: tmp_path / "home")  # the reference cache's folder
    result = run_dpo(dpo_cfg(model_dir, pairs_file, tmp_path, reference))
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2
    allowed = step_zero_tolerance(0.1, next(x for x in lines if "loss" in x))
    assert losses[0] == pytest.approx(LN2, abs=allowed)  # policy = base model = reference at step 0
    assert losses[1] != pytest.approx(LN2, abs=allowed)  # the adapters moved after one step
    final = read_tensors(result.final_dir)
    assert not [k for k in final if "lora_" in k]


@pytest.fixture(scope="module")
def tiny_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.mark.parametrize("reference", ["precomputed", "online"])
def test_dpo_reference_is_the_model_with_adapters_disabled(
    model_dir, pairs_file, tmp_path, reference, tiny_accelerator
):
    """With non-zero adapters (as after training, or before a precomputed pass on a resumed run), the
    reference log-probs are the base model's and the policy's are not."""
    from zephyr.models.load import load_model
    from zephyr.stages.dpo.run import DPOTask
    from zephyr.training import logps as logps_mod
    from zephyr.training.prepare import apply_lora

    cfg = dpo_cfg(model_dir, pairs_file, tmp_path, reference)
    task = DPOTask(cfg, cache_dir=tmp_path / "cache")
    base = load_model(str(model_dir), attn_implementation=task.attn_implementation).eval()
    policy = apply_lora(load_model(str(model_dir), attn_implementation=task.attn_implementation), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # the adapters now change the model's outputs
    policy.train()
    task.prepare(policy, tiny_accelerator)
    batch = task.collate(list(task.train_examples())[:3])
    with torch.no_grad():
        want = logps_mod.pair_logps(base, batch)
        ref = task.reference.logps(policy, batch)
        live = logps_mod.pair_logps(policy, batch)
    for side in ("chosen", "rejected"):  # (a precomputed reference comes back from its cache in float64)
        expected = getattr(want, side)
        torch.testing.assert_close(
            getattr(ref, side).double(), expected.double(), rtol=0, atol=tolerance(expected)
        )
    # the adapters are on for the policy
    assert (live.chosen - want.chosen).abs().max() > BUG_FACTOR * tolerance(want.chosen)


# --- without peft ----------------------------------------------------------------------------------------


def test_lora_without_peft_names_the_extra(model_dir, tmp_path, monkeypatch):
    from zephyr.stages.sft.run import run_sft

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    cfg = sft_cfg(model_dir, tmp_path)
    with pytest.raises(ConfigError, match=r"lora.*peft.*zephyr\[peft\]"):
        run_sft(cfg)
    assert not (Path(cfg.output_dir) / "final").exists()


def test_qlora_is_refused_clearly(model_dir, tmp_path):
    from zephyr.stages.sft.run import run_sft

    cfg = sft_cfg(model_dir, tmp_path, lora=LoraConfig(r=4, target_modules=list(TARGETS), load_in_4bit=True))
    with pytest.raises(ConfigError, match="load_in_4bit"):
        run_sft(cfg)


def test_sft_with_lora_and_bf16_master_weights(model_dir, tmp_path):
    """LoRA over a bf16 base: the adapters train under StochasticAdamW in bf16, the frozen base is the
    starting model's in bf16, and the merged folder is bf16."""
    from zephyr.stages.sft.run import run_sft

    result = run_sft(sft_cfg(model_dir, tmp_path, master_weights="bf16", precision="auto"))
    base = read_tensors(model_dir)
    final = read_tensors(result.final_dir)
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    targets = [k for k in base if any(f".{t}." in k for t in TARGETS)]
    for name, tensor in base.items():
        if name not in targets:
            assert torch.equal(final[name], tensor.to(torch.bfloat16)), name
    for name in targets:
        assert not torch.equal(final[name], base[name].to(torch.bfloat16)), name  # trained and merged
