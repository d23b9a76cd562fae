"""The `zephyr` command: parses arguments and hands off to the stage modules.

Stage modules are imported inside each handler so that `zephyr check` and `zephyr --help` stay fast
(no torch import) and a missing optional extra only matters to the command that needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from zephyr.core.errors import ZephyrError


@contextlib.contextmanager
def _naming(recipe: str) -> Iterator[None]:
    """Config errors found past loading (a pipeline's stage references) still name the recipe file."""
    from zephyr.core.errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        if str(exc).startswith(str(recipe)):
            raise
        raise ConfigError(f"{recipe}: {exc}") from None


def _cmd_check(args: argparse.Namespace) -> int:
    from zephyr.core.config import load_recipe
    from zephyr.pipeline.run import build_plan, check_inputs

    recipe = load_recipe(args.recipe, args.overrides)
    with _naming(args.recipe):
        if recipe.run is not None:  # a pipeline: its stage references and stages must resolve too
            from pathlib import Path

            build_plan(recipe, Path(recipe.run.output_dir))
        else:  # stage commands: no `stage:` reference resolves outside `zephyr run`
            for name, section_cfg in vars(recipe).items():
                if section_cfg is not None:
                    _refuse_stage_refs(section_cfg, name, args.recipe)
        check_inputs(recipe)  # every local file it reads exists
        batches = _batch_lines(recipe, 1 if args.num_processes is None else args.num_processes)
    sections = [name for name, value in vars(recipe).items() if value is not None]
    print(f"{args.recipe}: ok ({', '.join(sections) or 'no sections'})")
    for line in batches:
        assumed = " (1 process assumed: --num-processes N for N)" if args.num_processes is None else ""
        print(f"  {line}{assumed}")
    return 0


def _batch_lines(recipe: Any, processes: int) -> list[str]:
    """Each training section's global batch split over `processes`; an indivisible one is a ConfigError."""
    from zephyr.core.config import batch_plan
    from zephyr.core.errors import ConfigError

    if processes < 1:
        raise ConfigError(f"--num-processes: must be at least 1, got {processes}")
    sections = [(name, getattr(recipe, name)) for name in ("sft", "dpo")]
    return [f"{name}: {batch_plan(cfg, processes, name)}" for name, cfg in sections if cfg is not None]


def _cmd_assets(args: argparse.Namespace) -> int:
    from zephyr.models import assets

    if args.assets_command == "list":
        for info in assets.list_assets():
            state = "fetched" if assets.is_fetched(info.name) else "not fetched"
            print(f"{info.name:28s} {state:12s} {info.description}")
        return 0
    path = assets.fetch(args.name, force=args.force)
    print(path)  # contract: the asset's folder is the last line of stdout
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from zephyr import io

    if args.data_command == "validate":
        result = io.read_records(args.file, args.format, on_bad_record=args.on_bad_record)
        print(io.summarize(result, args.file, args.format))
        return 0
    from zephyr.data import chat
    from zephyr.models.load import load_tokenizer

    result = io.read_records(args.file, "auto", on_bad_record="skip", limit=args.limit)
    tokenizer = load_tokenizer(args.tokenizer, chat_template=args.chat_template)
    color = sys.stdout.isatty() and not args.no_color
    for record in result.records:
        print(chat.show_record(tokenizer, record, color=color))
    return 0


def _recipe_section(args: argparse.Namespace, name: str):
    from zephyr.core.config import load_recipe, section

    cfg = section(load_recipe(args.recipe, args.overrides), name, args.recipe)
    _refuse_stage_refs(cfg, name, args.recipe)
    return cfg


def _refuse_stage_refs(cfg: Any, name: str, recipe: str) -> None:
    import dataclasses

    from zephyr.core.errors import ConfigError

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and value.startswith("stage:"):
            raise ConfigError(
                f"{recipe}: {name}.{f.name}: {value!r} names another stage's output, which only "
                f"`zephyr run` resolves; run the pipeline, or give a path"
            )


def _cmd_sft(args: argparse.Namespace) -> int:
    cfg = _recipe_section(args, "sft")
    from zephyr.stages.sft.run import run_sft

    run_sft(cfg, resume=args.resume)
    return 0


def _cmd_dpo(args: argparse.Namespace) -> int:
    cfg = _recipe_section(args, "dpo")
    from zephyr.stages.dpo.run import run_dpo

    run_dpo(cfg, resume=args.resume)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    cfg = _recipe_section(args, "generate")
    from zephyr.stages.generate.run import run_generate

    run_generate(cfg)
    return 0


def _cmd_feedback(args: argparse.Namespace) -> int:
    cfg = _recipe_section(args, "feedback")
    from zephyr.stages.feedback.run import run_feedback

    run_feedback(cfg)
    return 0


def _cmd_curate(args: argparse.Namespace) -> int:
    cfg = _recipe_section(args, "curate")
    from zephyr.stages.curate.run import run_curate

    run_curate(cfg)
    return 0


def _cmd_logps(args: argparse.Namespace) -> int:
    from zephyr.training.logps import run_logps

    run_logps(
        model=args.model,
        data=args.data,
        out=args.out,
        chat_template=args.chat_template,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        on_bad_record=args.on_bad_record,
        prefix_sharing=args.prefix_sharing,
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "mt-bench":
        from zephyr.stages.mt_bench.run import run_mt_bench as runner
    elif args.eval_command == "alpaca-eval":
        from zephyr.stages.alpaca_eval.run import run_alpaca_eval as runner
    else:
        from zephyr.stages.mc.run import run_mc as runner
    results = _call_with_args(runner, args)
    print(f"{headline(results)}results in {args.out}/results.json")
    return 0


def headline(results: object) -> str:
    """An evaluation's main number for the terminal: `acc_norm 0.4521; `, `score 6.40; `, `win_rate 54.5; `."""
    if not isinstance(results, dict):
        return ""
    for key in ("score", "win_rate"):
        value = results.get(key)
        if isinstance(value, int | float):
            name = results.get("metric", key) if key == "score" else key
            return f"{name} {value:.4g}; "
    return ""


def _call_with_args(runner: Callable[..., object], args: argparse.Namespace) -> object:
    """Call a runner with the parsed options named like its parameters (each flag's dest is one)."""
    import inspect

    names = inspect.signature(runner).parameters
    return runner(**{name: value for name, value in vars(args).items() if name in names})


def _cmd_serve(args: argparse.Namespace) -> int:
    from zephyr.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        chat_template=args.chat_template,
        max_tokens_limit=args.max_tokens_limit,
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from zephyr.core.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from zephyr.pipeline.run import run_pipeline

    with _naming(args.recipe):
        run_pipeline(
            recipe, args.recipe, start_from=args.start_from, only=args.only, output_dir=args.output_dir
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zephyr.stages.report.run import write_report

    run = Path(args.run)
    if run.is_dir() and not (run / "manifest.json").is_file():  # e.g. a stage's folder, runs/x/sft
        print(
            f"warning: {args.run} has no manifest.json: not a `zephyr run` folder; the report lists what it lacks",
            file=sys.stderr,
        )
    paths = write_report(args.run, out_dir=args.out)
    print(paths.html)  # the page to open, last
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from zephyr.chat import run_chat

    run_chat(
        args.model,
        chat_template=args.chat_template,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.01")


JUDGE_MODE_HELP = "text: parse the judge's answer; logprobs: from its token probabilities (local judges)"


def _add_check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a recipe without running it")
    _add_recipe_args(p)
    p.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="check the training batches for a launch of N processes (default: 1)",
    )
    p.set_defaults(handler=_cmd_check)


def _add_assets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="offline assets: models, tokenizers, benchmark data")
    asub = p.add_subparsers(dest="assets_command", required=True)
    asub.add_parser("list", help="list known assets")
    f = asub.add_parser("fetch", help="fetch, verify and convert an asset; prints its folder last")
    f.add_argument("name")
    f.add_argument("--force", action="store_true", help="fetch again even when present")
    p.set_defaults(handler=_cmd_assets)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="validate or inspect data files")
    dsub = p.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="check every record of a file against its schema")
    v.add_argument("file")
    v.add_argument("--format", required=True, choices=["conversations", "pairs", "rated", "mc"])
    v.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    s = dsub.add_parser("show", help="print records rendered with the chat template, trained tokens marked")
    s.add_argument("file")
    s.add_argument("--tokenizer", default="asset:smollm2-135m-instruct", help="model or tokenizer spec")
    s.add_argument("--chat-template", default="auto")
    s.add_argument("--limit", type=int, default=3)
    s.add_argument("--no-color", action="store_true")
    p.set_defaults(handler=_cmd_data)


