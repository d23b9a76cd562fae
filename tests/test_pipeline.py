"""`zephyr run`: the plan a recipe becomes, stage references, fingerprints, skip / resume / redo, --from and
--only, and a SIGKILL in the middle of a run that the rerun completes with the outputs of an uninterrupted one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import zephyr
from rounding import PATHS, tolerance
from zephyr.cli import main
from zephyr.core.config import load_recipe, pipeline_stage_names
from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.pipeline.manifest import fingerprint, input_parts, path_fingerprint, redo_reason
from zephyr.pipeline.run import build_plan, missing_inputs, parse_ref, resolve_refs, run_pipeline, stage_names
from zephyr.training.tracking import read_metrics

ROOT = Path(__file__).parents[1]
RAW = ROOT / "recipes" / "data" / "raw_dialogues.jsonl"
PAIRS = ROOT / "recipes" / "data" / "tiny_pairs.jsonl"
MC = ROOT / "recipes" / "data" / "mc_sample.jsonl"


def tiny_recipe(model_dir: Path, run_dir: Path, **extra) -> dict:
    """curate -> sft -> dpo (+ a DPO-without-SFT ablation) -> mc and sample answers, on the tiny model."""
    train = {"precision": "fp32", "per_device_batch_size": 4, "seed": 3, "learning_rate": 1e-3}
    recipe = {
        "run": {"output_dir": str(run_dir), "ablations": [{"name": "dpo_only", "start": "base"}]},
        "curate": {"input": str(RAW), "decontaminate": [], "test_fraction": 0.2, "near_dup_threshold": None},
        "sft": {
            "model": str(model_dir),
            "train_data": "stage:curate",
            "max_length": 128,
            "max_steps": 4,
            **train,
        },
        "dpo": {
            "model": "stage:sft",
            "train_data": str(PAIRS),
            "eval_fraction": 0.25,
            "max_samples": 16,
            "max_length": 128,
            "max_prompt_length": 64,
            "max_steps": 2,
            **train,
        },
        "eval": {
            "mc": [{"name": "arc", "data": str(MC), "limit": 4, "batch_size": 8}],
            "sample_prompts": ["Say hello."],
            "sample_max_new_tokens": 4,
        },
    }
    for key, value in extra.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def statuses(run_dir: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in manifest(run_dir)["stages"].items()}


def no_report(recipe: dict) -> dict:
    recipe["run"]["stages"] = ["curate", "sft", "dpo", "ablations", "eval"]
    return recipe


# ---------------------------------------------------------------------------------------------------------
# The plan (pure)


def test_parse_ref_defaults_to_the_main_output_and_names_bad_ones():
    assert parse_ref("stage:curate", "sft.train_data") == ("curate", "train")
    assert parse_ref("stage:feedback:test", "dpo.eval_data") == ("feedback", "test")
    with pytest.raises(ConfigError, match=r"sft.train_data: 'stage:curat'.*no stage 'curat'"):
        parse_ref("stage:curat", "sft.train_data")
    with pytest.raises(ConfigError, match=r"no output 'eval'.*train, test"):
        parse_ref("stage:curate:eval", "sft.eval_data")


def test_plan_of_a_full_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", tiny_recipe(tmp_path / "m", tmp_path / "run")))
    plan = build_plan(recipe, tmp_path / "run")
    assert [s.id for s in plan] == [
        "curate",
        "sft",
        "dpo",
        "ablations/dpo_only",
        "eval/base/mc-arc",
        "eval/base/samples",
        "eval/sft/mc-arc",
        "eval/sft/samples",
        "eval/dpo/mc-arc",
        "eval/dpo/samples",
        "eval/dpo_only/mc-arc",
        "eval/dpo_only/samples",
        "report",
    ]
    by_id = {s.id: s for s in plan}
    run = tmp_path / "run"
    assert by_id["sft"].config.train_data == str(run / "curate" / "train.jsonl")
    assert by_id["sft"].config.output_dir == str(run / "sft")
    assert by_id["dpo"].config.model == str(run / "sft" / "final") and by_id["dpo"].upstream == ["sft"]
    ablation = by_id["ablations/dpo_only"].config
    assert ablation.model == str(tmp_path / "m") and ablation.ref_model is None  # DPO without dSFT
    assert ablation.output_dir == str(run / "ablations" / "dpo_only")
    assert by_id["eval/dpo_only/mc-arc"].upstream == ["ablations/dpo_only"]
    assert by_id["eval/base/mc-arc"].upstream == []


def test_empty_inputs_are_wired_to_the_stage_before(tmp_path):
    recipe = load_recipe(
        None, ["curate.input=x.jsonl", "sft.model=m", "dpo.model=stage:sft", "feedback.generators=[]"]
    )
    plan = {s.id: s for s in build_plan(recipe, tmp_path)}
    assert plan["sft"].config.train_data == str(tmp_path / "curate" / "train.jsonl")
    assert plan["feedback"].config.prompts == str(tmp_path / "curate" / "train.jsonl")
    assert plan["dpo"].config.train_data == str(tmp_path / "feedback" / "pairs.jsonl")
    assert plan["dpo"].upstream == ["sft", "feedback"]


def test_a_reference_to_a_stage_the_run_lacks_is_an_error(tmp_path):
    recipe = load_recipe(None, ["sft.model=m", "sft.train_data=stage:curate"])
    with pytest.raises(ConfigError, match=r"sft.train_data: 'stage:curate' reads stage 'curate'"):
        build_plan(recipe, tmp_path)
    cfg = load_recipe(None, ["dpo.model=stage:sft", "dpo.train_data=p.jsonl"]).dpo
    with pytest.raises(ConfigError, match=r"dpo\.model"):
        resolve_refs(cfg, "dpo", tmp_path, set())


def test_run_stages_picks_and_orders_and_refuses_missing_sections():
    recipe = load_recipe(None, ["sft.train_data=x", "curate.input=y", "run.stages=[sft, curate]"])
    assert stage_names(recipe) == ["curate", "sft"]
    recipe = load_recipe(None, ["sft.train_data=x", "run.stages=[sft, dpo]"])
    with pytest.raises(ConfigError, match=r"run\.stages: dpo listed"):
        stage_names(recipe)


def test_ablation_overrides_are_checked_when_the_recipe_loads():
    with pytest.raises(ConfigError, match=r"run.ablations\[0\] \(b\): dpo.beta: must be > 0"):
        load_recipe(None, ["dpo.train_data=p", "run.ablations=[{name: b, overrides: [beta=0]}]"])
    with pytest.raises(ConfigError, match="bta"):
        load_recipe(None, ["dpo.train_data=p", "run.ablations=[{name: b, overrides: [bta=0.1]}]"])
    with pytest.raises(ConfigError, match="name the run's own models"):
        load_recipe(None, ["dpo.train_data=p", "run.ablations=[{name: sft}]"])


def test_fingerprint_follows_config_upstream_and_file_content(tmp_path):
    base = fingerprint("sft", {"lr": 1}, {"curate": "a"}, {})
    assert base == fingerprint("sft", {"lr": 1}, {"curate": "a"}, {})
    assert base != fingerprint("sft", {"lr": 2}, {"curate": "a"}, {})
    assert base != fingerprint("sft", {"lr": 1}, {"curate": "b"}, {})
    f = tmp_path / "data.jsonl"
    f.write_text("one\n")
    first = path_fingerprint(f)
    f.write_text("two\n")
    assert path_fingerprint(f) != first
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("x")
    before = path_fingerprint(folder)
    (folder / "sub" / "a.txt").write_text("y")
    assert path_fingerprint(folder) != before


def test_redo_reason_by_hand():
    before = {"config": "a", "upstream sft": "b", "file train_data": "c"}
    assert redo_reason(before, before) == ""
    assert redo_reason(before, {**before, "config": "x"}) == "config changed"
    both = {**before, "upstream sft": "x", "file train_data": "y"}
    assert redo_reason(before, both) == "train_data changed, sft redone"
    assert redo_reason(before, {**before, "upstream curate": "z"}) == "curate redone"  # a new input
    assert redo_reason({}, before) == ""  # recorded without parts: nothing to tell
    parts = input_parts({"beta": 0.1}, {"sft": "f" * 64}, {"train_data": "e" * 64})
    assert parts == {"config": parts["config"], "upstream sft": "f" * 16, "file train_data": "e" * 16}
    assert input_parts({"beta": 0.2}, {}, {})["config"] != parts["config"]


def test_a_stage_reference_outside_zephyr_run_exits_2(tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", {"sft": {"train_data": "stage:curate"}})
    assert main(["sft", str(recipe)]) == 2
    assert "sft.train_data: 'stage:curate' names another stage's output" in capsys.readouterr().err


def test_unknown_stage_for_from_and_only(tmp_path, tiny_model_dir, capsys):
    recipe = write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "run"))
    assert main(["run", str(recipe), "--only", "sfft"]) == 2
    assert "--only sfft: no such stage" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran


# ---------------------------------------------------------------------------------------------------------
# Running


@pytest.mark.slow
def test_run_skips_done_stages_redoes_changed_ones_and_honours_only_and_from(
    tmp_path, tiny_model_dir, one_thread, capsys
):
    run_dir = tmp_path / "run"
    path = write(tmp_path / "r.yaml", no_report(tiny_recipe(tiny_model_dir, run_dir)))
    run_pipeline(load_recipe(path), str(path))
    first = manifest(run_dir)
    assert set(statuses(run_dir).values()) == {"done"}
    assert len(first["stages"]) == 12 and first["versions"]["torch"] == torch.__version__
    for model in ("base", "sft", "dpo", "dpo_only"):
        results = json.loads((run_dir / "eval" / model / "mc-arc" / "results.json").read_text())
        assert results["counts"]["items"] == 4
        samples = [
            json.loads(x) for x in (run_dir / "eval" / model / "samples.jsonl").read_text().splitlines()
        ]
        assert [s["prompt"] for s in samples] == ["Say hello."] and samples[0]["model"] == model
    assert (run_dir / "sft" / "final" / "config.json").is_file()
    assert (run_dir / "ablations" / "dpo_only" / "final" / "config.json").is_file()
    dpo_cfg = yaml.safe_load((run_dir / "dpo" / "resolved_config.yaml").read_text())
    assert dpo_cfg["model"] == str(run_dir / "sft" / "final")

    assert {record["zephyr"] for record in first["stages"].values()} == {zephyr.__version__}

    # Rerun: everything is done, nothing is touched; a step made by another zephyr is kept, with a note.
    first["stages"]["sft"]["zephyr"] = "0.0.1"
    (run_dir / "manifest.json").write_text(json.dumps(first), encoding="utf-8")
    capsys.readouterr()
    run_pipeline(load_recipe(path), str(path))
    again = manifest(run_dir)
    assert {k: v["started"] for k, v in again["stages"].items()} == {
        k: v["started"] for k, v in first["stages"].items()
    }
    lines = capsys.readouterr().out.splitlines()
    note = f"sft: done, skipped (made by zephyr 0.0.1, this is {zephyr.__version__}: --from sft redoes it)"
    assert any(line.endswith(note) for line in lines)
    assert any(line.endswith("dpo: done, skipped") for line in lines)

    # A changed dpo section redoes dpo, the ablation built from it and their evals; dSFT stays. Each says why.
    capsys.readouterr()
    run_pipeline(load_recipe(path, ["dpo.beta=0.2"]), str(path))
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith(" dpo: running (config changed)") for line in lines)
    assert any(line.endswith(" eval/dpo/mc-arc: running (dpo redone)") for line in lines)
    assert any(line.endswith(" ablations/dpo_only: running (config changed)") for line in lines)
    changed = manifest(run_dir)["stages"]
    redone = {k for k in changed if changed[k]["started"] != first["stages"][k]["started"]}
    assert redone == {
        "dpo",
        "ablations/dpo_only",
        "eval/dpo/mc-arc",
        "eval/dpo/samples",
        "eval/dpo_only/mc-arc",
        "eval/dpo_only/samples",
    }
    assert yaml.safe_load((run_dir / "dpo" / "resolved_config.yaml").read_text())["beta"] == 0.2

    # --only runs just that stage's steps; --from redoes it and everything after.
    before = manifest(run_dir)["stages"]
    run_pipeline(load_recipe(path, ["dpo.beta=0.2"]), str(path), only="eval/sft", start_from="eval/sft")
    assert any(
        line.endswith(" eval/sft/mc-arc: running (--from)") for line in capsys.readouterr().out.splitlines()
    )
    after = manifest(run_dir)["stages"]
    assert {k for k in after if after[k]["started"] != before[k]["started"]} == {
        "eval/sft/mc-arc",
        "eval/sft/samples",
    }


def test_a_redone_stage_outdates_the_finished_steps_that_read_it(
    tmp_path, tiny_model_dir, one_thread, capsys
):
    """dpo redone alone (--only) under a new beta: the evaluations of the old dDPO model and the report are
    marked stale and their outputs removed, so that no report shows the old model's numbers as the new one's."""
    from zephyr.stages.report.run import collect_report

    run_dir = tmp_path / "run"
    path = write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, run_dir))
    run_pipeline(load_recipe(path), str(path))
    capsys.readouterr()
    run_pipeline(load_recipe(path, ["dpo.beta=0.3"]), str(path), only="dpo")
    now = statuses(run_dir)
    assert now["dpo"] == "done"
    assert {k for k, v in now.items() if v == "stale"} == {"eval/dpo/mc-arc", "eval/dpo/samples", "report"}
    assert not (run_dir / "eval" / "dpo" / "mc-arc").exists()
    assert not (run_dir / "eval" / "dpo" / "samples.jsonl").exists()
    assert (run_dir / "eval" / "sft" / "mc-arc" / "results.json").is_file()  # not downstream of dpo
    record = manifest(run_dir)["stages"]["eval/dpo/mc-arc"]
    assert record["error"] == "dpo was redone after it" and record["outputs"] == []
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'report.html'} is out of date (zephyr report {run_dir} rewrites it)" in out
    missing = {m["path"]: m["reason"] for m in collect_report(run_dir)["missing"]}
    assert missing["eval/dpo/mc-arc/results.json"] == (
        "stage eval/dpo/mc-arc is out of date (dpo was redone after it)"
    )


def curate_and_report(run_dir: Path) -> dict:
    """The cheapest real pipeline: curation (no model) and the report."""
    curate = {"input": str(RAW), "decontaminate": [], "test_fraction": 0.2, "near_dup_threshold": None}
    return {"run": {"output_dir": str(run_dir)}, "curate": curate}


def test_a_done_step_whose_outputs_are_gone_is_redone_saying_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = write(tmp_path / "r.yaml", curate_and_report(run_dir))
    run_pipeline(load_recipe(path), str(path))
    stages = manifest(run_dir)["stages"]
    written = ["curate/train.jsonl", "curate/test.jsonl", "curate/curation_report.json"]
    assert stages["curate"]["outputs"] == written  # the stage table's outputs, as written
    assert stages["report"]["outputs"] == ["report.html", "report.json", "report.md"]
    train = (run_dir / "curate" / "train.jsonl").read_bytes()

    import shutil

    shutil.rmtree(run_dir / "curate")  # what the next step reads is gone: the step is not done
    capsys.readouterr()
    run_pipeline(load_recipe(path), str(path))
    lines = capsys.readouterr().out.splitlines()
    assert f"[1/2] curate: running (outputs missing: {', '.join(written)})" in lines
    assert "[2/2] report: running" in lines  # it read the old curation: outdated by the redo
    assert (run_dir / "curate" / "train.jsonl").read_bytes() == train
    assert set(statuses(run_dir).values()) == {"done"}

    (run_dir / "report.html").unlink()
    run_pipeline(load_recipe(path), str(path))
    lines = capsys.readouterr().out.splitlines()
    assert "[1/2] curate: done, skipped" in lines
    assert "[2/2] report: running (outputs missing: report.html)" in lines
    assert (run_dir / "report.html").is_file()


def test_the_report_section_is_part_of_the_reports_fingerprint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = write(tmp_path / "r.yaml", curate_and_report(run_dir))
    run_pipeline(load_recipe(path), str(path))
    capsys.readouterr()
    run_pipeline(load_recipe(path, ["report.paper_reference=true"]), str(path))
    lines = capsys.readouterr().out.splitlines()
    assert "[1/2] curate: done, skipped" in lines
    assert "[2/2] report: running (config changed)" in lines
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["recipe"]["report"] == {
        "paper_reference": True,
        "references": [],
        "regression": True,
    }  # rewritten


def test_only_refuses_a_stage_whose_inputs_are_not_done(tmp_path, tiny_model_dir):
    path = write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(ZephyrError, match="--only dpo: needs sft done first"):
        run_pipeline(load_recipe(path), str(path), only="dpo")


def test_a_failed_stage_is_recorded_and_the_run_stops(tmp_path, tiny_model_dir):
    recipe = no_report(tiny_recipe(tiny_model_dir, tmp_path / "run"))
    (tmp_path / "broken.jsonl").write_text("not json\n")
    recipe["sft"]["train_data"] = str(tmp_path / "broken.jsonl")
    path = write(tmp_path / "r.yaml", recipe)
    with pytest.raises(ZephyrError):
        run_pipeline(load_recipe(path), str(path))
    record = manifest(tmp_path / "run")["stages"]["sft"]
    assert record["status"] == "failed" and "broken.jsonl" in record["error"]
    assert "dpo" not in manifest(tmp_path / "run")["stages"]


def test_missing_inputs_stop_a_run_before_its_first_stage_naming_every_key(tmp_path, tiny_model_dir, capsys):
    recipe = no_report(tiny_recipe(tiny_model_dir, tmp_path / "run"))
    recipe["sft"]["train_data"] = "nope/train.jsonl"
    recipe["eval"]["mc"][0]["data"] = str(tmp_path / "mc.jsonl")
    recipe["dpo"]["ref_model"] = "./no-model"  # a path; a bare org/name would be a hub id
    recipe["generate"] = {"seeds": "nope/seeds"}  # not among the run's stages: not checked
    path = write(tmp_path / "r.yaml", recipe)
    expected = [
        "dpo.ref_model: no such file or folder: ./no-model",
        f"eval.mc[0].data: no such file or folder: {tmp_path / 'mc.jsonl'}",
        "sft.train_data: no such file or folder: nope/train.jsonl",
    ]
    assert missing_inputs(load_recipe(path)) == expected
    with pytest.raises(ConfigError, match=r"^3 input\(s\) missing \(relative paths are read from "):
        run_pipeline(load_recipe(path), str(path))
    assert not (tmp_path / "run" / "manifest.json").exists()  # nothing started

    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: 3 input(s) missing") and all(line in err for line in expected)


# ---------------------------------------------------------------------------------------------------------
# SIGKILL in the middle of a run


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    def recipe_for(run_dir: Path) -> Path:
        recipe = tiny_recipe(tiny_model_dir, run_dir)
        recipe["run"]["stages"] = ["curate", "sft", "dpo", "eval"]
        recipe["sft"].update({"max_steps": 12, "save_steps": 2, "per_device_batch_size": 1})
        recipe["eval"] = {"mc": [{"name": "arc", "data": str(MC), "limit": 4}]}
        return write(tmp_path / f"{run_dir.name}.yaml", recipe)

    straight = tmp_path / "straight"
    assert main(["run", str(recipe_for(straight))]) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "zephyr", "run", str(recipe_for(killed))]
    # The offline settings of tests/conftest.py are in os.environ: the child inherits them.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "sft" / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert statuses(killed) == {"curate": "done", "sft": "running"}
    curate_started = manifest(killed)["stages"]["curate"]["started"]

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "curate: done, skipped" in rerun.stdout and "sft: resuming" in rerun.stdout
    stages = manifest(killed)["stages"]
    assert stages["curate"]["started"] == curate_started and stages["sft"]["attempts"] == 2
    assert set(statuses(killed).values()) == {"done"}

    for rel in ("curate/train.jsonl", "curate/test.jsonl"):
        assert (killed / rel).read_bytes() == (straight / rel).read_bytes()
    for stage in ("sft", "dpo"):
        expected = load_file(straight / stage / "final" / "model.safetensors")
        got = load_file(killed / stage / "final" / "model.safetensors")
        # two processes: up to the rounding of the stage's steps (tests/rounding.py)
        steps = sum("loss" in m for m in read_metrics(straight / stage / "metrics.jsonl"))
        allowed = tolerance(list(expected.values()), roundings=PATHS * steps)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=allowed, rtol=0, msg=f"{stage}: {key}")
    for model in ("base", "sft", "dpo"):
        got = json.loads((killed / "eval" / model / "mc-arc" / "results.json").read_text())
        expected = json.loads((straight / "eval" / model / "mc-arc" / "results.json").read_text())
        assert got["acc_norm"] == expected["acc_norm"]


@pytest.mark.slow
def test_launcher_runs_training_stages_in_a_process_of_their_own(tmp_path, tiny_model_dir, capfd):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run")
    recipe["run"].update({"stages": ["curate", "sft"], "launcher": sys.executable})
    path = write(tmp_path / "r.yaml", recipe)
    run_pipeline(load_recipe(path), str(path))
    out = capfd.readouterr().out
    assert f"$ {sys.executable} -m zephyr sft {tmp_path / 'run' / 'sft' / 'launch_recipe.yaml'}" in out
    assert (tmp_path / "run" / "sft" / "final" / "config.json").is_file()
    assert statuses(tmp_path / "run") == {"curate": "done", "sft": "done"}


@pytest.mark.slow
def test_an_api_key_is_never_written_to_the_run_folder_caches_or_output(
    tmp_path, tiny_model_dir, capfd, monkeypatch
):
    from zephyr.generation.local import LocalGenerator
    from zephyr.models.assets import cache_home
    from zephyr.models.load import load_model, load_tokenizer
    from zephyr.serve import start_server

    key = "sk-zephyr-PLANTED-7f3a9c"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    generator = LocalGenerator(
        load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), model_id="tiny"
    )
    server, _, url = start_server(generator, api_key=key, max_tokens_limit=16)
    try:
        endpoint = f"openai:tiny@{url}"
        recipe = tiny_recipe(tiny_model_dir, tmp_path / "run")
        recipe["run"] = {"output_dir": str(tmp_path / "run"), "base_model": str(tiny_model_dir)}
        recipe["run"]["stages"] = ["feedback", "eval", "report"]
        gens = [{"model": endpoint, "name": f"g{i}", "max_tokens": 8, "temperature": 1.0} for i in range(2)]
        recipe["feedback"] = {
            "prompts": str(ROOT / "recipes" / "data" / "feedback_prompts.jsonl"),
            "num_prompts": 2,
            "completions_per_prompt": 2,
            "generators": gens,
            "judge": {"model": {"model": endpoint, "max_tokens": 8}, "scale": 5},
        }
        recipe["eval"] = {
            "mt_bench": {"judge": endpoint, "limit": 1, "max_new_tokens": 4, "judge_max_tokens": 8},
            "alpaca_eval": {
                "judge": endpoint,
                "instructions": str(ROOT / "recipes" / "data" / "alpaca_sample.jsonl"),
                "limit": 1,
                "max_new_tokens": 4,
            },
        }
        path = write(tmp_path / "r.yaml", recipe)
        run_pipeline(load_recipe(path), str(path))
    finally:
        server.close()
    assert statuses(tmp_path / "run")["eval/base/mt-bench"] == "done"
    answers = [
        json.loads(x) for x in (tmp_path / "run" / "eval" / "base" / "mt-bench" / "answers.jsonl").open()
    ]
    assert answers and all(a["ok"] if "ok" in a else a.get("turns") for a in answers)  # the key was accepted
    captured = capfd.readouterr()
    assert key not in captured.out and key not in captured.err
    searched = [p for root in (tmp_path / "run", cache_home()) for p in root.rglob("*") if p.is_file()]
    assert len(searched) > 10
    leaks = [str(p) for p in searched if key.encode() in p.read_bytes()]
    assert leaks == []


def test_the_recipe_sections_are_the_stage_tables():
    """The stage table names each stage's config; the recipe schema, the eval section and the training loop's
    file names agree with it (the table cannot import the loop: that would import torch)."""
    import typing

    from zephyr.core.config import EvalConfig, Recipe
    from zephyr.stages import evaluations, pipeline_stages, stage
    from zephyr.training.checkpoint import FINAL_DIR
    from zephyr.training.tracking import METRICS_FILE

    sections = typing.get_type_hints(Recipe)
    for s in pipeline_stages():
        if s.plan != "ablations":
            assert sections[s.name] == s.config | None, s.name
    evals = typing.get_type_hints(EvalConfig)
    assert {e.name: evals[e.name] for e in evaluations()} == {
        "mc": list[stage("mc").config],
        "mt_bench": stage("mt_bench").config | None,
        "alpaca_eval": stage("alpaca_eval").config | None,
    }
    for name in ("sft", "dpo", "ablations"):
        assert (stage(name).output("model"), stage(name).output("metrics")) == (FINAL_DIR, METRICS_FILE)
    assert [s.name for s in pipeline_stages()] == [
        "generate", "curate", "sft", "feedback", "dpo", "ablations", "eval", "report"
    ]  # fmt: skip
    # what `run.stages` may name, checked when a recipe loads (core cannot read the table)
    assert pipeline_stage_names() == [s.name for s in pipeline_stages()]


def test_run_stages_are_checked_when_the_recipe_loads(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["sft.train_data=x", "run.stages=[sft, sftt]"])
    assert str(err.value) == (
        "<command line>: run.stages[1]: must be one of generate, curate, sft, feedback, dpo, ablations, eval, "
        "report, got 'sftt' (did you mean 'sft'?)"
    )
    path = write(tmp_path / "r.yaml", {"run": {"stages": ["sftt"]}, "sft": {"train_data": str(PAIRS)}})
    assert path.read_text().splitlines()[2] == "  - sftt"  # line 3
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:3: run.stages[0]: must be one of generate, ")


def test_missing_inputs_are_the_typed_fields_of_every_section(tmp_path):
    """Path-typed fields the old name-based check missed (AlpacaEval's lc_data, the report's reference rows)
    and the run's base model, written as a folder."""
    recipe = load_recipe(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            "run.base_model=./no-base",
            "eval.alpaca_eval.lc_data=./no-gamed.csv",
            "eval.mt_bench.baseline=org/answers.jsonl",  # a hub id or a file: not required here
            "report.references=[./no-rows.yaml]",
        ],
    )
    assert missing_inputs(recipe) == [
        "eval.alpaca_eval.lc_data: no such file or folder: ./no-gamed.csv",
        "report.references[0]: no such file or folder: ./no-rows.yaml",
        "run.base_model: no such file or folder: ./no-base",
    ]


