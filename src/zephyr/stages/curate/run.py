"""`zephyr curate`: teacher dialogues in, the dSFT train and test sets out.

The filters of `zephyr.stages.curate.filters` run in a fixed order, each on what the previous one kept:

1. truecase (changes text, removes nothing)     5. exact duplicate conversations
2. turns (min_turns..max_turns)                 6. duplicate prompts
3. chars (min_chars per answer, max_chars)      7. near duplicates (MinHash LSH)
4. refusals and AI disclaimers                  8. contamination with the eval prompts

Quality filters run before deduplication so that when a prompt appears twice and its first answer is a
refusal, the good answer is the one kept; decontamination runs last so that it reports exactly the
dialogues that would otherwise have been trained on. The survivors are split into train and test by a hash
of `prompt_id` (`zephyr.io.train_eval_split`).

Outputs in `output_dir`: `train.jsonl`, `test.jsonl` (conversations), `removed.jsonl` (prompt_id, step,
reason of every removed dialogue), `curation_report.json` (counts per step, contamination hits) and
`resolved_config.yaml`; the report is written last, so its presence means the outputs are complete. A
table of the counts is printed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zephyr import io
from zephyr.core.config import CurateConfig, save_resolved
from zephyr.core.errors import ConfigError, DataError
from zephyr.models import assets
from zephyr.stages import stage
from zephyr.stages.curate import filters
from zephyr.stages.curate.filters import EvalPrompt, FilterResult, NgramIndex

EVAL_ASSETS = {"mt-bench": "question.jsonl"}  # asset name -> its file of eval prompts
# the stage table declares the outputs
TRAIN, TEST, REPORT = (stage("curate").output(part) for part in ("train", "test", "summary"))


@dataclass
class StepReport:
    """One row of the curation table: what a step removed (or changed) and how many records remain."""

    name: str
    removed: int
    remaining: int
    detail: str = ""  # the step's settings or what it changed, e.g. "1..3" or "14 messages changed"


@dataclass
class CurateResult:
    output_dir: Path
    read: int  # records in the input, bad ones included
    bad: int  # records skipped by the bad-record policy
    steps: list[StepReport]
    train: int
    test: int
    contamination: dict[str, list[str]] = field(default_factory=dict)  # eval prompt id -> prompt_ids


@dataclass
class _Ledger:
    """The records as they pass through the steps, and what each step did to them."""

    records: list[dict]
    steps: list[StepReport] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)

    def apply(self, name: str, detail: str, result: FilterResult) -> None:
        self.records = result.kept
        self.steps.append(StepReport(name, len(result.removed), len(result.kept), detail))
        self.removed += [
            {
                "prompt_id": r.record["prompt_id"],
                "step": name,
                "reason": r.reason,
                "prompt": r.record["prompt"],
            }
            for r in result.removed
        ]


# ---------------------------------------------------------------------------------------------------------
# Eval prompts (decontamination sources)


def load_eval_prompts(sources: Sequence[str]) -> list[EvalPrompt]:
    """The eval prompts of each source: `asset:mt-bench` (both turns of the 80 questions) or a path to a
    JSONL, JSON-list or Parquet file of MT-Bench questions, conversations, AlpacaEval instructions,
    multiple-choice items or records with a `prompt` (see `filters.eval_texts`). Ids are
    `SOURCE:RECORD_ID[/TURN]`."""
    prompts: list[EvalPrompt] = []
    for i, source in enumerate(sources):
        key = f"curate.decontaminate[{i}]"
        if source.startswith("asset:"):
            name = source.removeprefix("asset:")
            if name not in EVAL_ASSETS:
                raise ConfigError(f"{key}: unknown eval asset {name!r} (known: {', '.join(EVAL_ASSETS)})")
            path, label = assets.fetch(name) / EVAL_ASSETS[name], name
        else:
            path, label = Path(source), source
            if not path.is_file():
                raise ConfigError(f"{key}: {source}: no such file")
        prompts += _eval_prompts_of_file(path, label)
    return prompts


def _eval_prompts_of_file(path: Path, label: str) -> list[EvalPrompt]:
    prompts = []
    for position, (line, record) in enumerate(_eval_records(path), start=1):
        try:
            texts = filters.eval_texts(record)
        except DataError as exc:
            raise DataError(f"{path}:{line}: {exc}") from None
        # A record without an id is named by its line in JSONL, by its position in a JSON list (whose
        # records often share one line).
        fallback = position if path.suffix == ".json" else line
        rid = next((record[k] for k in ("question_id", "prompt_id", "id") if k in record), fallback)
        for turn, text in enumerate(texts, start=1):
            suffix = f"/{turn}" if len(texts) > 1 else ""
            prompts.append(EvalPrompt(f"{label}:{rid}{suffix}", text))
    if not prompts:
        raise DataError(f"{path}: no eval prompts")
    return prompts


def _eval_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, record) of an eval file (`io.iter_rows`); a line that does not decode stops the read."""
    for line, record, problem in io.iter_rows(str(path)):
        if problem is not None:
            raise DataError(f"{path}:{line}: {problem.field}: {problem.message}")
        yield line, record


# ---------------------------------------------------------------------------------------------------------
# The stage


def _progress(records: list[dict], desc: str) -> Iterable[dict]:
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs and tests
    return tqdm(records, desc=desc, unit="dialogue", disable=None, leave=False)


def _check(cfg: CurateConfig) -> None:
    if not cfg.input:
        raise ConfigError("curate.input: required (the conversations file to curate)")
    cfg.validate("curate")  # ranges between fields; configs built in code skip the recipe loader


