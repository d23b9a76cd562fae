"""`zephyr eval alpaca-eval`: generate the model's answers, judge them against the reference outputs, score.

One run writes to `out/`: `outputs.jsonl` (the model's answers), `annotations.jsonl` (one judgment per
instruction, unparsed ones included), `judge_audit.jsonl` (every judge call, `JudgeClient`'s audit log),
`results.json` (`alpaca_eval.summarize` plus the run's settings) and `results.md`.

The model answers greedily with its own chat template, all instructions in one batched call. The prompts,
the order switch, the answer parsing and the metrics are `zephyr.stages.alpaca_eval.protocol`'s.

`judge_mode="text"` is the annotator's own protocol, as alpaca_eval runs it: the judge writes its answer
with the annotator's request settings and the answer is parsed; a weighted annotator
(weighted_alpaca_eval_gpt4_turbo) asks for one token with `logprobs` and `top_logprobs` (5) and reads the
preference from those (`ae.parse_logprob_preference`), from any backend that returns them.

`judge_mode="logprobs"` (a local judge: a generator that is a `LogprobScorer`) reads the judge's
next-token probabilities with the two outputs' naming tokens always scored, for small judges: the prompt is
the same, the answer is forced to `ae.forced_answer(annotator).prefix` (up to the number of the first model
ranked; nothing for a weighted annotator) and the preference is fractional, 1 + P(the output shown second)
mapped back through the order switch (`ae.preference_from_logprobs`).

`lc_data` (alpaca_eval's `df_gamed.csv`, a file or `hf:tatsu-lab/alpaca_eval`) gives the instruction
difficulty and gamed baselines of the leaderboard's `length_controlled_v1`; without it the LC win rate is
`length_controlled_minimal`. `results.json` names the one used (`length_controlled_glm`).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr.core.config import DEFAULT_ALPACA_EVAL_ANNOTATOR, AlpacaEvalEvalConfig
from zephyr.core.errors import ConfigError, DataError, ZephyrError
from zephyr.core.specs import is_hub_spec, parse_hub_spec
from zephyr.generation import make_generator
from zephyr.generation.base import Generator, SamplingParams
from zephyr.generation.cache import request_cache_options
from zephyr.io import check_output_dir, iter_rows, write_jsonl, write_text
from zephyr.judge.client import (
    JUDGE_CALL_FAILED,
    JudgeAnswer,
    JudgeClient,
    JudgeRequest,
    check_logprobs_judge,
)
from zephyr.judge.rating import Rating
from zephyr.models import assets
from zephyr.stages import stage
from zephyr.stages.alpaca_eval import protocol as ae

HUB_CONFIG = {"tatsu-lab/alpaca_eval": "alpaca_eval"}  # the hub dataset's config holding the 805 items
# the stage table declares the outputs
RESULTS, MARKDOWN, OUTPUTS, ANNOTATIONS, AUDIT = (
    stage("alpaca_eval").output(part) for part in ("results", "markdown", "outputs", "annotations", "audit")
)
LC_FILE = "df_gamed.csv"  # alpaca_eval's length-control data in its hub dataset (glm_winrate.py)
LC_VARIANT_NOTE = (
    "The length-controlled win rate uses alpaca_eval's {glm} GLM, not the AlpacaEval 2.0 leaderboard's "
    "length_controlled_v1 (which needs alpaca_eval's df_gamed.csv: --lc-data)."
)


@dataclass(frozen=True)
class EvalItem:
    """One instruction of the evaluation set; `index` is its position in the full set (before `limit`)."""

    index: int
    instruction: str
    reference_output: str
    reference_generator: str | None = None
    dataset: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Instructions


def _item_of(index: int, record: Any, where: str) -> EvalItem:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: field {key!r} must be a string (the reference output is 'output')")
    return EvalItem(
        index, record["instruction"], record["output"], record.get("generator"), record.get("dataset")
    )


def read_instructions_jsonl(path: str | os.PathLike) -> list[EvalItem]:
    """alpaca_eval records (`instruction`, `output` = the reference output, `generator`, `dataset`) of a
    JSONL file (or a JSON list or Parquet file: `io.iter_rows`)."""
    items: list[EvalItem] = []
    for number, record, problem in iter_rows(str(path)):
        if problem is not None:
            # io's "invalid JSON: ..." reads "not valid JSON: ..." here, as for MT-Bench's files
            detail = problem.message.replace("invalid JSON", "not valid JSON", 1)
            raise DataError(f"{path}:{number}: {detail}")
        items.append(_item_of(len(items), record, f"{path}:{number}"))
    if not items:
        raise DataError(f"{path}: no instructions")
    return items


def read_instructions_hub(source: str) -> list[EvalItem]:
    """`hf:NAME[@REVISION][:SPLIT]` through `datasets.load_dataset` (the AlpacaEval set: its `alpaca_eval`
    config)."""
    hub = parse_hub_spec(source)
    name, split = hub.name, hub.split
    pinned = {"revision": hub.revision} if hub.revision else {}
    try:
        import datasets
    except ImportError:
        raise ZephyrError(f"{source}: reading hub datasets needs the `datasets` package") from None
    try:
        dataset = datasets.load_dataset(name, HUB_CONFIG.get(name), split=split or "eval", **pinned)
    # Offline, unknown name, HTTP errors: to the user all mean the set cannot be read here.
    except Exception as exc:
        raise ZephyrError(
            f"{source}: could not load the AlpacaEval instructions ({type(exc).__name__}: {exc}); the "
            "Hugging Face hub must be reachable (or the dataset cached), or pass --instructions FILE.jsonl"
        ) from exc
    return [_item_of(i, dict(record), f"{source}[{i}]") for i, record in enumerate(dataset)]


def read_instructions(source: str | os.PathLike) -> list[EvalItem]:
    source = str(source)
    return read_instructions_hub(source) if is_hub_spec(source) else read_instructions_jsonl(source)


# ---------------------------------------------------------------------------------------------------------
# Length-control data (alpaca_eval's df_gamed.csv)


def read_lc_data(
    source: str | os.PathLike, n_instructions: int, instructions: str | os.PathLike
) -> dict[str, Any]:
    """`summarize`'s `instruction_difficulty` and `gamed` from alpaca_eval's `df_gamed.csv`: a file, or
    `hf:REPO[:FILE]` (default `hf:tatsu-lab/alpaca_eval`, file df_gamed.csv) fetched from the hub.

    Each row is one gamed baseline's annotation of one instruction: `index` (the instruction's position in
    the 805-instruction set), `preference` (on [0, 1]; empty: NaN, left out of the fit as alpaca_eval does),
    `std_delta_len`, `instruction_difficulty`; other columns (`model`, ...) are not read. An instruction's
    difficulty is that of its first row (alpaca_eval's `drop_duplicates("index")`). The file must cover
    exactly the instruction set's items: the difficulties belong to alpaca_eval's set, not to another one.
    """
    path = _lc_file(str(source))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"index", "preference", "std_delta_len", "instruction_difficulty"} - set(
                reader.fieldnames or ()
            )
            if missing:
                raise DataError(
                    f"{path}:1: columns {', '.join(sorted(missing))} missing (alpaca_eval's {LC_FILE})"
                )
            rows = [_lc_row(row, f"{path}:{reader.line_num}") for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the length-control data: {exc}") from exc
    difficulty: dict[int, float] = {}
    for index, _, _, value in rows:
        difficulty.setdefault(index, value)
    if sorted(difficulty) != list(range(n_instructions)):
        raise ConfigError(
            f"{path}: difficulty for {len(difficulty)} instructions, but {instructions} has "
            f"{n_instructions}: length_controlled_v1 needs alpaca_eval's instruction set (without lc_data: "
            "length_controlled_minimal)"
        )
    gamed = ae.GamedBaselines(*([row[k] for row in rows] for k in (1, 2, 3)))
    return {"instruction_difficulty": difficulty, "gamed": gamed}


def _lc_row(row: dict[str, str], where: str) -> tuple[int, float, float, float]:
    """(index, preference, std_delta_len, instruction_difficulty) of one df_gamed.csv row."""

    def number(key: str, empty: float | None = None) -> float:
        text = (row.get(key) or "").strip()
        if not text and empty is not None:
            return empty
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{where}: {key}: not a number: {text!r}") from None
        if math.isnan(value) and empty is not None:  # pandas reads "nan" as it reads an empty cell
            return empty
        if not math.isfinite(value):
            raise DataError(f"{where}: {key}: not a finite number: {text!r}")
        return value

    index = number("index")
    if index != int(index) or index < 0:
        raise DataError(f"{where}: index: not an instruction position: {row['index']!r}")
    preference = number("preference", empty=math.nan)
    return int(index), preference, number("std_delta_len"), number("instruction_difficulty")


def _lc_file(source: str) -> str:
    """A local df_gamed.csv, or the hub's (`hf:REPO[@REVISION][:FILE]`) through huggingface_hub's cache."""
    if not is_hub_spec(source):
        return source
    hub = parse_hub_spec(source)  # the hub data grammar; its last part names a file of the repository
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(
            repo_id=hub.name, filename=hub.split or LC_FILE, repo_type="dataset", revision=hub.revision
        )
    # Offline, unknown repo, HTTP errors: to the user all mean the file cannot be read here.
    except Exception as exc:
        raise ZephyrError(
            f"{source}: could not download the length-control data ({type(exc).__name__}: {exc}); the "
            f"Hugging Face hub must be reachable (or the file cached), or pass a local {LC_FILE}"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# Judging


def _preference_parser(annotator: ae.Annotator, switched: bool) -> Callable[[JudgeAnswer], list[Rating]]:
    """The annotator's own reading of the judge's answer: its text, or a weighted annotator's top
    log-probabilities (kept as the rating's evidence)."""

    def parse(answer: JudgeAnswer) -> list[Rating]:
        if annotator.logprob is None:
            return [ae.parse_preference(annotator, answer.text or "", switched)]
        return [ae.parse_logprob_preference(annotator, answer.logprobs or [], switched)]

    return parse


def _logprob_parser(tokens: tuple[str, str], switched: bool) -> Callable[[JudgeAnswer], list[Rating]]:
    def parse(answer: JudgeAnswer) -> list[Rating]:
        tops = answer.next_tokens or []
        if len(tops) != 1:
            return [Rating(None, JUDGE_CALL_FAILED)]
        return [ae.preference_from_logprobs(tops[0], switched, tokens=tokens)]

    return parse


def check_annotator(annotator: ae.Annotator) -> None:
    """The judge backends return text (and log-probs), not function calls: a function-calling annotator
    cannot be answered."""
    if annotator.parser == "json_ranking":
        raise ConfigError(
            f"annotator {annotator.name!r} answers through a function call (tools / tool_choice), which "
            "zephyr's judge backends cannot make; use --annotator weighted_alpaca_eval_gpt4_turbo "
            f"(AlpacaEval 2.0's default) or {DEFAULT_ALPACA_EVAL_ANNOTATOR} (AlpacaEval 1)"
        )


def judge_items(
    annotator: ae.Annotator,
    items: Sequence[EvalItem],
    outputs: Sequence[str],
    client: JudgeClient,
    seed: int = ae.DEFAULT_SEED,
    mode: str = "text",
) -> list[dict[str, Any]]:
    """One annotation record per item, in order: identical outputs are a draw without a judge call.

    `mode` "logprobs": the judge's answer is forced to `ae.forced_answer(annotator).prefix` and the
    preference read from the next-token log-probs; the record keeps `answer_prefix`, `top_logprobs` and the
    `evidence` (probability mass of the two naming tokens, and their renormalised shares) in place of the
    judge's answer. A weighted annotator in text mode keeps its answer's `top_logprobs` as `evidence`.
    """
    prefixes: tuple[str, ...] = ()
    parser = functools.partial(_preference_parser, annotator)
    if mode == "logprobs":
        forced = ae.forced_answer(annotator)
        prefixes, parser = (forced.prefix,), functools.partial(_logprob_parser, forced.tokens)

    pairs = [
        (ae.make_request(annotator, i.instruction, i.reference_output, o, seed), i)
        for i, o in zip(items, outputs, strict=True)
    ]
    asked = [
        JudgeRequest(
            key=str(item.index),
            messages=request.messages,
            parse=parser(request.switched),
            slots=({"model_position": request.model_position},),
            meta={"index": item.index, "switched": request.switched, "judge_mode": mode},
            prefixes=prefixes,
        )
        for request, item in pairs
        if not request.identical
    ]
    replies = iter(client.judge(asked)) if asked else iter(())
    records = []
    for request, item in pairs:
        record = {"index": item.index, "instruction": item.instruction, "switched": request.switched}
        record["judge_mode"] = mode
        if request.identical:
            record |= {"preference": 1.5, "judge_answer": None, "reason": "identical outputs: a draw"}
        else:
            reply = next(replies)
            [rating] = reply.ratings
            answer = reply.answer
            record |= {
                "preference": rating.value,
                "judge_answer": answer.text if answer.ok else None,
                "reason": rating.reason,
            }
            if prefixes:
                top = answer.next_tokens[0] if answer.next_tokens else None
                record |= {"answer_prefix": prefixes[0], "top_logprobs": top}
            record |= {"evidence": dict(rating.evidence)} if rating.evidence else {}
            if not answer.ok:
                record["judge_error"] = answer.error
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------
# The run


def _load(spec: str, out: Path) -> Generator:
    """The generator of a model spec; an HTTP model's answers go to the run's request cache (a redone eval
    pays for nothing twice)."""
    return make_generator(spec, **request_cache_options(spec, out))


def run_alpaca_eval(
    cfg: AlpacaEvalEvalConfig,
    model: str,
    out: str | os.PathLike,
    *,
    annotators_dir: str | os.PathLike | None = None,
    model_generator: Generator | None = None,
    judge_generator: Generator | None = None,
) -> dict[str, Any]:
    """Evaluate `model` against the reference outputs with `cfg.judge`; write `out/` and return results.json.

    `annotators_dir` defaults to the `alpaca-eval-templates` asset; the generators, when given, replace
    `make_generator(model)` / `make_generator(cfg.judge)`. `cfg.judge_mode`: "text" (the annotator's protocol, as
    alpaca_eval runs it) or "logprobs" (module docstring). `cfg.lc_data`: alpaca_eval's `df_gamed.csv` for the
    `length_controlled_v1` LC win rate (`read_lc_data`).
    """
    if annotators_dir is None:
        annotators_dir = assets.fetch("alpaca-eval-templates")
    spec = ae.load_annotator(annotators_dir, cfg.annotator)
    check_annotator(spec)
    if cfg.judge_mode == "logprobs":
        ae.forced_answer(spec)  # an annotator it cannot read fails now
    every_item = read_instructions(cfg.instructions)
    lc = read_lc_data(cfg.lc_data, len(every_item), cfg.instructions) if cfg.lc_data is not None else None
    items = [every_item[i] for i in ae.limited(len(every_item), cfg.limit)]
    out = Path(out)
    check_output_dir(out)  # before any model loads: an unwritable or full folder fails now

    if cfg.judge_mode == "logprobs":  # before the answers are generated: a judge that cannot do it fails now
        judge_generator = judge_generator or _load(cfg.judge, out)
        check_logprobs_judge(judge_generator, cfg.judge)
    outputs = _answer(model_generator or _load(model, out), model, items, cfg.max_new_tokens, out)
    client = _judge_client(spec, judge_generator or _load(cfg.judge, out), cfg.judge, cfg.judge_mode, out)
    records = judge_items(spec, items, outputs, client, ae.DEFAULT_SEED, mode=cfg.judge_mode)
    write_jsonl(out / ANNOTATIONS, records)

    annotations = [
        ae.Annotation(i.index, r["preference"], o, i.reference_output)
        for i, r, o in zip(items, records, outputs, strict=True)
    ]
    results = {
        "model": model,
        "judge": cfg.judge,
        "annotator": spec.name,
        "judge_mode": cfg.judge_mode,
        "instructions": str(cfg.instructions),
        "lc_data": None if cfg.lc_data is None else str(cfg.lc_data),
        "n_items": len(items),
        **ae.summarize(annotations, **(lc or {})),
        "judge_usage": client.usage(),
    }
    write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    write_text(out / MARKDOWN, results_markdown(results))
    return results


def _answer(
    generator: Generator, model: str, items: list[EvalItem], max_new_tokens: int, out: Path
) -> list[str]:
    """The model's greedy answers, written to `out/outputs.jsonl`; a failed answer stops the run."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    completions = generator.generate([[{"role": "user", "content": i.instruction}] for i in items], params)
    write_jsonl(out / OUTPUTS, [_output_record(i, c, model) for i, c in zip(items, completions, strict=True)])
    failed = [i.index for i, c in zip(items, completions, strict=True) if not c.ok]
    if failed:  # an empty answer would be judged as if the model wrote it
        raise ZephyrError(f"{model}: generation failed for items {failed} (see {out / OUTPUTS})")
    return [c.text for c in completions]


def _judge_client(
    spec: ae.Annotator, generator: Generator, judge: str, judge_mode: str, out: Path
) -> JudgeClient:
    """The judge with the annotator's sampling settings, auditing into `out/judge_audit.jsonl`."""
    audit = out / AUDIT
    audit.unlink(missing_ok=True)  # the client appends; one run's calls only
    kwargs = spec.completions_kwargs
    params = SamplingParams(
        max_tokens=int(kwargs.get("max_tokens", 100)),
        temperature=float(kwargs.get("temperature", 0.0)),
        logprobs=bool(kwargs.get("logprobs", False)),  # the weighted annotators: logprobs, top_logprobs 5
        top_logprobs=int(kwargs.get("top_logprobs", 0)),
    )
    logprobs = judge_mode == "logprobs"
    return JudgeClient(
        generator,
        params,
        judge_id=f"{judge}|{spec.name}" + ("|logprobs" if logprobs else ""),
        audit_path=audit,
        candidates=ae.forced_answer(spec).tokens if logprobs else (),
    )


def _output_record(item: EvalItem, completion, model: str) -> dict[str, Any]:
    record = {
        "index": item.index,
        "instruction": item.instruction,
        "output": completion.text,
        "generator": model,
        "dataset": item.dataset,
        "reference_output": item.reference_output,
        "reference_generator": item.reference_generator,
        "finish_reason": completion.finish_reason,
    }
    return record | ({"error": completion.error} if completion.error else {})


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a short Markdown table (None shown as n/a)."""
    rows = [
        ("win rate (%)", f"{_number(results['win_rate'])} ± {_number(results['standard_error'])}"),
        ("discrete win rate (%)", _number(results["discrete_win_rate"])),
        (
            f"length-controlled win rate (%, {results['length_controlled_glm']})",
            f"{_number(results['length_controlled_winrate'])} ± {_number(results['lc_standard_error'])}",
        ),
        ("wins / losses / draws", f"{results['n_wins']} / {results['n_wins_base']} / {results['n_draws']}"),
        ("annotations (failed to parse)", f"{results['n_annotations']} ({results['n_failed']})"),
        ("average output length (chars)", _number(results["avg_length"])),
    ]
    lines = [
        f"# AlpacaEval: {results['model']}",
        "",
        f"Judge `{results['judge']}`, annotator `{results['annotator']}`, instructions `{results['instructions']}`.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    if results.get("length_controlled_note"):
        lines += ["", f"Length-controlled win rate not computed: {results['length_controlled_note']}."]
    elif results["length_controlled_glm"] != "length_controlled_v1":
        lines += ["", LC_VARIANT_NOTE.format(glm=results["length_controlled_glm"])]
    return "\n".join(lines) + "\n"
