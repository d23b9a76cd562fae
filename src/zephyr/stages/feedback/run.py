"""`zephyr feedback`: completions from several generators per prompt, rated by a judge, binarized into pairs.

Per prompt, K = `completions_per_prompt` generator configs are drawn from the pool (`generators`) without
replacement, by a random generator seeded with (`seed`, prompt id): a prompt's draw depends on nothing else.
The work is model-major (`zephyr.generation.schedule`): each local model is loaded once, answers every
prompt assigned to any of its configs (in calls of `chunk_prompts` prompts, each config with its own system
prompt and sampling parameters) and is released before the next loads, so one local model is resident at a
time; HTTP generators run meanwhile, all at once. The judge runs after every completion is written, on the
model the generators left loaded when it is the same, and appends each chunk's rated records to
`rated.jsonl`. Local answers are stored in `cache/answers.sqlite`, HTTP ones in the run's request cache
(`zephyr.generation.cache.request_cache_path`): a rerun on the same output folder skips the prompts already
rated, takes every completion already answered from the caches, and asks only the rest; the pairs and
statistics are rebuilt from the whole of `rated.jsonl` at the end.

The prompt of an input record: a conversation's messages before its last assistant turn (all of them when
it ends with the user), a pair's `chosen` minus the answer, `prompt` as one user message, or a raw
UltraFeedback record's `instruction` (its prompt id the SHA-256 of the text, as ultrafeedback_binarized's).
A generator's `system_prompt` is put in front of the conversation (joined with the conversation's own system
message, when it has one); the judge sees the prompt without it.

Without generators the stage imports instead (`import_ultrafeedback`): the prompts file holds raw
`openbmb/UltraFeedback` records, already rated by GPT-4, which become `rated.jsonl` as they are (no model
runs), then pairs and statistics as below.

Outputs in `output_dir`:
- `rated.jsonl`: UltraFeedback records; each completion also holds `finish_reason`, its token counts, its
  system prompt, `judgments` (every rating of every repeat: aspect, repeat, position shown, value or null and
  its reason) and `rating_reasons` for null ratings; each record the judge id, `judge_usage` (its judge calls
  and their tokens), `prompt_messages` when the prompt is not a single user message, and
  `generation_failures` (completions that could not be generated).
- `pairs.jsonl` (and `pairs_test.jsonl` with `eval_fraction` > 0): ultrafeedback_binarized pairs.
- `judge_audit.jsonl`: every judge call (`judge.audit_log`).
- `feedback_stats.json`, `feedback_stats.md`, `ratings.png`; `resolved_config.yaml`.
- `cache/answers.sqlite`: the local generators' answers.
A prompt none of whose completions could be generated gets no record (a rerun tries it again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from zephyr import io
from zephyr.core.config import FeedbackConfig, GeneratorConfig, save_resolved
from zephyr.core.errors import ConfigError, DataError, ZephyrError
from zephyr.data.schema import Problem, validate_conversation, validate_pair
from zephyr.generation.base import Completion, Generator, SamplingParams, parse_spec
from zephyr.generation.cache import CachedGenerator, ResponseCache
from zephyr.generation.schedule import Resident, answers_id, builder, is_local, load_key
from zephyr.judge.rating import Rating
from zephyr.stages import stage
from zephyr.stages.feedback import binarize, stats, ultrafeedback
from zephyr.stages.feedback.judge import Judge, JudgeItem, JudgeResult, check_judge_config, judge_id

logger = logging.getLogger(__name__)

# the stage table declares the outputs
RATED, PAIRS, PAIRS_TEST = (stage("feedback").output(part) for part in ("rated", "pairs", "test"))
STATS, RATINGS_PLOT = stage("feedback").output("summary"), stage("feedback").output("ratings_plot")
AUDIT = "judge_audit.jsonl"
LOCAL_ANSWERS = "cache/answers.sqlite"  # local generators' answers: a killed run continues from them
EMPTY_RESPONSE = "empty response"

GeneratorFactory = Callable[[GeneratorConfig], Generator]


@dataclass(frozen=True)
class Prompt:
    """A prompt to answer: `messages` is the conversation the completions continue (ends with the user)."""

    prompt_id: str
    prompt: str
    messages: list[dict[str, str]]


@dataclass
class FeedbackResult:
    """What a run did: prompts read, rated before / by this run, failed, pairs written, the statistics."""

    output_dir: Path
    prompts: int
    already_rated: int
    newly_rated: int
    failed_prompts: int
    pairs: int
    test_pairs: int
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Reading prompts


def read_prompts(path: str, on_bad_record: str = "error", limit: int | None = None) -> list[Prompt]:
    """The prompts of a conversations, pairs or prompt file (module docstring), checked record by record.

    A bad record stops the run (`error`) with `FILE:LINE: field: problem`, or is left out and counted
    (`skip`); a repeated prompt id is a problem of the later record.
    """
    return _read_checked(path, on_bad_record, limit, _prompt_of, lambda p: p.prompt_id, "prompt")


def read_raw_ultrafeedback(path: str, on_bad_record: str = "error", limit: int | None = None) -> list[dict]:
    """Raw UltraFeedback records as rated records, checked as `read_prompts` checks prompts (a repeated
    instruction is a repeated prompt id)."""
    return _read_checked(
        path, on_bad_record, limit, _rated_of_raw, lambda r: r["prompt_id"], "raw UltraFeedback"
    )


def _read_checked(
    path: str, on_bad_record: str, limit: int | None, convert: Callable, key: Callable, kind: str
) -> list:
    """`convert(record) -> (item, None) | (None, Problem)` over a file's records; see `read_prompts`."""
    items: list = []
    seen: dict[str, int] = {}
    bad: Counter[str] = Counter()
    total = 0
    for line, record, problem in io.iter_rows(path):
        total += 1
        item, problem = (None, problem) if problem else convert(record)
        if item is not None and key(item) in seen:
            item, problem = None, Problem("prompt_id", f"duplicate of line {seen[key(item)]}")
        if item is None:
            assert problem is not None
            if on_bad_record == "error":
                raise DataError(f"{path}:{line}: {problem.field}: {problem.message}")
            bad[problem.field] += 1
            continue
        seen[key(item)] = line
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if total == 0:
        raise DataError(f"{path}: no records (the file is empty)")
    if bad:
        fields = ", ".join(f"{name} {n}" for name, n in bad.most_common())
        logger.warning("%s: skipped %d of %d records: %s", path, sum(bad.values()), total, fields)
    if not items:
        raise DataError(f"{path}: no valid {kind} records")
    return items


