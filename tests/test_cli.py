"""The command line: its commands come from the stage table, the flags of `zephyr eval ...` and `zephyr logps`
from the fields of each command's config dataclass (the shape below is the CLI's, written out by hand)."""

from __future__ import annotations

import argparse
import dataclasses
import functools

import pytest

from zephyr.cli import build_parser
from zephyr.core.config import EvalTarget, LogpsConfig, McEvalConfig, MtBenchEvalConfig, field_help
from zephyr.stages import STAGES, evaluations, stage


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


# Each command's flags: (required, {optional flag: default}); DESIGN.md §2 names --model, --data, --out.
SHAPE = {
    ("eval", "mc"): (
        {"--model", "--out"},
        {"--data": None, "--preset": None, "--fewshot-data": None, "--num-fewshot": None, "--max-length": None,
         "--batch-size": 16, "--limit": None},
    ),
    ("eval", "mt-bench"): (
        {"--model", "--out", "--judge"},
        {"--questions": None, "--limit": None, "--max-new-tokens": 1024, "--judge-max-tokens": 2048,
         "--baseline": None, "--judge-mode": "text"},
    ),
    ("eval", "alpaca-eval"): (
        {"--model", "--out", "--judge"},
        {"--instructions": "hf:tatsu-lab/alpaca_eval:eval", "--limit": None, "--max-new-tokens": 2048,
         "--annotator": "alpaca_eval_gpt4", "--judge-mode": "text", "--lc-data": None},
    ),
    ("logps",): (
        {"--model", "--data", "--out"},
        {"--chat-template": "auto", "--batch-size": 8, "--max-length": None, "--max-prompt-length": None,
         "--on-bad-record": "error", "--prefix-sharing": False},
    ),
}  # fmt: skip


@pytest.mark.parametrize("path", list(SHAPE))
def test_the_config_commands_keep_their_flags_and_defaults(path):
    required, optional = SHAPE[path]
    options = _options(_subparser(build_parser(), *path))
    assert {flag for flag, a in options.items() if a.required} == required
    assert {flag: a.default for flag, a in options.items() if not a.required} == optional


@pytest.mark.parametrize(
    ("path", "configs", "flag", "described"),
    [
        (("eval", "mc"), (EvalTarget, McEvalConfig), "--max-length", "left-truncate contexts to this many"),
        (("eval", "mt-bench"), (EvalTarget, MtBenchEvalConfig), "--judge-mode", "text: parse the judge's"),
        (("logps",), (LogpsConfig,), "--prefix-sharing", "run each pair's prompt once"),
    ],
)
def test_every_flag_is_a_config_field_described_where_it_is_defined(path, configs, flag, described):
    options = _options(_subparser(build_parser(), *path))
    helps = {name: text for cls in configs for name, text in field_help(cls).items()}
    fields = {f.name for cls in configs for f in dataclasses.fields(cls) if f.metadata.get("flag", True)}
    assert {a.dest for a in options.values()} == fields
    for action in options.values():  # the help is the field's comment in zephyr/core/config.py
        assert action.help == (helps[action.dest] or None), action.dest
    assert options[flag].help.startswith(described)


def test_the_commands_are_the_stage_tables():
    top = _subparser(build_parser())
    choices = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in choices._choices_actions}
    for s in STAGES:
        if s.command is not None and s.plan != "evaluation":
            assert helps[s.command] == s.help
    evals = next(a for a in _subparser(top, "eval")._actions if isinstance(a, argparse._SubParsersAction))
    assert list(evals.choices) == [e.command for e in evaluations()]
    assert [e.command for e in evaluations()] == ["mc", "mt-bench", "alpaca-eval"]
    assert "--resume" in _options(_subparser(top, "sft")) and "--resume" not in _options(
        _subparser(top, "curate")
    )
    assert stage("dpo").trains and not stage("feedback").trains


