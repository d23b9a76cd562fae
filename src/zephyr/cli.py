"""The `zephyr` command: parses arguments and hands off to the stage modules.

The stage commands, their help and the flags of `zephyr eval ...` and `zephyr logps` come from the stage
table (`zephyr.stages.STAGES`) and the fields of each stage's config dataclass. This module imports at its
top only what building the parser needs (configs, errors, the stage table); what a command needs beyond
that (the pipeline, a stage's module, models, io, serve, chat) is imported when that command runs (the
table names run functions by module), so that `zephyr check` and `zephyr --help` stay fast (no torch
import) and a missing optional extra only matters to the command that needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from zephyr.core.config import EvalTarget, batch_plan, build, field_help, load_recipe, section
from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.core.specs import STAGE_REF
from zephyr.stages import STAGES, Stage, evaluations, pipeline_stages, stage


@contextlib.contextmanager
def _naming(recipe: str) -> Iterator[None]:
    """Config errors found past loading (a pipeline's stage references) still name the recipe file."""
    try:
        yield
    except ConfigError as exc:
        if str(exc).startswith(str(recipe)):
            raise
        raise ConfigError(f"{recipe}: {exc}") from None


def _cmd_check(args: argparse.Namespace) -> int:
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
    if processes < 1:
        raise ConfigError(f"--num-processes: must be at least 1, got {processes}")
    sections = [
        (s.name, getattr(recipe, s.name)) for s in pipeline_stages() if s.trains and s.plan == "section"
    ]
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


def _cmd_cache(args: argparse.Namespace) -> int:
    import time

    from zephyr import cache
    from zephyr.models import assets

    root, now = assets.cache_home(), time.time()
    try:
        found = cache.items(root)  # none where a folder is missing
    except OSError as exc:
        raise ZephyrError(f"{root}: cannot read the cache ({exc.strerror or exc})") from exc
    if args.cache_command == "list":
        print("\n".join(cache.list_lines(root, found, now)))
        return 0
    limits = {"--unused-days": args.unused_days, "--max-gib": args.max_gib}
    if args.all == any(v is not None for v in limits.values()):
        raise ConfigError("zephyr cache prune: give --unused-days DAYS and/or --max-gib GIB, or --all")
    for flag, value in limits.items():
        if value is not None and not value >= 0:
            raise ConfigError(f"zephyr cache prune: {flag} must be 0 or more, got {value}")
    max_bytes = None if args.max_gib is None else int(args.max_gib * 2**30)
    chosen = cache.select(found, now=now, unused_days=args.unused_days, max_bytes=max_bytes)
    print("\n".join(cache.prune_lines(root, chosen, args.dry_run)))
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
    cfg = section(load_recipe(args.recipe, args.overrides), name, args.recipe)
    _refuse_stage_refs(cfg, name, args.recipe)
    return cfg


def _refuse_stage_refs(cfg: Any, name: str, recipe: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and value.startswith(STAGE_REF):
            raise ConfigError(
                f"{recipe}: {name}.{f.name}: {value!r} names another stage's output, which only "
                f"`zephyr run` resolves; run the pipeline, or give a path"
            )


def _cmd_stage(args: argparse.Namespace) -> int:
    """A stage of the pipeline on its own: the recipe's section of it."""
    s = stage(args.stage)
    cfg = _recipe_section(args, s.name)
    run = s.run_function()
    if s.trains:
        run(cfg, resume=args.resume)
    else:
        run(cfg)
    return 0


def _cmd_with_flags(args: argparse.Namespace) -> int:
    """A command outside the pipeline whose flags are its config's fields (`zephyr logps`)."""
    s = stage(args.stage)
    s.run_function()(_config_from_args(s.config, args, s.name))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    evaluation = next(s for s in evaluations() if s.command == args.eval_command)
    label = f"eval {evaluation.command}"
    target = _config_from_args(EvalTarget, args, label)
    cfg = _config_from_args(evaluation.config, args, label)
    results = evaluation.run_function()(cfg, target.model, target.out)
    print(f"{headline(results)}results in {target.out}/{evaluation.output('results')}")
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


# ---------------------------------------------------------------------------------------------------------
# Flags from config dataclasses: each field one flag (`--max-new-tokens` for `max_new_tokens`), with the
# field's type, default and help (`field_help`); the parsed values are built into the config like a
# recipe section, so the same checks apply and an option is written once, in its dataclass.


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    helps, hints = field_help(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag", True):
            p.add_argument(_flag(f.name), dest=f.name, **_flag_options(f, hints[f.name], helps[f.name]))


def _flag_options(f: dataclasses.Field[Any], tp: Any, help_text: str) -> dict[str, Any]:
    options: dict[str, Any] = {"help": help_text.replace("%", "%%") or None}
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if no_default else f.default
    if no_default or f.metadata.get("flag_required"):
        options["required"] = True
    else:
        options["default"] = default
    args = typing.get_args(tp)
    if type(None) in args:  # `X | None`: the flag takes an X
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        options["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is typing.Literal:
        options["choices"] = list(typing.get_args(tp))
    elif tp in (int, float):
        options["type"] = tp
    elif tp is not str:
        raise TypeError(f"{f.name}: no command-line flag for a field of type {tp!r}")
    return options


def _config_from_args(cls: type, args: argparse.Namespace, label: str) -> Any:
    """The config of a command's flags, built and validated like a recipe section; an error names the flag."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return build(cls, values, label)
    except ConfigError as exc:
        key = re.match(rf"{re.escape(label)}\.(\w+)", str(exc))
        if key is None:
            raise
        raise ConfigError(f"{label}: {_flag(key[1])}{str(exc)[key.end() :]}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from zephyr.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        chat_template=args.chat_template,
        max_tokens_limit=args.max_tokens_limit,
        served_model_name=args.served_model_name,
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
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


def _add_cache_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache", help="what the cache holds ($ZEPHYR_CACHE: tokenized data, reference log-probs); prune it"
    )
    csub = p.add_subparsers(dest="cache_command", required=True)
    csub.add_parser("list", help="every item with its size and time of last use, the oldest first")
    prune = csub.add_parser(
        "prune",
        help="remove items unused for some days, the oldest beyond a size, or all (rebuilt when needed)",
    )
    prune.add_argument(
        "--unused-days", type=float, metavar="DAYS", help="remove what was last used more than DAYS days ago"
    )
    prune.add_argument(
        "--max-gib",
        type=float,
        metavar="GIB",
        help="remove the least recently used until the cache holds GIB or less",
    )
    prune.add_argument("--all", action="store_true", help="remove every item")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.set_defaults(handler=_cmd_cache)


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


def _add_stage_parser(sub: argparse._SubParsersAction, s: Stage) -> None:
    """A command of the stage table: a pipeline stage on a recipe's section, `zephyr eval` with a
    subcommand per evaluation, or a command whose flags are its config's fields."""
    p = sub.add_parser(s.command or s.name, help=s.help)
    p.set_defaults(stage=s.name)
    if s.plan == "section":
        _add_recipe_args(p)
        if s.trains:
            p.add_argument(
                "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
            )
        p.set_defaults(handler=_cmd_stage)
    elif s.plan == "evals":
        esub = p.add_subparsers(dest="eval_command", required=True)
        for evaluation in evaluations():
            e = esub.add_parser(evaluation.command or evaluation.name, help=evaluation.help)
            _add_config_flags(e, EvalTarget)
            _add_config_flags(e, evaluation.config)
        p.set_defaults(handler=_cmd_eval)
    elif s.plan == "report":
        p.add_argument("run", help="run folder written by `zephyr run`")
        p.add_argument("--out", default=None, help="folder for the report files (default: the run folder)")
        p.set_defaults(handler=_cmd_report)
    else:
        _add_config_flags(p, s.config)
        p.set_defaults(handler=_cmd_with_flags)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline of a recipe into one run folder (resumable)")
    _add_recipe_args(p)
    p.add_argument("--from", dest="start_from", default=None, metavar="STAGE", help="redo STAGE and after")
    p.add_argument("--only", default=None, metavar="STAGE", help="run only STAGE (its inputs must be done)")
    p.add_argument("--output-dir", default=None, help="the run folder (default: run.output_dir)")
    p.set_defaults(handler=_cmd_run)


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
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name for clients (default: the checkpoint folder's name); no local path is shown",
    )
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
    _add_cache_parser(sub)
    for s in STAGES:  # the stage table's commands, in its order
        if s.command is not None and s.plan != "evaluation":
            _add_stage_parser(sub, s)
    _add_run_parser(sub)
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
    except BrokenPipeError:  # `zephyr cache list | head`: the reader left, which is no error of the command
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter's exit flushes and closes it)
        return 0
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
