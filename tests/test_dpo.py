"""The DPO task: step-0 loss per reference mode, the reference cache, truncation and bad-pair policies,
metric sums, and a tiny end-to-end run on the shared loop (tiny random Llama, SmolLM2 tokenizer, fp32, CPU).

What "step 0 = ln 2" means per reference mode:
- precomputed and online (loss sigmoid, and cdpo): the reference is the initial policy, so every pair's
  log-ratios are 0 and its loss is −log σ(0) = ln 2; asserted per micro-batch to 1e-6, with the policy in
  train mode and micro-batches packed differently from the reference pass.
- none: there is no reference, so ln 2 is not a property of step 0. Asserted instead: SimPO (γ = 0) on
  pairs whose two answers are the same tokens gives ln 2 (equal per-token averages), and on real pairs the
  SimPO and reference-free sigmoid losses equal their formulas evaluated on log-probs computed
  independently from full logits.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from rounding import preference_tolerance, step_zero_tolerance, tolerance
from zephyr.core.config import DPOConfig
from zephyr.core.errors import DataError
from zephyr.stages.dpo.run import DATA_REPORT, DPOTask, PairExample, disable_dropout
from zephyr.training import logps as logps_mod
from zephyr.training.pairs import TokenizedPair

LN2 = math.log(2)
PAIRS_FILE = "recipes/data/tiny_pairs.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_dpo_model")
    make_tiny_llama(len(smollm_tokenizer)).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """16 pairs of the tiny set, 4 of them multi-turn: enough to batch and split, quick on 2 cores."""
    lines = Path(PAIRS_FILE).read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(lines[:12] + lines[-4:]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def make_cfg(model_dir, data, tmp_path, **overrides) -> DPOConfig:
    values = dict(
        model=str(model_dir),
        train_data=str(data),
        eval_fraction=0.25,
        per_device_batch_size=3,
        output_dir=str(tmp_path / "run"),
        precision="fp32",
    )
    values.update(overrides)
    return DPOConfig(**values)


def load_policy(task, folder):
    from zephyr.models.load import load_model

    return load_model(str(folder), attn_implementation=task.attn_implementation).train()


def micro_batches(task, examples, size):
    return [task.collate(list(examples[i : i + size])) for i in range(0, len(examples), size)]


def count_passes(monkeypatch) -> list[int]:
    """Counts calls of the no-grad log-prob pass (the hook: the reference module calls it through its module)."""
    calls: list[int] = []
    original = logps_mod.compute_logps

    def counted(model, pairs, **kwargs):
        calls.append(len(pairs))
        return original(model, pairs, **kwargs)

    monkeypatch.setattr(logps_mod, "compute_logps", counted)
    return calls


def naive_logps(model, prompt, answer) -> float:
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1 :].sum())


# --- step 0 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "loss", "extra"),
    [
        ("precomputed", "sigmoid", {}),
        ("online", "sigmoid", {}),
        ("precomputed", "cdpo", {"label_smoothing": 0.1}),
    ],
)
def test_step_zero_loss_is_ln2_when_reference_is_the_policy(
    model_dir, pairs_file, tmp_path, accelerator, reference, loss, extra
):
    cfg = make_cfg(model_dir, pairs_file, tmp_path, reference=reference, loss=loss, **extra)
    task = DPOTask(cfg, cache_dir=tmp_path / "cache")
    policy = load_policy(task, model_dir)
    task.prepare(policy, accelerator)
    assert policy.training
    examples = list(task.train_examples())[::-1]  # other groupings than the reference pass's
    for batch in micro_batches(task, examples, 3) + micro_batches(task, task.eval_examples(), 2):
        out = task.loss(policy, batch)  # grad enabled, train mode: as in the training step
        n = task.units(batch)
        c, r = (float(out.metric_sums[f"logps/{k}"]) / n for k in ("chosen", "rejected"))
        # the reference is the policy run on other row shapes: its log-probs equal up to rounding
        assert float(out.loss_sum.detach()) / n == pytest.approx(
            LN2, abs=preference_tolerance(cfg.beta, c, r, c, r)
        )
        assert float(out.metric_sums["rewards/chosen"]) / n == pytest.approx(
            0.0, abs=preference_tolerance(cfg.beta, c, c)
        )
        assert float(out.metric_sums["rewards/margins"]) / n == pytest.approx(
            0.0, abs=preference_tolerance(cfg.beta, c, r, c, r)
        )
        assert float(out.metric_sums["logps/chosen"]) / n < -10  # real log-probs, not zeros


def test_reference_none_simpo_is_ln2_on_identical_answers(model_dir, pairs_file, tmp_path, accelerator):
    cfg = make_cfg(model_dir, pairs_file, tmp_path, reference="none", loss="simpo", simpo_gamma=0.0, beta=2.0)
    task = DPOTask(cfg)
    policy = load_policy(task, model_dir)
    task.prepare(policy, accelerator)
    same = [
        PairExample(
            "train",
            i,
            TokenizedPair(e.pair.prompt_id, e.pair.prompt_ids, e.pair.chosen_ids, e.pair.chosen_ids),
        )
        for i, e in enumerate(task.train_examples()[:4])
    ]
    out = task.loss(policy, task.collate(same))
    mean = float(out.metric_sums["logps/chosen"]) / sum(len(e.pair.chosen_ids) for e in same)  # per token
    # the two copies of an answer sit at other places of the packed row: equal up to rounding
    assert float(out.loss_sum.detach()) / 4 == pytest.approx(LN2, abs=preference_tolerance(2.0, mean, mean))


@pytest.mark.parametrize(("loss", "gamma"), [("simpo", 0.5), ("sigmoid", 0.5)])
def test_reference_none_losses_match_their_formulas(
    model_dir, pairs_file, tmp_path, accelerator, loss, gamma
):
    cfg = make_cfg(model_dir, pairs_file, tmp_path, reference="none", loss=loss, simpo_gamma=gamma, beta=0.1)
    task = DPOTask(cfg)
    policy = load_policy(task, model_dir)
    task.prepare(policy, accelerator)
    independent = make_tiny_llama(len(task.tokenizer))  # same seed, same weights, plain attention
    examples = list(task.train_examples()[:4])
    with torch.no_grad():
        out = task.loss(policy, task.collate(examples))
    expected = allowed = 0.0
    for e in examples:
        c = naive_logps(independent, e.pair.prompt_ids, e.pair.chosen_ids)
        r = naive_logps(independent, e.pair.prompt_ids, e.pair.rejected_ids)
        if loss == "simpo":
            c, r = c / len(e.pair.chosen_ids), r / len(e.pair.rejected_ids)
            z = 0.1 * (c - r) - gamma
        else:  # reference-free DPO: the reference's log-probs count as 0
            z = 0.1 * (c - r)
        expected += math.log1p(math.exp(-z))
        allowed += preference_tolerance(0.1, c, r)
    assert float(out.loss_sum) == pytest.approx(expected, abs=allowed)


# --- the reference cache ---------------------------------------------------------------------------------


def test_reference_cache_is_reused_and_invalidated(
    model_dir, pairs_file, tmp_path, accelerator, monkeypatch, smollm_tokenizer
):
    calls = count_passes(monkeypatch)
    cache = tmp_path / "cache"
    folder = tmp_path / "model"
    make_tiny_llama(len(smollm_tokenizer)).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    cfg = make_cfg(folder, pairs_file, tmp_path)

    first = DPOTask(cfg, cache_dir=cache)
    first.prepare(load_policy(first, folder), accelerator)
    assert first.reference_status == {"train": "computed", "eval": "computed"}
    assert calls == [len(first.train_examples()), len(first.eval_examples())]
    assert len(list(cache.glob("*.jsonl"))) == 2

    # a second run (new task, new policy object) reads the cache: no pass at all; a read is a use
    for table in cache.glob("*.jsonl"):  # (`zephyr cache prune --unused-days` goes by it)
        os.utime(table, (1e9, 1e9))
    calls.clear()
    second = DPOTask(cfg, cache_dir=cache)
    second.prepare(load_policy(second, folder), accelerator)
    assert second.reference_status == {"train": "cached", "eval": "cached"} and calls == []
    assert all(table.stat().st_mtime > 1e9 for table in cache.glob("*.jsonl"))
    batch = second.collate(list(second.train_examples()[:5]))
    assert torch.equal(
        batch.reference.chosen, first.collate(list(first.train_examples()[:5])).reference.chosen
    )
    report = json.loads((tmp_path / "run" / DATA_REPORT).read_text())
    assert report["reference_status"] == {"train": "cached", "eval": "cached"}

    # other data: the first record dropped -> other token ids -> recomputed (eval split unchanged: cached)
    records = pairs_file.read_text(encoding="utf-8").splitlines()
    fewer = tmp_path / "fewer.jsonl"
    kept = [r for r in records if json.loads(r)["prompt_id"] != first.train_examples()[0].pair.prompt_id]
    fewer.write_text("\n".join(kept) + "\n", encoding="utf-8")
    calls.clear()
    third = DPOTask(make_cfg(folder, pairs_file, tmp_path, train_data=str(fewer)), cache_dir=cache)
    third.prepare(load_policy(third, folder), accelerator)
    assert third.reference_status == {"train": "computed", "eval": "cached"}

    # other weights in the same folder -> recomputed, with different numbers
    changed = make_tiny_llama(len(smollm_tokenizer), seed=1)
    changed.save_pretrained(folder)
    calls.clear()
    fourth = DPOTask(cfg, cache_dir=cache)
    fourth.prepare(load_policy(fourth, folder), accelerator)
    assert fourth.reference_status == {"train": "computed", "eval": "computed"} and len(calls) == 2
    new = fourth.collate(list(fourth.train_examples()[:5])).reference.chosen
    assert not torch.allclose(new, batch.reference.chosen)

    # the same weights under another config (the norms' epsilon) -> recomputed, with different numbers
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    calls.clear()
    sixth = DPOTask(cfg, cache_dir=cache)
    sixth.prepare(load_policy(sixth, folder), accelerator)
    assert sixth.reference_status == {"train": "computed", "eval": "computed"} and len(calls) == 2
    assert not torch.allclose(sixth.collate(list(sixth.train_examples()[:5])).reference.chosen, new)
    (folder / "config.json").write_text(json.dumps(config))

    # other truncation lengths -> another fingerprint, even when no pair is cut
    calls.clear()
    fifth = DPOTask(make_cfg(folder, pairs_file, tmp_path, max_length=2048), cache_dir=cache)
    fifth.prepare(load_policy(fifth, folder), accelerator)
    assert fifth.reference_status == {"train": "computed", "eval": "computed"}


def test_a_cache_file_that_does_not_match_is_recomputed(
    model_dir, pairs_file, tmp_path, accelerator, monkeypatch
):
    calls = count_passes(monkeypatch)
    cache = tmp_path / "cache"
    cfg = make_cfg(model_dir, pairs_file, tmp_path, eval_fraction=0.0)
    task = DPOTask(cfg, cache_dir=cache)
    task.prepare(load_policy(task, model_dir), accelerator)
    (path,) = cache.glob("*.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # a cut file: one pair short
    calls.clear()
    again = DPOTask(cfg, cache_dir=cache)
    again.prepare(load_policy(again, model_dir), accelerator)
    assert again.reference_status == {"train": "computed"} and len(calls) == 1
    assert len(path.read_text().splitlines()) == len(lines)


def test_a_resumed_run_computes_the_reference_from_the_initial_weights(
    model_dir, pairs_file, tmp_path, accelerator
):
    cfg = make_cfg(model_dir, pairs_file, tmp_path, eval_fraction=0.0)
    fresh = DPOTask(cfg, cache_dir=tmp_path / "a")
    fresh.prepare(load_policy(fresh, model_dir), accelerator)
    resumed = DPOTask(cfg, cache_dir=tmp_path / "b", resume=True)  # empty cache
    trained = load_policy(resumed, model_dir)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    resumed.prepare(trained, accelerator)
    examples = list(fresh.train_examples()[:6])
    a = fresh.collate(examples).reference.chosen
    b = resumed.collate(examples).reference.chosen
    torch.testing.assert_close(a, b, atol=tolerance(a), rtol=0)


def test_sharded_reference_pass_equals_one_process(model_dir, pairs_file, tmp_path, monkeypatch, accelerator):
    """Two simulated processes: each scores its round-robin shard (the short one padded by repeating a pair),
    and the gathered rows come back in input order, each pair once."""
    import accelerate.utils

    from zephyr.stages.dpo import reference as ref_mod

    task = DPOTask(make_cfg(model_dir, pairs_file, tmp_path, eval_fraction=0.0))
    model = load_policy(task, model_dir)
    pairs = [e.pair for e in task.train_examples()[:5]]
    single = ref_mod.sharded_logps(model, pairs, batch_size=2, accelerator=accelerator)

    def row(i):  # a row as the other process would send it
        t = single
        return (
            i,
            float(t.chosen[i]),
            float(t.rejected[i]),
            int(t.chosen_tokens[i]),
            int(t.rejected_tokens[i]),
        )

    class Rank:
        def __init__(self, index):
            self.num_processes, self.process_index = 2, index
            self.device, self.autocast = accelerator.device, accelerator.autocast

    for rank, own, other in ((0, [0, 2, 4], [1, 3, 3]), (1, [1, 3, 3], [0, 2, 4])):
        sent = []

        def gather(rows, sent=sent, other=other):
            sent.extend(rows)
            return [*rows, *(row(i) for i in other)]

        monkeypatch.setattr(accelerate.utils, "gather_object", gather)
        out = ref_mod.sharded_logps(model, pairs, batch_size=2, accelerator=Rank(rank))
        assert [r[0] for r in sent] == own  # equal shard lengths: every process runs the same batches
        torch.testing.assert_close(out.chosen, single.chosen, atol=tolerance(single.chosen), rtol=0)
        torch.testing.assert_close(out.rejected, single.rejected, atol=tolerance(single.rejected), rtol=0)
        assert out.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]


def test_collate_before_prepare_says_so(model_dir, pairs_file, tmp_path):
    task = DPOTask(make_cfg(model_dir, pairs_file, tmp_path))
    with pytest.raises(RuntimeError, match="not prepared"):
        task.collate(list(task.train_examples()[:2]))


# --- data: truncation and bad pairs ----------------------------------------------------------------------


def pair_line(prompt_id, prompt, chosen, rejected, **extra):
    record = {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    record.update(extra)
    return json.dumps(record)


@pytest.fixture
def messy_file(tmp_path):
    lines = [
        pair_line("ok-1", "Capital of France?", "Paris.", "Berlin."),
        pair_line("same", "Capital of Spain?", "Madrid.", "Madrid."),
        pair_line("empty", "Capital of Italy?", "", "Milan."),
        pair_line("nan", "Capital of Peru?", "Lima.", "Quito.", score_rejected=float("nan")),
        pair_line("long-prompt", "Repeat: " + " ".join(["blah"] * 120), "Blah.", "No."),
        pair_line("long-answer", "Count.", " ".join(str(i) for i in range(200)), "No."),
        pair_line("ok-2", "Capital of Japan?", "Tokyo.", "Kyoto."),
    ]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_pairs_are_counted_under_skip_and_stop_the_run_under_error(
    model_dir, pairs_file, tmp_path, messy_file
):
    cfg = make_cfg(
        model_dir,
        messy_file,
        tmp_path,
        eval_fraction=0.0,
        on_bad_record="skip",
        max_length=128,
        max_prompt_length=64,
    )
    task = DPOTask(cfg)
    kept = [e.pair.prompt_id for e in task.train_examples()]
    assert kept == ["ok-1", "long-prompt", "long-answer", "ok-2"]
    assert len(task.stats.bad) == 3
    assert any("messy.jsonl:2: rejected[-1].content: identical" in b for b in task.stats.bad)
    assert any("messy.jsonl:3: chosen[-1].content: is empty" in b for b in task.stats.bad)
    assert any("messy.jsonl:4: score_rejected: must be a finite number, got nan" in b for b in task.stats.bad)
    # truncation: the long prompt keeps its last 64 tokens (128 would not fit it with its answer);
    # the long answer keeps its first 128 − len(prompt) tokens
    s = task.stats
    assert (s.truncated_prompts, s.truncated_chosen, s.truncated_rejected) == (1, 1, 0)
    by_id = {e.pair.prompt_id: e.pair for e in task.train_examples()}
    assert len(by_id["long-prompt"].prompt_ids) == 64
    assert task.tokenizer.decode(by_id["long-prompt"].prompt_ids).endswith(
        "blah<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = by_id["long-answer"]
    assert len(answer.prompt_ids) + len(answer.chosen_ids) == 128
    assert task.tokenizer.decode(answer.chosen_ids).startswith("0 1 2 3")
    assert "3 bad pairs skipped" in task.summary() and "1 prompts, 1 chosen" in task.summary()

    with pytest.raises(DataError, match=r"messy\.jsonl:2: rejected\[-1\]\.content: identical to chosen"):
        DPOTask(make_cfg(model_dir, messy_file, tmp_path, on_bad_record="error"))


# --- metric sums -----------------------------------------------------------------------------------------


def test_loss_and_metrics_are_sums_over_pairs(model_dir, pairs_file, tmp_path, accelerator):
    cfg = make_cfg(model_dir, pairs_file, tmp_path, reference="precomputed", beta=0.5)
    task = DPOTask(cfg, cache_dir=tmp_path / "cache")
    policy = load_policy(task, model_dir)
    task.prepare(policy, accelerator)
    with torch.no_grad():  # move the policy off the reference so the rewards are not all zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    a, b = task.train_examples()[:2]
    with torch.no_grad():
        both = task.loss(policy, task.collate([a, b]))
        one, two = task.loss(policy, task.collate([a])), task.loss(policy, task.collate([b]))
    assert task.units(task.collate([a, b])) == 2
    c, r = (float(both.metric_sums[f"logps/{k}"]) for k in ("chosen", "rejected"))
    # the policy's log-probs of a pair alone and beside another: equal up to rounding (β = 0.5 ≤ 1 for the
    # rewards, 1 for the log-probs themselves)
    allowed = preference_tolerance(1.0, c, r)
    assert float(both.loss_sum) == pytest.approx(float(one.loss_sum) + float(two.loss_sum), abs=allowed)
    assert set(both.metric_sums) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
    for key, value in both.metric_sums.items():
        assert float(value) == pytest.approx(
            float(one.metric_sums[key]) + float(two.metric_sums[key]), abs=allowed
        )
    for out in (one, two):  # margins = chosen − rejected; accuracy is 0 or 1 per pair
        m = {k: float(v) for k, v in out.metric_sums.items()}
        rounded = tolerance(m["rewards/chosen"]) + tolerance(m["rewards/rejected"])
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=rounded)
        assert m["rewards/accuracies"] == float(m["rewards/margins"] > 0)
        assert abs(m["rewards/chosen"]) > 1e-4


def test_dropout_is_disabled():
    model = make_tiny_llama(64, attention_dropout=0.3)
    model.model.layers[0].mlp.dropout = torch.nn.Dropout(0.5)
    disable_dropout(model)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    assert model.model.layers[0].mlp.dropout.p == 0.0


# --- end to end on the loop ------------------------------------------------------------------------------


def test_zephyr_dpo_command_end_to_end(model_dir, pairs_file, tmp_path, monkeypatch):
    from zephyr.cli import main

    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))  # where the default cache folders live
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"dpo:\n  model: {model_dir}\n  train_data: {pairs_file}\n  eval_fraction: 0.25\n"
        f"  output_dir: {tmp_path / 'run'}\n  precision: fp32\n",
        encoding="utf-8",
    )
    overrides = [
        "dpo.max_steps=3",
        "dpo.per_device_batch_size=2",
        "dpo.gradient_accumulation_steps=2",
        "dpo.learning_rate=1e-3",
        "dpo.warmup_ratio=0",
        "dpo.logging_steps=1",
    ]
    assert main(["dpo", str(recipe), *overrides]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3]
    allowed = step_zero_tolerance(0.1, train_lines[0])
    assert train_lines[0]["loss"] == pytest.approx(LN2, abs=allowed)  # step 0: policy = reference
    assert train_lines[-1]["loss"] < LN2  # it learns (lr 1e-3 on a tiny model)
    names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    )
    for key in names:
        assert key in train_lines[-1] and f"eval/{key}" in lines[-1]
    assert 0.0 <= lines[-1]["eval/rewards/accuracies"] <= 1.0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    report = json.loads((tmp_path / "run" / DATA_REPORT).read_text())
    assert report["train_pairs"] + report["eval_pairs"] == 16 and report["eval_pairs"] > 0
    assert report["reference"] == "precomputed" and report["bad_pairs"] == 0
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.jsonl"))) == 2


# --- shipped recipes -------------------------------------------------------------------------------------


def test_shipped_dpo_recipes_hold_the_published_numbers():
    from zephyr.core.config import load_recipe

    paper = load_recipe("recipes/zephyr-7b-beta/dpo.yaml").dpo
    assert (paper.beta, paper.learning_rate, paper.lr_scheduler, paper.warmup_ratio, paper.num_epochs) == (
        0.1,
        5e-7,
        "linear",
        0.1,
        3.0,
    )
    assert paper.global_batch_size == 32  # on any launch: the accumulation follows from the process count
    assert (paper.max_length, paper.max_prompt_length, paper.precision, paper.loss) == (
        1024,
        512,
        "bf16",
        "sigmoid",
    )
    assert (
        paper.train_data == "hf:HuggingFaceH4/ultrafeedback_binarized:train_prefs" and paper.ref_model is None
    )
    handbook = load_recipe("recipes/zephyr-7b-beta-handbook/dpo.yaml").dpo
    assert (handbook.beta, handbook.num_epochs, handbook.lr_scheduler, handbook.learning_rate) == (
        0.01,
        1.0,
        "cosine",
        5e-7,
    )
    assert handbook.global_batch_size == 128
    tiny = load_recipe("recipes/smollm2/dpo.yaml").dpo
    assert tiny.model == "asset:smollm2-135m-instruct" and tiny.train_data == PAIRS_FILE
    assert tiny.eval_fraction == 0.25 and tiny.reference == "precomputed"


def test_tiny_pairs_are_valid_with_multi_turn_prompts():
    from zephyr import io

    read = io.read_records(PAIRS_FILE, "pairs", on_bad_record="error")
    assert len(read.records) == 48 and not read.bad
    assert sum(len(r["chosen"]) > 2 for r in read.records) >= 10
    assert all(r["score_chosen"] > r["score_rejected"] for r in read.records)