# The pipeline's stages, in order: (command, help, handler, whether it trains and so can resume).
_STAGE_COMMANDS = (
    ("generate", "teacher-written dialogues for dSFT (self-instruct, UltraChat)", _cmd_generate, False),
    ("curate", "curate teacher dialogues into the dSFT set", _cmd_curate, False),
    ("sft", "supervised fine-tuning (dSFT)", _cmd_sft, True),
    ("feedback", "AI feedback: completions from several models, a judge, pairs", _cmd_feedback, False),
    ("dpo", "direct preference optimisation (dDPO)", _cmd_dpo, True),
)


def _add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    for name, help_text, handler, trains in _STAGE_COMMANDS:
        p = sub.add_parser(name, help=help_text)
        _add_recipe_args(p)
        if trains:
            p.add_argument(
                "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
            )
        p.set_defaults(handler=handler)


def _add_logps_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logps", help="per-pair sequence log-probs of a model on a preference file")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--chat-template", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    p.add_argument("--prefix-sharing", action="store_true", help="run each pair's prompt once (same numbers)")
    p.set_defaults(handler=_cmd_logps)


def _add_mt_bench_parser(esub: argparse._SubParsersAction) -> None:
    t = esub.add_parser("mt-bench", help="MT-Bench: two-turn answers graded 1-10 by a judge")
    t.add_argument("--model", required=True, help="the model to evaluate (spec)")
    t.add_argument("--judge", required=True, help="judge spec, e.g. openai:gpt-4@https://HOST/v1")
    t.add_argument("--out", required=True)
    t.add_argument("--questions", default=None, help="FastChat question.jsonl (default: the mt-bench asset)")
    t.add_argument("--limit", type=int, default=None, help="first N questions")
    t.add_argument("--max-new-tokens", type=int, default=1024)
    t.add_argument("--judge-max-tokens", type=int, default=2048)
    t.add_argument(
        "--baseline",
        default=None,
        help="pairwise mode: a baseline model spec or its answers.jsonl; judged both orders (position swap)",
    )
    t.add_argument("--judge-mode", choices=["text", "logprobs"], default="text", help=JUDGE_MODE_HELP)


