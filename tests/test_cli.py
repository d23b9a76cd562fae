"""The command line hands each eval command's options to its runner by name: none may be dropped."""

from __future__ import annotations

import argparse
import functools
import inspect

import pytest

from zephyr.cli import build_parser
from zephyr.evaluation.alpaca_eval_runner import run_alpaca_eval
from zephyr.evaluation.mt_bench_runner import run_mt_bench
from zephyr.evaluation.multiple_choice import run_mc


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


def test_eval_options_reach_the_runner(monkeypatch, tmp_path):
    import zephyr.evaluation.mt_bench_runner as runner
    from zephyr.cli import main

    seen = {}

    @functools.wraps(runner.run_mt_bench)  # the real signature: the CLI passes what it names
    def fake(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(runner, "run_mt_bench", fake)
    argv = ["eval", "mt-bench", "--model", "m", "--judge", "j", "--out", str(tmp_path), "--limit", "3"]
    assert main([*argv, "--judge-mode", "logprobs"]) == 0
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