def test_a_launcher_naming_its_process_count_checks_every_training_batch_before_the_run(tmp_path, capsys):
    from zephyr.pipeline.run import launch_processes

    assert launch_processes("accelerate launch --config_file z.yaml --num_processes 8") == 8
    assert launch_processes("accelerate launch --num-processes=2") == 2
    assert launch_processes("torchrun") is None and launch_processes(None) is None
    with pytest.raises(
        ConfigError, match=r"run.launcher: --num_processes: expected a number of processes, got 'x'"
    ):
        launch_processes("accelerate launch --num_processes x")

    batches = ["sft.per_device_batch_size=1", "sft.global_batch_size=8", "sft.train_data=t.jsonl"]
    launcher = "run.launcher='accelerate launch --num_processes 3'"
    with pytest.raises(ConfigError) as err:
        build_plan(load_recipe(None, [*batches, launcher]), tmp_path / "run")
    assert str(err.value) == (
        "sft.global_batch_size: 8 is not divisible by per_device_batch_size 1 × 3 processes = 3; process "
        "counts that fit: 1, 2, 4, 8 (or change per_device_batch_size)"
    )
    assert build_plan(
        load_recipe(None, [*batches, "run.launcher='accelerate launch --num_processes 4'"]), tmp_path
    )
    ablation = [
        "dpo.train_data=p.jsonl", "dpo.per_device_batch_size=1", "dpo.global_batch_size=8",
        "run.ablations=[{name: b, overrides: [global_batch_size=6]}]",
    ]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        build_plan(load_recipe(None, [*ablation, "run.launcher='x --num_processes 4'"]), tmp_path / "run")
    assert str(err.value).startswith(
        "run.ablations[0] (b): dpo.global_batch_size: 6 is not divisible by per_device_batch_size 1 × "
        "4 processes = 4; process counts that fit: 1, 2, 3, 6"
    )
    path = write(
        tmp_path / "r.yaml",
        {
            "run": {"launcher": "a --num_processes 3"},
            "sft": {"train_data": str(PAIRS), "per_device_batch_size": 1, "global_batch_size": 8},
        },
    )
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: sft.global_batch_size: 8 is not divisible")


def test_zephyr_check_resolves_a_pipelines_stage_references(tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", {"run": {}, "sft": {"train_data": "stage:curate"}})
    assert main(["check", str(recipe)]) == 2
    assert capsys.readouterr().err == (
        f"error: {recipe}: sft.train_data: 'stage:curate' reads stage 'curate', which this run does not have\n"
    )
    recipe = write(tmp_path / "ok.yaml", {"run": {}, "curate": {"input": str(RAW)}, "sft": {}})
    assert main(["check", str(recipe)]) == 0  # sft.train_data is wired to the curated set
    capsys.readouterr()
    # without `run:` the stage commands read the recipe, and they resolve no stage reference
    recipe = write(tmp_path / "alone.yaml", {"dpo": {"model": "stage:sft", "train_data": str(PAIRS)}})
    assert main(["check", str(recipe)]) == 2
    assert capsys.readouterr().err == (
        f"error: {recipe}: dpo.model: 'stage:sft' names another stage's output, which only `zephyr run` "
        "resolves; run the pipeline, or give a path\n"
    )