def _run_filters(
    cfg: CurateConfig, ledger: _Ledger, patterns: list, index: NgramIndex | None
) -> dict[str, list[str]]:
    """Apply the steps in their fixed order (module docstring); returns the contamination hits."""
    if cfg.truecase:
        ledger.records, changed = filters.truecase_records(_progress(ledger.records, "truecase"))
        ledger.steps.append(StepReport("truecase", 0, len(ledger.records), f"{changed} messages changed"))
    turns = f"{cfg.min_turns}..{cfg.max_turns}" if cfg.max_turns else f">= {cfg.min_turns}"
    ledger.apply("turns", turns, filters.limit_turns(ledger.records, cfg.min_turns, cfg.max_turns))
    chars = f"answers >= {cfg.min_chars}" + (f", messages <= {cfg.max_chars}" if cfg.max_chars else "")
    ledger.apply("chars", chars, filters.limit_chars(ledger.records, cfg.min_chars, cfg.max_chars))
    if cfg.drop_refusals:
        source = "built-in" if cfg.refusal_patterns is None else "recipe"
        ledger.apply(
            "refusals", f"{len(patterns)} {source} patterns", filters.drop_refusals(ledger.records, patterns)
        )
    if cfg.dedup_exact:
        ledger.apply("duplicate_conversations", "", filters.dedup_conversations(ledger.records))
        ledger.apply("duplicate_prompts", "", filters.dedup_prompts(ledger.records))
    if cfg.near_dup_threshold is not None:
        near = filters.drop_near_duplicates(
            _progress(ledger.records, "near duplicates"), cfg.near_dup_threshold
        )
        ledger.apply("near_duplicates", f"Jaccard >= {cfg.near_dup_threshold:g}", near)
    if index is None:
        return {}
    result, hits = filters.decontaminate(
        _progress(ledger.records, "decontamination"), index, cfg.contamination_threshold
    )
    detail = f"{len(index.prompts)} eval prompts, {cfg.ngram}-grams, >= {cfg.contamination_threshold:g}"
    ledger.apply("contamination", detail, result)
    return hits


def run_curate(cfg: CurateConfig) -> CurateResult:
    """Read `cfg.input`, filter, split and write the outputs (module docstring); prints the counts table."""
    _check(cfg)
    # Everything a recipe can get wrong is checked before the input is read.
    patterns = filters.compile_refusal_patterns(cfg.refusal_patterns) if cfg.drop_refusals else []
    eval_prompts = load_eval_prompts(cfg.decontaminate)
    index = filters.build_ngram_index(eval_prompts, cfg.ngram) if eval_prompts else None

    read = io.read_records(cfg.input, "conversations", on_bad_record=cfg.on_bad_record)
    io.check_output_dir(cfg.output_dir)  # before the filters run: an unwritable or full folder fails now
    ledger = _Ledger(read.records)
    hits = _run_filters(cfg, ledger, patterns, index)
    train, test = io.train_eval_split(ledger.records, cfg.test_fraction, cfg.seed)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.write_jsonl(out / TRAIN, train)
    io.write_jsonl(out / TEST, test)
    io.write_jsonl(out / "removed.jsonl", ledger.removed)
    save_resolved(cfg, out)
    result = CurateResult(out, read.total, len(read.bad), ledger.steps, len(train), len(test), hits)
    # Written last and atomically: its presence means the outputs are complete.
    report = out / REPORT
    io.write_text(
        report, json.dumps(_report(cfg, read, result, eval_prompts), indent=2, ensure_ascii=False) + "\n"
    )
    print(format_table(result, cfg))
    return result


def _report(
    cfg: CurateConfig, read: io.ReadResult, result: CurateResult, eval_prompts: list[EvalPrompt]
) -> dict:
    texts = {p.id: p.text for p in eval_prompts}
    return {
        "input": cfg.input,
        "records_read": result.read,
        "bad_records": result.bad,
        "bad_examples": [asdict(b) for b in read.bad[:20]],
        "valid_records": result.read - result.bad,
        "steps": [asdict(s) for s in result.steps],
        "remaining": result.train + result.test,
        "train": result.train,
        "test": result.test,
        "split": {"test_fraction": cfg.test_fraction, "seed": cfg.seed, "key": "prompt_id"},
        "contamination": {
            "sources": list(cfg.decontaminate),
            "eval_prompts": len(eval_prompts),
            "ngram": cfg.ngram,
            "threshold": cfg.contamination_threshold,
            "hits": {
                pid: {"text": texts[pid], "dialogues": ids}
                for pid, ids in sorted(result.contamination.items())
            },
        },
        "outputs": [TRAIN, TEST, "removed.jsonl", "resolved_config.yaml"],
    }


def format_table(result: CurateResult, cfg: CurateConfig) -> str:
    """The printed summary: one row per step with what it removed and what remains."""
    read = StepReport(
        "read", result.bad, result.read - result.bad, f"{result.read} records, {result.bad} bad"
    )
    rows = [read, *result.steps]
    width = max(len(r.name) for r in rows)
    lines = [
        f"curate {cfg.input} -> {result.output_dir}",
        f"  {'step':<{width}}  {'removed':>7}  {'remaining':>9}",
    ]
    lines += [f"  {r.name:<{width}}  {r.removed:>7}  {r.remaining:>9}  {r.detail}".rstrip() for r in rows]
    lines.append(
        f"  split: {result.train} train, {result.test} test (test_fraction {cfg.test_fraction:g}, seed {cfg.seed})"
    )
    for pid, ids in sorted(result.contamination.items()):
        lines.append(f"  contaminated by {pid}: {', '.join(ids)}")
    return "\n".join(lines)
