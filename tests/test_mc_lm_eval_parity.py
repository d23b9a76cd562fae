"""`zephyr eval mc` against lm-evaluation-harness 0.4.13 on the same items, in process and offline.

lm-eval builds its own requests from a task defined on the local JSONL files (its few-shot sampler, its
context format), scores them with its `hf` model (HFLM) on SmolLM2-135M-Instruct, and computes its own
per-item metrics; zephyr runs `run_mc` on the same files. Also: the presets' prompts against lm-eval's task
YAML files, and the aggregate statistics against lm-eval's functions.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from rounding import magnitude, tolerance
from zephyr.core.config import McEvalConfig
from zephyr.stages.mc import metrics, presets
from zephyr.stages.mc import run as mc

DATA = Path(__file__).parent / "data" / "mc"
ARC = DATA / "arc_like.jsonl"
TRUTHFUL = DATA / "truthful_like.jsonl"
FEWSHOT = DATA / "fewshot.jsonl"
# SmolLM2-135M's fp32 log-probs round at the size of its logits, whatever the chosen token's own log-prob: the
# largest |log p| over the vocabulary at a position is 27 to 43 on these items.
LOGIT_SPREAD = 45.0


def ll_tolerance(lls: list[float]) -> float:
    """Two tools' log-likelihoods of an item's choices (other batches, other kernels): see tests/rounding.py."""
    return tolerance(magnitude(lls) + LOGIT_SPREAD)


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def lm_eval_task(data: Path, fewshot: Path | None, num_fewshot: int, cache_dir: Path):
    """A multiple_choice task of lm-eval over our MC JSONL (query / choices / gold), fewshot from `fewshot`."""
    from lm_eval.api.task import ConfigurableTask

    files = {"test": str(data)} | ({"train": str(fewshot)} if fewshot else {})
    config = {
        "task": f"zephyr_{data.stem}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files, "cache_dir": str(cache_dir)},
        "output_type": "multiple_choice",
        "test_split": "test",
        "training_split": "train" if fewshot else None,
        # Without a few-shot file the examples come from the evaluated split itself, so say so: lm-eval
        # then leaves each item out of its own examples (as zephyr does).
        "fewshot_split": "train" if fewshot else "test",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "num_fewshot": num_fewshot,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)  # lm-eval's default fewshot_random_seed
    task.build_all_requests(rank=0, world_size=1)
    return task


def lm_eval_run(task, hflm):
    """Per doc (in order): its requests' contexts, log-likelihoods, and lm-eval's process_results."""
    instances = sorted(task.instances, key=lambda inst: (inst.doc_id, inst.idx))
    responses = hflm.loglikelihood(instances, disable_tqdm=True)
    docs: dict[int, dict] = {}
    for inst, response in zip(instances, responses, strict=True):
        entry = docs.setdefault(inst.doc_id, {"doc": inst.doc, "context": inst.args[0], "results": []})
        assert inst.args[0] == entry["context"]
        entry["results"].append(response)
    for entry in docs.values():
        entry["lls"] = [ll for ll, _ in entry["results"]]
        entry["metrics"] = task.process_results(entry["doc"], entry["results"])
    return [docs[i] for i in sorted(docs)]


@pytest.fixture(scope="module")
def hflm(smollm_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(smollm_dir), batch_size=16, device="cpu", dtype="float32")


def run_zephyr(smollm_dir, out: Path, **kwargs) -> tuple[dict, list[dict]]:
    results = mc.run_mc(McEvalConfig(batch_size=16, **kwargs), str(smollm_dir), out)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    return results, items


def assert_same_lls(ours: list[float], theirs: list[float]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a - b) <= ll_tolerance(theirs), (ours, theirs)


@pytest.mark.parametrize(("fewshot", "k"), [(FEWSHOT, 3), (FEWSHOT, 7), (None, 4)])
def test_fewshot_contexts_match_lm_eval(fewshot, k, tmp_path):
    """Sampler (seed, state carried over items, the item never its own example) and format; no model."""
    task = lm_eval_task(ARC, fewshot, k, tmp_path / "cache")
    theirs = {inst.doc_id: inst.args[0] for inst in task.instances}
    ours = mc.load_task(
        data=str(ARC), fewshot_data=str(fewshot) if fewshot else None, num_fewshot=k, limit=None, preset=None
    )
    assert mc.build_contexts(ours) == [theirs[i] for i in range(20)]


@pytest.mark.slow
def test_fewshot_items_match_lm_eval(hflm, smollm_dir, tmp_path):
    task = lm_eval_task(ARC, FEWSHOT, 1, tmp_path / "cache")
    theirs = lm_eval_run(task, hflm)
    ours_task = mc.load_task(data=str(ARC), fewshot_data=str(FEWSHOT), num_fewshot=1, limit=None, preset=None)
    assert mc.build_contexts(ours_task) == [doc["context"] for doc in theirs]

    results, items = run_zephyr(
        smollm_dir, tmp_path / "out", data=str(ARC), fewshot_data=str(FEWSHOT), num_fewshot=1
    )
    assert len(items) == len(theirs) == 20
    for item, doc in zip(items, theirs, strict=True):
        assert item["id"] == doc["doc"]["id"]
        assert_same_lls(item["loglikelihoods"], doc["lls"])
        assert item["acc"] == doc["metrics"]["acc"]
        assert item["acc_norm"] == doc["metrics"]["acc_norm"]
    from lm_eval.api.metrics import mean, mean_stderr

    for name in ("acc", "acc_norm"):
        values = [doc["metrics"][name] for doc in theirs]
        assert results[name] == pytest.approx(mean(values))
        assert results[f"{name}_stderr"] == pytest.approx(mean_stderr(values))
    # The metrics must be able to differ for this test to mean something: they do on these items.
    assert 0 < results["acc"] < 1 and any(item["acc"] != item["acc_norm"] for item in items)


@pytest.mark.slow
def test_gold_lists_match_lm_eval_acc_and_truthfulqa_mc2(hflm, smollm_dir, tmp_path):
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    task = lm_eval_task(TRUTHFUL, None, 0, tmp_path / "cache")
    assert task.multiple_target  # lm-eval reads the gold lists as several targets
    theirs = lm_eval_run(task, hflm)
    _, items = run_zephyr(smollm_dir, tmp_path / "out", data=str(TRUTHFUL))
    for item, doc in zip(items, theirs, strict=True):
        assert_same_lls(item["loglikelihoods"], doc["lls"])
        assert item["acc"] == doc["metrics"]["acc"]
        assert item["acc_norm"] == doc["metrics"]["acc_norm"]
        labels = [int(i in doc["doc"]["gold"]) for i in range(len(doc["doc"]["choices"]))]
        mc2 = process_results_mc2({"mc2_targets": {"labels": labels}}, doc["results"])["acc"]
        assert item["mc2"] == pytest.approx(mc2, abs=ll_tolerance(doc["lls"]))  # moves less than the lls


@pytest.mark.slow
def test_truncation_and_empty_context_match_lm_eval(hflm, smollm_dir, tmp_path):
    from lm_eval.api.instance import Instance

    source = [json.loads(line) for line in ARC.read_text().splitlines()][:4]
    source.append(
        {"id": "empty", "query": "", "choices": ["Paris is in France.", "Paris is in Peru."], "gold": 0}
    )
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in source))
    requests = [
        Instance("loglikelihood", r, (r["query"], " " + choice), j)
        for r in source
        for j, choice in enumerate(r["choices"])
    ]
    hflm._max_length = 12  # lm-eval keeps the last 13 tokens of a longer request
    try:
        theirs = [ll for ll, _ in hflm.loglikelihood(requests, disable_tqdm=True)]
    finally:
        hflm._max_length = None
    results, items = run_zephyr(smollm_dir, tmp_path / "out", data=str(data), max_length=12)
    assert results["counts"]["truncated_requests"] >= 8  # most ARC requests are longer than 13 tokens
    flat = [ll for item in items for ll in item["loglikelihoods"]]
    assert_same_lls(flat, theirs)


# ---------------------------------------------------------------------------------------------------------
# Preset prompts against lm-eval's task files (no model)


def render(template: str, doc: dict) -> str:
    from lm_eval.utils import apply_template

    return apply_template(template, doc)


def task_yaml(relative: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks_dir() / relative, resolve_func=False)


def test_truthfulqa_preamble_is_lm_eval_s():
    for name in ("truthfulqa_mc1.yaml", "truthfulqa_mc2.yaml"):
        config = task_yaml(f"truthfulqa/{name}")
        assert render(config["doc_to_text"], {"question": "Is the sky green?"}) == presets.truthfulqa_query(
            "Is the sky green?"
        )
    row = {
        "question": "Is the sky green?",
        "mc1_targets": {"choices": ["No.", "Yes.", "Sometimes."], "labels": [1, 0, 0]},
        "mc2_targets": {"choices": ["No.", "It is blue.", "Yes."], "labels": [1, 1, 0]},
    }
    assert presets.truthfulqa_mc2_record(row, 7) == {
        "id": 7,
        "query": presets.truthfulqa_query("Is the sky green?"),
        "choices": ["No.", "It is blue.", "Yes."],
        "gold": [0, 1],
    }
    assert presets.truthfulqa_mc1_record(row, 7)["gold"] == 0


def test_arc_prompt_is_lm_eval_s():
    config = task_yaml("arc/arc_challenge.yaml")
    row = {
        "id": "Mercury_1",
        "question": "Which is a metal?",
        "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    record = presets.arc_record(row, 0)
    assert record["query"] == render(config["doc_to_text"], row)
    assert record["gold"] == int(render(config["doc_to_target"], row)) == 1
    assert record["choices"] == ["wood", "iron", "glass"]


def test_mmlu_prompt_and_description_are_lm_eval_s():
    template = task_yaml("mmlu/default/_default_template_yaml")
    subject = task_yaml("mmlu/default/mmlu_high_school_us_history.yaml")
    row = {
        "question": "  Who was first?  ",
        "subject": "high_school_us_history",
        "choices": ["a", "b", "c", "d"],
        "answer": 3,
    }
    record = presets.mmlu_record(row, 5)
    assert record["query"] == render(template["doc_to_text"], row)
    assert record["choices"] == template["doc_to_choice"] and record["gold"] == 3
    assert presets.mmlu_description("high_school_us_history") == subject["description"]
    assert template["fewshot_config"]["sampler"] == presets.PRESETS["mmlu"].sampler
    listed = {
        path.stem.removeprefix("mmlu_") for path in (lm_eval_tasks_dir() / "mmlu/default").glob("mmlu_*.yaml")
    }
    assert set(presets.MMLU_SUBJECTS) == listed and len(presets.MMLU_SUBJECTS) == 57


def test_hellaswag_conversion_is_lm_eval_s():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    row = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
        "ctx_b": "then",
        "endings": [
            " , the man adds wax to the windshield and cuts it.",
            "[title] A man stands.  [step] He waits",
            "x",
            "y",
        ],
        "label": "3",
    }
    theirs = process_docs(datasets.Dataset.from_list([row]))[0]
    ours = presets.hellaswag_record(row, 0)
    assert (ours["query"], ours["choices"], ours["gold"]) == (
        theirs["query"],
        theirs["choices"],
        theirs["gold"],
    )


# ---------------------------------------------------------------------------------------------------------
# Statistics against lm-eval's functions


def test_stderr_and_mc2_match_lm_eval_functions():
    from lm_eval.api.metrics import mean_stderr, unweighted_mean_stderr
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    rng = random.Random(0)
    for n in (2, 7, 50):
        values = [float(rng.random() < 0.6) for _ in range(n)]
        assert metrics.mean_stderr(values) == pytest.approx(mean_stderr(values))
    stderrs = [rng.random() / 10 for _ in range(57)]
    assert metrics.unweighted_mean_stderr(stderrs) == pytest.approx(unweighted_mean_stderr(stderrs))
    for _ in range(20):
        lls = [rng.uniform(-30, -1) for _ in range(rng.randint(2, 8))]
        gold = sorted(rng.sample(range(len(lls)), rng.randint(1, len(lls))))
        labels = [int(i in gold) for i in range(len(lls))]
        theirs = process_results_mc2({"mc2_targets": {"labels": labels}}, [(ll, False) for ll in lls])["acc"]
        assert metrics.mc2(lls, gold) == pytest.approx(theirs, rel=1e-12)
        assert not math.isnan(theirs)
