"""The command line hands each eval command's options to its runner by name: none may be dropped."""

from __future__ import annotations

import argparse
import functools
import inspect

import pytest

from zephyr.cli import build_parser
from zephyr.stages.alpaca_eval.run import run_alpaca_eval
from zephyr.stages.mc.run import run_mc
from zephyr.stages.mt_bench.run import run_mt_bench


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    ("command", "runner"), [("mt-bench", run_mt_bench), ("alpaca-eval", run_alpaca_eval), ("mc", run_mc)]
)
def test_every_eval_option_is_a_parameter_of_its_runner(command, runner):
    options = {a.dest for a in _subparser(build_parser(), "eval", command)._actions if a.dest != "help"}
    assert options <= set(inspect.signature(runner).parameters), options - set(
        inspect.signature(runner).parameters
    )


def test_eval_options_reach_the_runner(monkeypatch, tmp_path, capsys):
    import zephyr.stages.mt_bench.run as runner
    from zephyr.cli import main

    seen = {}

    @functools.wraps(runner.run_mt_bench)  # the real signature: the CLI passes what it names
    def fake(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(runner, "run_mt_bench", fake)
    argv = ["eval", "mt-bench", "--model", "m", "--judge", "j", "--out", str(tmp_path), "--limit", "3"]
    assert main([*argv, "--judge-mode", "logprobs"]) == 0
    assert capsys.readouterr().out == f"results in {tmp_path}/results.json\n"  # the fake returns nothing
    assert seen == {
        "model": "m",
        "judge": "j",
        "out": str(tmp_path),
        "questions": None,
        "limit": 3,
        "max_new_tokens": 1024,
        "judge_max_tokens": 2048,
        "baseline": None,
        "judge_mode": "logprobs",
    }


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