def _add_alpaca_eval_parser(esub: argparse._SubParsersAction) -> None:
    from zephyr.core.config import DEFAULT_ALPACA_EVAL_ANNOTATOR

    a = esub.add_parser("alpaca-eval", help="AlpacaEval: pairwise win rate against reference outputs")
    a.add_argument("--model", required=True)
    a.add_argument("--judge", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--instructions", default="hf:tatsu-lab/alpaca_eval:eval", help="JSONL or hf:NAME:SPLIT")
    a.add_argument("--limit", type=int, default=None)
    a.add_argument("--max-new-tokens", type=int, default=2048)
    a.add_argument(
        "--annotator",
        default=DEFAULT_ALPACA_EVAL_ANNOTATOR,
        help="alpaca_eval annotator: alpaca_eval_gpt4 (AlpacaEval 1, default), weighted_alpaca_eval_gpt4_turbo "
        "(AlpacaEval 2.0), chatgpt",
    )
    a.add_argument("--judge-mode", choices=["text", "logprobs"], default="text", help=JUDGE_MODE_HELP)
    a.add_argument(
        "--lc-data",
        default=None,
        help="alpaca_eval's df_gamed.csv (FILE or hf:tatsu-lab/alpaca_eval) for the length_controlled_v1 LC "
        "win rate; without it: length_controlled_minimal",
    )


def _add_mc_parser(esub: argparse._SubParsersAction) -> None:
    m = esub.add_parser("mc", help="log-likelihood multiple choice (lm-evaluation-harness semantics)")
    m.add_argument("--model", required=True)
    m.add_argument("--data", help="MC JSONL file (or hf:NAME[:SPLIT])")
    m.add_argument(
        "--preset",
        default=None,
        help="arc | hellaswag | mmlu | truthfulqa | truthfulqa_mc1 (Open LLM v1 settings)",
    )
    m.add_argument("--out", required=True)
    m.add_argument("--fewshot-data", default=None, help="file of few-shot examples (MC format)")
    m.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        help="few-shot examples per item (default: the preset's, else 0)",
    )
    m.add_argument("--max-length", type=int, default=None, help="left-truncate contexts to this many tokens")
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--limit", type=int, default=None)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: MT-Bench, AlpacaEval, multiple choice")
    esub = p.add_subparsers(dest="eval_command", required=True)
    _add_mt_bench_parser(esub)
    _add_alpaca_eval_parser(esub)
    _add_mc_parser(esub)
    p.set_defaults(handler=_cmd_eval)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline of a recipe into one run folder (resumable)")
    _add_recipe_args(p)
    p.add_argument("--from", dest="start_from", default=None, metavar="STAGE", help="redo STAGE and after")
    p.add_argument("--only", default=None, metavar="STAGE", help="run only STAGE (its inputs must be done)")
    p.add_argument("--output-dir", default=None, help="the run folder (default: run.output_dir)")
    p.set_defaults(handler=_cmd_run)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="report.json, report.md and a self-contained report.html of a run")
    p.add_argument("run", help="run folder written by `zephyr run`")
    p.add_argument("--out", default=None, help="folder for the report files (default: the run folder)")
    p.set_defaults(handler=_cmd_report)