def test_eval_options_reach_the_runner_as_its_config(monkeypatch, tmp_path, capsys):
    import zephyr.stages.mt_bench.run as runner
    from zephyr.cli import main

    seen = {}

    @functools.wraps(runner.run_mt_bench)  # the real signature: the CLI passes what it names
    def fake(cfg, model, out, **generators):
        seen.update(cfg=cfg, model=model, out=out, generators=generators)

    monkeypatch.setattr(runner, "run_mt_bench", fake)
    argv = ["eval", "mt-bench", "--model", "m", "--judge", "j", "--out", str(tmp_path), "--limit", "3"]
    assert main([*argv, "--judge-mode", "logprobs"]) == 0
    assert capsys.readouterr().out == f"results in {tmp_path}/results.json\n"  # the fake returns nothing
    assert seen == {
        "cfg": MtBenchEvalConfig(judge="j", limit=3, judge_mode="logprobs"),
        "model": "m",
        "out": str(tmp_path),
        "generators": {},
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["eval", "mc", "--batch-size", "0", "--data", "x.jsonl"],
            "eval mc: --batch-size: must be >= 1, got 0",
        ),
        (
            ["eval", "mc"],
            "eval mc: --data: set data (an MC JSONL file: --data FILE) or preset (--preset NAME)",
        ),
        (
            ["eval", "mt-bench", "--judge", "hf:org/judge"],
            "eval mt-bench: --judge: model spec 'hf:org/judge': unknown backend 'hf'",
        ),
        (
            ["logps", "--data", "p.jsonl", "--max-length", "64", "--max-prompt-length", "64"],
            "logps: --max-prompt-length: must be < max_length (64)",
        ),
    ],
)
def test_a_bad_flag_is_refused_before_any_work_naming_the_flag(argv, message, tmp_path, capsys):
    from zephyr.cli import main

    assert main([*argv, "--model", "unused", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "overrides"),
    [
        (["run", "r.yaml", "--only", "eval/dpo", "dpo.beta=0.05"], ["dpo.beta=0.05"]),
        (["run", "r.yaml", "a.b=1", "--from", "sft", "c.d=2"], ["a.b=1", "c.d=2"]),
        (["sft", "r.yaml", "--resume", "sft.output_dir=out"], ["sft.output_dir=out"]),
    ],
)
def test_overrides_may_follow_the_options(argv, overrides):
    from zephyr.cli import parse_args

    assert parse_args(build_parser(), argv).overrides == overrides


def test_what_is_neither_an_option_nor_an_override_is_still_refused(capsys):
    from zephyr.cli import parse_args

    for argv in (["run", "r.yaml", "--only", "sft", "--nope"], ["run", "r.yaml", "--only", "sft", "stray"]):
        with pytest.raises(SystemExit) as stop:
            parse_args(build_parser(), argv)
        assert stop.value.code == 2
        assert "unrecognized arguments: " + argv[-1] in capsys.readouterr().err


def test_sigterm_unwinds_like_ctrl_c_and_says_so(monkeypatch, capsys):
    import os
    import signal

    import zephyr.cli

    finished = []

    def preempted(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler preempting the job
        finally:
            finished.append("cleaned up")  # what the command had open is closed on the way out

    monkeypatch.setattr(zephyr.cli, "_cmd_check", preempted)
    before = signal.getsignal(signal.SIGTERM)
    assert zephyr.cli.main(["check", "r.yaml"]) == 143
    assert capsys.readouterr().err == "terminated (SIGTERM)\n"
    assert finished == ["cleaned up"]
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


@pytest.mark.parametrize(
    ("results", "line"),
    [
        ({"metric": "acc_norm", "score": 0.452123, "acc": 0.4}, "acc_norm 0.4521; "),  # multiple choice
        ({"judge": "j", "score": 6.4, "turns": {}}, "score 6.4; "),  # MT-Bench single-answer grading
        ({"mode": "pairwise", "win_rate": 0.3636}, "win_rate 0.3636; "),  # MT-Bench pairwise
        ({"win_rate": 54.5, "standard_error": 4.5}, "win_rate 54.5; "),  # AlpacaEval
        ({"n": 0}, ""),
        (None, ""),
    ],
)
def test_eval_headline_by_hand(results, line):
    from zephyr.cli import headline

    assert headline(results) == line