def _rated_of_raw(record: Any) -> tuple[dict | None, Problem | None]:
    if not ultrafeedback.is_raw(record):
        return None, Problem(
            "record",
            "not a raw UltraFeedback record (`instruction`, `completions`); with no feedback.generators "
            "the stage imports those (add generators to rate prompts)",
        )
    problems = ultrafeedback.validate_raw(record)
    return (None, problems[0]) if problems else (ultrafeedback.rated_from_raw(record), None)


def _prompt_of(record: Any) -> tuple[Prompt | None, Problem | None]:
    if not isinstance(record, dict):
        return None, Problem("record", "must be an object")
    if ultrafeedback.is_raw(record):
        instruction = record["instruction"]
        if not isinstance(instruction, str) or not instruction.strip():
            return None, Problem("instruction", "must be a non-empty string")
        user = [{"role": "user", "content": instruction}]
        return Prompt(ultrafeedback.prompt_id(instruction), instruction, user), None
    if "chosen" in record and "rejected" in record:
        problems = validate_pair(record)
        messages = record["chosen"][:-1] if not problems else []
    elif "messages" in record:
        problems = validate_conversation(record, for_training=False)
        messages = _before_last_answer(record["messages"]) if not problems else []
    elif "prompt" in record:
        problems = _prompt_problems(record)
        messages = [{"role": "user", "content": record["prompt"]}] if not problems else []
    else:
        return None, Problem(
            "record",
            "expected `messages`, `chosen`/`rejected`, `prompt` or `instruction` (raw UltraFeedback)",
        )
    if problems:
        return None, problems[0]
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return Prompt(record["prompt_id"], record["prompt"], clean), None