def _add_chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal, with its chat template")
    p.add_argument("model", help="model spec: PATH, transformers:ID, asset:NAME, openai:MODEL@URL")
    p.add_argument("--chat-template", default="auto")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.set_defaults(handler=_cmd_chat)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat completions server over a checkpoint")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key (or set ZEPHYR_API_KEY)")
    p.add_argument("--chat-template", default="auto")
    p.add_argument("--max-tokens-limit", type=int, default=2048)
    p.set_defaults(handler=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zephyr", description="Direct distillation of LM alignment: dSFT, AI feedback, dDPO, evaluation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order here is the order of `zephyr --help`.
    _add_check_parser(sub)
    _add_assets_parser(sub)
    _add_data_parser(sub)
    _add_stage_parsers(sub)
    _add_logps_parser(sub)
    _add_eval_parser(sub)
    _add_run_parser(sub)
    _add_report_parser(sub)
    _add_chat_parser(sub)
    _add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    previous = _stop_on_sigterm()
    try:
        return handler(args)
    except ZephyrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _restore_sigterm(previous)
        _close_process_group()


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse's parse, but dotted overrides may also come after the options (`zephyr run R --only eval
    dpo.beta=0.05`): argparse takes a command's positionals only before its first option."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # argparse's own error for what it does not know (exit 2)
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting, `kill`): unwinds like Ctrl-C, so what is written is closed."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _stop_on_sigterm() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers belong to the main thread
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _close_process_group() -> None:
    """Tear down a launcher's process group while the interpreter is whole: left to interpreter exit, gloo's
    worker threads can die holding tensors and abort the process (SIGABRT) after a run that succeeded."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
