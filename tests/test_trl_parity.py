"""Parity with TRL 1.16's DPOTrainer on the same tiny random model (fp32, CPU), the same pairs (multi-turn
prompts included) and the SmolLM2 tokenizer with its own chat template.

Tokenization: TRL renders prompt + answer with the chat template and takes everything after the prompt as
the completion, so its completion also holds the template's separator after the end-of-turn token (ChatML:
the "\\n" after `<|im_end|>`). zephyr trains the answer up to and including the end-of-turn token only: the
separator is template framing the model never generates (generation stops at end-of-turn). The first test
pins that as the only difference; the numeric tests hand TRL the same token ids (the rendered prompt and
answer as text, which TRL tokenizes back to exactly our ids: asserted), then compare per-pair log-probs,
losses and rewards, and `zephyr logps` against TRL's `precompute_ref_log_probs`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from rounding import preference_tolerance, tolerance
from zephyr.core.config import DPOConfig, LogpsConfig
from zephyr.data.chat import render_text
from zephyr.stages.logps.run import run_logps
from zephyr.training.pairs import read_pairs, split_pair

pytest.importorskip("trl")

BETA = 0.1
PAIRS_FILE = "recipes/data/tiny_pairs.jsonl"
# Single-turn and multi-turn prompts (lines 37-48 of the file are multi-turn).
LINES = [0, 1, 6, 18, 36, 37, 40, 47]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm_dir):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("trl_parity")
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    records = [json.loads(x) for x in Path(PAIRS_FILE).read_text(encoding="utf-8").splitlines()]
    records = [records[i] for i in LINES]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    reference = make_tiny_llama(len(tokenizer), seed=0)
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy near the reference: rewards of order 0.1-1, not saturated
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    folders = {}
    for name, model in (("reference", reference), ("policy", policy)):
        folders[name] = tmp / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return {"tmp": tmp, "tokenizer": tokenizer, "records": records, "data": data, **folders}


def _ours(setup):
    return read_pairs(
        setup["tokenizer"], str(setup["data"]), max_length=None, max_prompt_length=None, on_bad_record="error"
    )[0]


def _trl_trainer(setup, dataset_rows, *, precompute: bool):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    args = TRLConfig(
        output_dir=str(setup["tmp"] / "trl"),
        report_to=[],
        use_cpu=True,
        beta=BETA,
        max_length=None,
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        precompute_ref_log_probs=precompute,
        bf16=False,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    policy = AutoModelForCausalLM.from_pretrained(setup["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(setup["reference"], dtype=torch.float32)
    return DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(dataset_rows),
        processing_class=copy.deepcopy(setup["tokenizer"]),
    )


def _text_rows(setup):
    """Each pair as TRL's standard (text) format: the rendered prompt and the rendered answers."""
    tokenizer = setup["tokenizer"]
    rows = []
    for record in setup["records"]:
        prompt, chosen, rejected = split_pair(record)
        prompt_text = render_text(tokenizer, prompt, add_generation_prompt=True)
        answers = []
        for answer in (chosen, rejected):
            full = render_text(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
            tail = full[len(prompt_text) :]
            answers.append(tail[: tail.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)])
        rows.append({"prompt": prompt_text, "chosen": answers[0], "rejected": answers[1]})
    return rows


def test_tokenization_agrees_with_trl_but_for_the_template_separator(setup):
    tokenizer = setup["tokenizer"]
    rows = []
    for record in setup["records"]:
        prompt, chosen, rejected = split_pair(record)
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    trainer = _trl_trainer(setup, rows, precompute=False)
    separator = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert separator == [198]
    ours = _ours(setup)
    assert sum(len(r["chosen"]) > 2 for r in setup["records"]) >= 3  # multi-turn prompts are in the set
    for pair, trl_row in zip(ours, trainer.train_dataset, strict=True):
        assert trl_row["prompt_ids"] == list(pair.prompt_ids)
        assert trl_row["chosen_ids"] == [*pair.chosen_ids, *separator]
        assert trl_row["rejected_ids"] == [*pair.rejected_ids, *separator]
        assert pair.chosen_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="module")
def trl_precomputed(setup):
    """TRL on the same token ids, with its reference log-probs precomputed by its own pass."""
    trainer = _trl_trainer(setup, _text_rows(setup), precompute=True)
    ours = _ours(setup)
    for pair, row in zip(ours, trainer.train_dataset, strict=True):  # TRL sees exactly our ids
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            list(pair.prompt_ids),
            list(pair.chosen_ids),
            list(pair.rejected_ids),
        )
    return trainer


def test_zephyr_logps_equals_trl_precomputed_reference(setup, trl_precomputed, tmp_path):
    out = tmp_path / "logps.jsonl"
    run_logps(LogpsConfig(model=str(setup["reference"]), data=str(setup["data"]), out=str(out), batch_size=3))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt_id"] for x in lines] == [r["prompt_id"] for r in setup["records"]]
    ours = _ours(setup)
    assert [x["chosen_tokens"] for x in lines] == [len(p.chosen_ids) for p in ours]
    trl = trl_precomputed.train_dataset
    for key in ("chosen", "rejected"):
        theirs = torch.tensor(trl[f"ref_{key}_logps"])
        ours_logps = torch.tensor([x[f"{key}_logps"] for x in lines])
        torch.testing.assert_close(ours_logps, theirs, atol=tolerance(theirs), rtol=0)
    # not trivially equal: the log-probs are those of a random model over a 49k vocabulary
    assert all(x["chosen_logps"] < -10 for x in lines)


def test_loss_rewards_and_logps_match_trl_pair_by_pair(setup, trl_precomputed, tmp_path):
    from accelerate import Accelerator

    from zephyr.models.load import load_model
    from zephyr.stages.dpo.run import DPOTask

    trainer = trl_precomputed
    cfg = DPOConfig(
        model=str(setup["policy"]),
        ref_model=str(setup["reference"]),
        train_data=str(setup["data"]),
        beta=BETA,
        max_length=4096,
        max_prompt_length=2048,
        per_device_batch_size=1,
        output_dir=str(tmp_path / "run"),
    )
    task = DPOTask(cfg, cache_dir=tmp_path / "cache")
    policy = load_model(cfg.model, attn_implementation=task.attn_implementation).train()
    task.prepare(policy, Accelerator(cpu=True))

    collator = trainer.data_collator
    margins = []
    for k, (example, trl_row) in enumerate(zip(task.train_examples(), trainer.train_dataset, strict=True)):
        with torch.no_grad():
            ours = task.loss(policy, task.collate([example]))
        trainer.model.train()  # TRL files its metrics under the model's mode
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, collator([trl_row]), return_outputs=False)
        trl = {key: values[0] for key, values in trainer._metrics["train"].items()}
        got = {key: float(value) for key, value in ours.metric_sums.items()}
        # both tools' policy and reference log-probs, each through its own code: equal up to rounding
        ref = (trl_row["ref_chosen_logps"], trl_row["ref_rejected_logps"])
        allowed = preference_tolerance(BETA, trl["logps/chosen"], trl["logps/rejected"], *ref)
        assert float(ours.loss_sum) == pytest.approx(float(trl_loss), abs=allowed), k
        for key in ("logps/chosen", "logps/rejected"):
            assert got[key] == pytest.approx(trl[key], abs=tolerance(trl[key])), (k, key)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert got[key] == pytest.approx(trl[key], abs=allowed), (k, key)
        margins.append(got["rewards/margins"])
    # a real spread of rewards, both signs (accuracy 0 and 1): not a degenerate point such as policy == reference
    assert min(margins) < 0 < max(margins) and max(margins) - min(margins) > 0.1, margins