def _before_last_answer(messages: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return messages if last is None or last < len(messages) - 1 else messages[:last]


def _prompt_problems(record: dict) -> list[Problem]:
    problems = []
    for key in ("prompt_id", "prompt"):
        value = record.get(key)
        if key not in record:
            problems.append(Problem(key, "missing"))
        elif not isinstance(value, str) or not value.strip():
            problems.append(Problem(key, "must be a non-empty string"))
    return problems


# ---------------------------------------------------------------------------------------------------------
# Drawing and running the generators


def draw_generators(prompt_id: str, pool_size: int, k: int, seed: int) -> list[int]:
    """The indices of the k generator configs that answer a prompt (seeded by `seed` and the prompt id)."""
    digest = hashlib.sha256(f"{seed}\x00draw\x00{prompt_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(range(pool_size), k)


def with_system_prompt(messages: Sequence[Mapping[str, str]], system_prompt: str | None) -> list[dict]:
    """The conversation a generator sees: its system prompt first, joined with the prompt's own one."""
    copied = [dict(m) for m in messages]
    if not system_prompt:
        return copied
    if copied and copied[0]["role"] == "system":
        return [{"role": "system", "content": f"{system_prompt}\n\n{copied[0]['content']}"}, *copied[1:]]
    return [{"role": "system", "content": system_prompt}, *copied]


def generation_order(
    indices: Sequence[int], pool: Sequence[GeneratorConfig], key: Callable[[GeneratorConfig], Any], last: Any
) -> list[int]:
    """The order the local generator configs run in: configs of one model together (it loads once), in pool
    order, and the model whose key is `last` (the judge's) at the end, so that it stays loaded for the judge."""
    groups: dict[Any, list[int]] = {}
    for g in indices:
        groups.setdefault(key(pool[g]), []).append(g)
    keys = sorted(groups, key=lambda k: k == last)  # stable: the pool's order otherwise
    return [g for k in keys for g in groups[k]]


def generate_all(
    todo: Sequence[Prompt],
    draws: Mapping[str, list[int]],
    pool: Sequence[GeneratorConfig],
    resident: Resident,
    *,
    seed: int,
    chunk: int,
    answers_cache: ResponseCache | None = None,
    last: GeneratorConfig | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[tuple[str, int], Completion]:
    """Every completion of `todo`: (prompt id, generator index) -> completion, model-major (module docstring).

    HTTP generator configs run in threads, all at once, while the local ones run here one model after the
    other (`generation_order`), each answering all of its prompts in calls of `chunk` prompts. Local answers
    go through `answers_cache` (each call's answers stored as it ends), so a killed run's rerun asks only
    what was not answered, and loads no model whose answers are all there.
    """
    assigned: dict[int, list[Prompt]] = {}
    for prompt in todo:
        for g in draws[prompt.prompt_id]:
            assigned.setdefault(g, []).append(prompt)
    remote = [g for g in sorted(assigned) if not is_local(pool[g])]
    last_key = resident.key(last) if last is not None and is_local(last) else None
    local = generation_order([g for g in sorted(assigned) if is_local(pool[g])], pool, resident.key, last_key)
    answers: dict[tuple[str, int], Completion] = {}
    with ThreadPoolExecutor(max_workers=max(len(remote), 1), thread_name_prefix="zephyr-http") as threads:
        running = [
            threads.submit(_answer, g, pool[g], assigned[g], resident.get(pool[g]), seed, chunk, progress)
            for g in remote
        ]
        for g in local:
            gcfg = pool[g]
            answerer = CachedGenerator(
                partial(resident.get, gcfg), answers_cache if gcfg.cache else None, model_id=answers_id(gcfg)
            )
            answers |= _answer(g, gcfg, assigned[g], answerer, seed, chunk, progress)
        for future in running:
            answers |= future.result()
    return answers


def _answer(
    g: int,
    gcfg: GeneratorConfig,
    prompts_: Sequence[Prompt],
    generator: Generator,
    seed: int,
    chunk: int,
    progress: Callable[[int], None],
) -> dict[tuple[str, int], Completion]:
    """One generator config's completions of its prompts, in calls of `chunk` prompts."""
    params = SamplingParams(
        max_tokens=gcfg.max_tokens,
        temperature=gcfg.temperature,
        top_p=gcfg.top_p,
        seed=_seed_for(seed, gcfg.label),
    )
    answers: dict[tuple[str, int], Completion] = {}
    for start in range(0, len(prompts_), chunk):
        part = prompts_[start : start + chunk]
        conversations = [with_system_prompt(p.messages, gcfg.system_prompt) for p in part]
        completions = generator.generate(conversations, params)
        if len(completions) != len(conversations):
            raise DataError(
                f"generator {gcfg.label}: {len(completions)} completions for {len(conversations)} prompts"
            )
        answers |= {(p.prompt_id, g): c for p, c in zip(part, completions, strict=True)}
        progress(len(part))
    return answers


def _seed_for(seed: int, label: str) -> int:
    """A sampling seed per generator config: configs of one model must not draw the same samples."""
    digest = hashlib.sha256(f"{seed}\x00gen\x00{label}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# ---------------------------------------------------------------------------------------------------------
# Records


def _failure(completion: Completion) -> str | None:
    if not completion.ok:
        return completion.error or "generation failed"
    return None if completion.text.strip() else EMPTY_RESPONSE


def rated_record(
    prompt: Prompt,
    answered: list[tuple[GeneratorConfig, Completion]],
    failed: list[tuple[GeneratorConfig, str]],
    result: JudgeResult,
    judge: str,
) -> dict[str, Any]:
    """The UltraFeedback record of a prompt from its completions and the judge's result."""
    completions = []
    for c, (gcfg, completion) in enumerate(answered):
        ratings = result.ratings[c]
        entry: dict[str, Any] = {
            "model": gcfg.label,
            "response": completion.text,
            "ratings": ratings,
            "rationales": result.rationales[c],
            "mean_rating": binarize.mean_rating(ratings),
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "system_prompt": gcfg.system_prompt,
            "judgments": [
                {
                    "aspect": r.aspect,
                    "repeat": r.repeat,
                    "position": r.position,
                    "value": r.rating.value,
                    "reason": r.rating.reason,
                }
                for r in result.readings
                if r.completion == c
            ],
        }
        if reasons := {a: why for a, why in result.reasons[c].items() if why is not None}:
            entry["rating_reasons"] = reasons
        if result.types and result.types[c]:
            entry["types"] = result.types[c]
        completions.append(entry)
    record: dict[str, Any] = {"prompt_id": prompt.prompt_id, "prompt": prompt.prompt}
    if prompt.messages != [{"role": "user", "content": prompt.prompt}]:
        record["prompt_messages"] = prompt.messages
    record |= {"completions": completions, "judge": judge, "judge_usage": dict(result.usage)}
    record["generation_failures"] = [{"model": gcfg.label, "error": why} for gcfg, why in failed]
    return record


# ---------------------------------------------------------------------------------------------------------
# The stage


def _check(cfg: FeedbackConfig) -> None:
    if len(cfg.generators) < cfg.completions_per_prompt:
        raise ConfigError(
            f"feedback.generators: {len(cfg.generators)} generators for completions_per_prompt "
            f"{cfg.completions_per_prompt}"
        )
    labels = Counter(g.label for g in cfg.generators)
    if repeated := [label for label, n in labels.items() if n > 1]:
        raise ConfigError(
            f"feedback.generators: the label {repeated[0]!r} names several generators; give each a `name` "
            "(completions are told apart by it)"
        )
    for i, gcfg in enumerate([*cfg.generators, cfg.judge.model]):
        where = f"feedback.generators[{i}]" if i < len(cfg.generators) else "feedback.judge.model"
        try:
            parse_spec(gcfg.model)
        except ZephyrError as exc:
            raise ConfigError(f"{where}.model: {exc}") from None


def run_feedback(cfg: FeedbackConfig, *, generator_factory: GeneratorFactory | None = None) -> FeedbackResult:
    """Run the stage (module docstring). `generator_factory` builds a generator from a config (default:
    `make_generator` with the config's backend options; configs of one model share an instance)."""
    if not cfg.prompts:
        raise ConfigError("feedback.prompts: no prompt file given")
    if not cfg.generators:
        return import_ultrafeedback(cfg)
    _check(cfg)
    templates = check_judge_config(cfg.judge)  # template mistakes fail before any model loads
    prompts_ = read_prompts(cfg.prompts, cfg.on_bad_record, cfg.num_prompts)
    out = io.check_output_dir(cfg.output_dir)  # before any model loads: unwritable or full fails now
    save_resolved(cfg, out)
    rated_path = out / RATED
    done = _rated_ids(rated_path, judge_id(cfg.judge, templates))
    todo = [p for p in prompts_ if p.prompt_id not in done]
    failed_prompts = 0
    run_usage: dict[str, Any] = {}
    if todo:
        with _resident(generator_factory, out) as resident:
            failed_prompts, run_usage = _rate_prompts(cfg, todo, resident, out)
    records = io.read_jsonl_resumable(rated_path)
    _warn_foreign(records, prompts_)
    summary = _write_pairs_and_stats(cfg, out, records, cfg.judge.scale)
    summary["this_run"] = run_usage | {"prompts_without_completions": failed_prompts}
    _write_stats(out, summary)
    result = FeedbackResult(
        output_dir=out,
        prompts=len(prompts_),
        already_rated=len(prompts_) - len(todo),
        newly_rated=len(todo) - failed_prompts,
        failed_prompts=failed_prompts,
        pairs=summary["split"]["train"],
        test_pairs=summary["split"]["test"],
        stats=summary,
    )
    print(_summary(cfg, result))
    return result


def import_ultrafeedback(cfg: FeedbackConfig) -> FeedbackResult:
    """The stage without generators: raw UltraFeedback records (`cfg.prompts`) rewritten as `rated.jsonl`,
    binarized into the pair files, with the statistics; the judge section is not used."""
    first = next((record for _, record, problem in io.iter_rows(cfg.prompts) if problem is None), None)
    if not ultrafeedback.is_raw(first):
        raise ConfigError(
            f"feedback.generators: the pool of generators is empty, and {cfg.prompts} holds prompts, not raw "
            "UltraFeedback records to import; add generators to answer the prompts"
        )
    records = read_raw_ultrafeedback(cfg.prompts, cfg.on_bad_record, cfg.num_prompts)
    out = io.check_output_dir(cfg.output_dir)
    save_resolved(cfg, out)
    _rated_ids(out / RATED, ultrafeedback.IMPORTED_JUDGE)  # another judge's ratings are never overwritten
    io.write_jsonl(out / RATED, records)
    summary = _write_pairs_and_stats(cfg, out, records, ultrafeedback.SCALE)
    summary["this_run"] = {"imported": len(records)}
    _write_stats(out, summary)
    result = FeedbackResult(
        output_dir=out,
        prompts=len(records),
        already_rated=0,
        newly_rated=len(records),
        failed_prompts=0,
        pairs=summary["split"]["train"],
        test_pairs=summary["split"]["test"],
        stats=summary,
    )
    print(
        f"feedback {cfg.prompts} -> {out}\n  imported {len(records)} raw UltraFeedback records "
        f"(score: {cfg.score})\n  pairs: {result.pairs} train, {result.test_pairs} test"
    )
    return result


def _rated_ids(path: Path, judge: str) -> set[str]:
    records = io.read_jsonl_resumable(path)
    for line, record in enumerate(records, start=1):
        if record.get("judge") != judge:
            raise ConfigError(
                f"{path}:{line}: rated by judge {record.get('judge')!r}, this run's judge is {judge!r}; "
                "use another output_dir, or remove the file to rate again"
            )
    return {r["prompt_id"] for r in records}


def _resident(factory: GeneratorFactory | None, out: Path) -> Resident:
    """The stage's generators: built by `factory` (one instance per config), else by `make_generator` with
    each config's backend options (configs of one model and options share an instance)."""
    if factory is not None:
        return Resident(factory, key=id)
    return Resident(builder(out), key=partial(load_key, output_dir=out))


def _rate_prompts(
    cfg: FeedbackConfig, todo: list[Prompt], resident: Resident, out: Path
) -> tuple[int, dict[str, Any]]:
    """Generate every completion of `todo` (model-major), then judge them, appending each chunk's records;
    returns the prompts without any completion and the usage of this run."""
    from tqdm.auto import tqdm

    pool, k = cfg.generators, cfg.completions_per_prompt
    draws = {p.prompt_id: draw_generators(p.prompt_id, len(pool), k, cfg.seed) for p in todo}
    answers_cache = ResponseCache(out / LOCAL_ANSWERS)
    try:
        with tqdm(total=len(todo) * k, desc="feedback: generate", unit="completion", disable=None) as bar:
            generated = generate_all(
                todo,
                draws,
                pool,
                resident,
                seed=cfg.seed,
                chunk=cfg.chunk_prompts,
                answers_cache=answers_cache,
                last=cfg.judge.model,
                progress=bar.update,
            )
    finally:
        answers_cache.close()
    answered, lost = {}, {}
    for prompt in todo:
        pairs = [(pool[g], generated[(prompt.prompt_id, g)]) for g in draws[prompt.prompt_id]]
        answered[prompt.prompt_id] = [(g, c) for g, c in pairs if _failure(c) is None]
        lost[prompt.prompt_id] = [(g, why) for g, c in pairs if (why := _failure(c)) is not None]
        if not answered[prompt.prompt_id]:
            reasons = "; ".join(f"{g.label}: {why}" for g, why in lost[prompt.prompt_id])
            logger.warning("prompt %s: no completion could be generated (%s)", prompt.prompt_id, reasons)
    ready = [p for p in todo if answered[p.prompt_id]]
    # the judge loads after every generator is released (or is the model still loaded: the last one)
    if not resident.holds(cfg.judge.model):
        resident.release()
    judge = Judge(cfg.judge, resident.get(cfg.judge.model), seed=cfg.seed, audit_path=out / AUDIT)
    with tqdm(total=len(ready), desc="feedback: judge", unit="prompt", disable=None) as bar:
        for start in range(0, len(ready), cfg.chunk_prompts):
            chunk = ready[start : start + cfg.chunk_prompts]
            items = [
                JudgeItem(p.prompt_id, p.messages, [c.text for _, c in answered[p.prompt_id]]) for p in chunk
            ]
            for prompt, result in zip(chunk, judge.rate(items), strict=True):
                record = rated_record(
                    prompt, answered[prompt.prompt_id], lost[prompt.prompt_id], result, judge.judge_id
                )
                io.append_jsonl(out / RATED, record)
            bar.update(len(chunk))
    usage = {"judge": judge.usage(), "generators": resident.usage()}
    return len(todo) - len(ready), usage


def _warn_foreign(records: list[dict], prompts_: list[Prompt]) -> None:
    ids = {p.prompt_id for p in prompts_}
    foreign = sum(r["prompt_id"] not in ids for r in records)
    if foreign:
        logger.warning(
            "%d rated records are for prompts not in this run's input (an earlier run's); they are kept and used",
            foreign,
        )


def _write_pairs_and_stats(cfg: FeedbackConfig, out: Path, records: list[dict], scale: int) -> dict[str, Any]:
    """Binarize all rated records into the pair files; returns the statistics."""
    pairs, bstats = binarize.binarize_all(
        records,
        rejected=cfg.rejected,
        min_margin=cfg.min_margin,
        rng_seed=cfg.seed,
        drop_ties=cfg.drop_ties,
        tie_break=cfg.tie_break,
        score=cfg.score,
    )
    train, test = (
        io.train_eval_split(pairs, cfg.eval_fraction, cfg.seed) if cfg.eval_fraction > 0 else (pairs, [])
    )
    io.write_jsonl(out / PAIRS, train)
    if cfg.eval_fraction > 0:
        io.write_jsonl(out / PAIRS_TEST, test)
    else:
        (out / PAIRS_TEST).unlink(missing_ok=True)  # a stale split of an earlier run must not be read
    summary = feedback_stats(records, scale, pairs, bstats, prices=cfg.price_table())
    summary["split"] = {"train": len(train), "test": len(test), "eval_fraction": cfg.eval_fraction}
    return summary


def feedback_stats(
    records: Sequence[Mapping[str, Any]],
    scale: int,
    pairs: Sequence[Mapping[str, Any]],
    bstats: binarize.BinarizeStats,
    *,
    prices: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """`stats.summarize` over rated records, from the judgments they hold, plus generation failures; the
    cost of the tokens at `prices` (USD per million, by generator or judge name)."""
    parsed, repeats, positions = [], [], []
    for record in records:
        for completion in record["completions"]:
            by_aspect: dict[str, list[tuple[int, float | None]]] = {}
            for j in completion.get("judgments", []):
                parsed.append(Rating(j["value"], j["reason"]))
                positions.append((j["position"], j["value"]))
                by_aspect.setdefault(j["aspect"], []).append((j["repeat"], j["value"]))
            repeats += [[v for _, v in sorted(values)] for values in by_aspect.values()]
    summary = stats.summarize(
        records,
        scale,
        parsed=parsed,
        repeats=repeats,
        positions=positions,
        pairs=pairs,
        binarize_stats=bstats,
        prices=prices,
    )
    failures = Counter(f["error"] for r in records for f in r.get("generation_failures", []))
    summary["generation_failures"] = {
        "total": sum(failures.values()),
        "by_error": dict(failures.most_common()),
    }
    summary["judges"] = sorted({str(r.get("judge")) for r in records})
    return summary


def _write_stats(out: Path, summary: dict[str, Any]) -> None:
    io.write_text(out / STATS, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    io.write_text(out / "feedback_stats.md", stats.render_markdown(summary) + _extra_markdown(summary))
    try:
        (out / RATINGS_PLOT).write_bytes(stats.histograms_png(summary["histograms"]))
    except ImportError as exc:
        logger.warning("%s not written: %s", RATINGS_PLOT, exc)


def _extra_markdown(summary: Mapping[str, Any]) -> str:
    lines = ["", "### Judge", "", f"Judge id: {', '.join(summary['judges']) or '–'}"]
    failures = summary["generation_failures"]
    lines += ["", "### Generation failures", "", f"{failures['total']} completions could not be generated."]
    lines += [f"- {n} × {error}" for error, n in failures["by_error"].items()]
    run = summary.get("this_run", {})
    if judge := run.get("judge"):
        backend = judge["backend"]
        line = f"Judge calls: {judge['calls']} ({judge['failed_calls']} failed)"
        if (
            backend["prompt_tokens"] or backend["completion_tokens"]
        ):  # local forced-prefix scoring counts none
            line += f"; judge tokens: {backend['prompt_tokens']} prompt, {backend['completion_tokens']} completion"
        if backend.get("cost") is not None:
            line += f"; cost ${backend['cost']:.4f}"
        lines += ["", "### This run", "", line + "."]
    if run.get("prompts_without_completions"):
        lines.append(
            f"Prompts without any completion (retried by a rerun): {run['prompts_without_completions']}."
        )
    return "\n".join(lines) + "\n"


def _summary(cfg: FeedbackConfig, result: FeedbackResult) -> str:
    failures = result.stats.get("parse_failures", {})
    return (
        f"feedback {cfg.prompts} -> {result.output_dir}\n"
        f"  prompts: {result.prompts} ({result.already_rated} already rated, {result.newly_rated} rated now, "
        f"{result.failed_prompts} without completions)\n"
        f"  ratings read: {failures.get('parsed', 0)} of {failures.get('total', 0)}; "
        f"failures: {', '.join(f'{k} {v}' for k, v in failures.get('failed', {}).items() if v) or 'none'}\n"
        f"  pairs: {result.pairs} train, {result.test_pairs} test"
    )
