"""Log-likelihood multiple choice (`zephyr eval mc`) with lm-evaluation-harness semantics, faster.

What is scored is exactly what lm-eval's `hf` model scores for a `multiple_choice` task:
- context = [description] + k few-shot examples `query + " " + gold choice + "\\n\\n"` + the item's query;
  continuation = `" " + choice` (lm-eval's target and few-shot delimiters). Few-shot examples are drawn as
  lm-eval draws them: by default `random.Random(1234).sample(pool, k)`, one generator for the whole run so
  its state carries from item to item; `first_n` (MMLU) takes the pool's first k. When the pool is the
  evaluated file itself, the item is left out of its own examples (lm-eval samples k + 1 and drops it).
- tokens: trailing whitespace of the context moves to the continuation; continuation ids =
  tok(context + continuation)[len(tok(context)):]; the tokenizer's own special-token rule (no BOS added
  when the text already starts with it); an empty context is the BOS (else EOS) token.
- a request longer than max_length + 1 tokens keeps its last max_length + 1 tokens (left truncation).
- log p(continuation | context) = the sum of the continuation tokens' log-softmax, in float32.

What makes it faster: lm-eval runs the context once per choice (and computes a log-softmax over the whole
vocabulary at every position). Here an item's context and its choices are one group of
`zephyr.scoring.continuations`: the context runs once for all choices, each choice attends to the context and
to itself only, with positions that continue the context, and the LM head and log-softmax run only where a
continuation token is predicted. Groups are packed without padding, longest first, and a batch is never
larger than lm-eval's batch of `batch_size` requests (at most `batch_size` items, and no more tokens than
`batch_size` of its longest request), so it holds several times more items. A choice whose request would be
truncated gets a group of its own with lm-eval's window, so results stay identical. lm-eval's `is_greedy`
(whether each continuation token is the argmax) is not computed: no multiple-choice metric reads it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zephyr import io
from zephyr.core.config import McEvalConfig
from zephyr.core.errors import ConfigError, DataError
from zephyr.core.specs import is_hub_spec
from zephyr.models.load import load_model, load_tokenizer
from zephyr.scoring.attention import register_packed_attention
from zephyr.scoring.continuations import score_groups
from zephyr.stages import stage
from zephyr.stages.mc import metrics
from zephyr.stages.mc.presets import Preset, get_preset, hub_records, mmlu_description

logger = logging.getLogger(__name__)

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter: between a query and a choice
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter: after each few-shot example
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither the config nor the tokenizer names a length
_TOKENIZER_INFINITY = int(1e30)  # transformers' "no limit" model_max_length
# the stage table declares the outputs
RESULTS, ITEMS, MARKDOWN = (stage("mc").output(part) for part in ("results", "items", "markdown"))


# ---------------------------------------------------------------------------------------------------------
# Tasks and contexts (pure)


@dataclass
class McTask:
    """What to evaluate: the items (input order), the few-shot pools and descriptions per group (MMLU:
    per subject; otherwise one group ""), and how examples are drawn."""

    records: list[dict]
    pools: dict[str, list[dict]]
    descriptions: dict[str, str]
    num_fewshot: int
    sampler: str  # "random" | "first_n"
    exclude_self: bool  # the pool is the evaluated file: an item is never its own example
    metric: str  # the headline metric
    group_key: str | None = None  # the record field that names an item's group ("subject")
    source: str = ""
    fewshot_source: str | None = None
    preset: str | None = None

    def group(self, record: dict) -> str:
        return str(record[self.group_key]) if self.group_key else ""


def fewshot_example(record: dict) -> str:
    """A solved example: the query, the gold choice (the first, for several) and the few-shot delimiter."""
    gold = metrics.gold_indices(record["gold"])[0]
    return record["query"] + TARGET_DELIMITER + record["choices"][gold] + FEWSHOT_DELIMITER


def build_context(query: str, shots: Sequence[dict] = (), description: str = "") -> str:
    return description + "".join(fewshot_example(shot) for shot in shots) + query


class FewshotSampler:
    """lm-eval's context samplers: `random` (its default, seeded once) and `first_n`."""

    def __init__(
        self, pool: Sequence[dict], k: int, method: str, *, exclude_self: bool, seed: int = FEWSHOT_SEED
    ):
        if method not in ("random", "first_n"):
            raise ConfigError(f"few-shot sampler {method!r}: expected random or first_n")
        needed = k + 1 if exclude_self and method == "random" else k
        if k and len(pool) < needed:
            raise DataError(
                f"{k} few-shot examples asked for, but the pool holds {len(pool)} (needs {needed})"
            )
        self.pool = list(pool)
        self.k = k
        self.method = method
        self.exclude_self = exclude_self
        self.rng = random.Random(seed)

    def sample(self, record: dict) -> list[dict]:
        if self.k == 0:
            return []
        if self.method == "first_n":
            others = self._others(record) if self.exclude_self else self.pool
            if len(others) < self.k:
                raise DataError(
                    f"item {record['id']!r}: {self.k} few-shot examples asked for, {len(others)} left"
                )
            return others[: self.k]
        if not self.exclude_self:
            return self.rng.sample(self.pool, self.k)
        # lm-eval draws one spare and drops the item itself; redraws from the others if that left too few.
        shots = [x for x in self.rng.sample(self.pool, self.k + 1) if x["id"] != record["id"]][: self.k]
        return shots if len(shots) == self.k else self.rng.sample(self._others(record), self.k)

    def _others(self, record: dict) -> list[dict]:
        return [x for x in self.pool if x["id"] != record["id"]]


def build_contexts(task: McTask) -> list[str]:
    """The context of every item, in input order (each group's sampler sees its items in that order)."""
    samplers = {}
    for group, pool in task.pools.items():
        try:
            samplers[group] = FewshotSampler(
                pool, task.num_fewshot, task.sampler, exclude_self=task.exclude_self
            )
        except DataError as exc:
            where = (
                f"{task.fewshot_source}: {task.group_key} {group!r}" if group else str(task.fewshot_source)
            )
            raise DataError(f"{where}: {exc}") from None
    contexts = []
    for record in task.records:
        group = task.group(record)
        if group not in samplers:
            raise DataError(f"item {record['id']!r}: no few-shot pool for {task.group_key} {group!r}")
        shots = samplers[group].sample(record)
        contexts.append(build_context(record["query"], shots, task.descriptions.get(group, "")))
    return contexts


# ---------------------------------------------------------------------------------------------------------
# Tokenization (lm-eval's HFLM for a causal LM)


Pair = tuple[list[int], list[int]]  # (context ids, continuation ids) of one request


class LmEvalTokenization:
    """Context and continuation ids as lm-eval's `HFLM.loglikelihood` / `_encode_pair` make them."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.prefix_id: int = bos if bos is not None else tokenizer.eos_token_id
        self.prefix_text: str = tokenizer.decode(self.prefix_id)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            # The tokenizer's default, except that a text already starting with BOS gets no second one.
            add_special_tokens = False if text.startswith(self.prefix_text) else None
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(text, **kwargs))

    def encode_pair(self, context: str, continuation: str) -> Pair:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            return ([self.prefix_id], cont) if cont[0] != self.prefix_id else (cont[:1], cont[1:])
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        whole = self.encode(stripped + continuation)
        context_ids = self.encode(stripped)
        return context_ids, whole[len(context_ids) :]

    def encode_choices(self, context: str, choices: Sequence[str]) -> list[Pair]:
        return [self.encode_pair(context, TARGET_DELIMITER + choice) for choice in choices]


def model_max_length(config: Any, tokenizer: Any) -> int:
    """lm-eval's `resolve_max_length`: the config's length (text_config first), the tokenizer's, else 2048."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length is not None and length != _TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


# ---------------------------------------------------------------------------------------------------------
# Rows: one context with the continuations that share it (pure)


@dataclass(frozen=True)
class Row:
    """Choices of one item scored over the same context window: a group of the scoring primitive."""

    item: int
    choices: tuple[int, ...]
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def request_window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The context a request is scored with: all of it, or (lm-eval's left truncation) its last tokens so
    that context + continuation is max_length + 1 tokens (the model sees max_length of them)."""
    if not continuation:
        raise DataError("a choice encodes to no continuation token")
    if len(continuation) > max_length:
        raise DataError(f"a choice of {len(continuation)} tokens does not fit max_length {max_length}")
    keep = max_length + 1 - len(continuation)
    return tuple(context[-keep:]) if len(context) > keep else tuple(context)


def is_truncated(pair: Pair, max_length: int) -> bool:
    return len(pair[0]) + len(pair[1]) > max_length + 1


def plan_rows(item: int, pairs: Sequence[Pair], max_length: int) -> list[Row]:
    """The rows of one item: choices whose scoring windows hold the same context share a row (all of them,
    unless truncation cut the context differently per choice)."""
    grouped: dict[tuple[int, ...], list[int]] = {}
    for choice, (context, continuation) in enumerate(pairs):
        try:
            window = request_window(context, continuation, max_length)
        except DataError as exc:
            raise DataError(f"choice {choice}: {exc}") from None
        if not window:
            raise DataError(f"choice {choice}: the context encodes to no token")
        grouped.setdefault(window, []).append(choice)
    return [
        Row(item, tuple(choices), window, tuple(tuple(pairs[c][1]) for c in choices))
        for window, choices in grouped.items()
    ]


# ---------------------------------------------------------------------------------------------------------
# Scoring


def score_items(
    model: Any,
    items: Sequence[Sequence[Pair]],
    *,
    batch_size: int,
    max_length: int,
    progress: bool = True,
    item_names: Sequence[Any] | None = None,
) -> list[list[float]]:
    """Log-likelihood of each choice of each item (`items[i]` = the encoded requests of item i's choices)."""
    from tqdm.auto import tqdm

    rows: list[Row] = []
    for i, pairs in enumerate(items):
        try:
            rows += plan_rows(i, pairs, max_length)
        except DataError as exc:
            name = item_names[i] if item_names is not None else i
            raise DataError(f"item {name!r}: {exc}") from None
    rows_left = Counter(row.item for row in rows)
    with tqdm(total=len(items), desc="Scoring items", unit="item", disable=not progress) as bar:

        def done(indices: list[int]) -> None:
            for i in indices:
                rows_left[rows[i].item] -= 1
                bar.update(int(rows_left[rows[i].item] == 0))

        groups = [(row.context, row.continuations) for row in rows]
        sums = score_groups(model, groups, batch_size=batch_size, on_batch=done).sums.tolist()
    lls: list[list[float]] = [[float("nan")] * len(pairs) for pairs in items]
    requests = ((row.item, choice) for row in rows for choice in row.choices)
    for (item, choice), value in zip(requests, sums, strict=True):
        lls[item][choice] = value
    return lls


# ---------------------------------------------------------------------------------------------------------
# Loading a task: a file, or a preset (its hub splits, or files in its form)


def _read_mc(path: str) -> list[dict]:
    return io.read_records(path, "mc", on_bad_record="error").records


def _limit_per_group(records: list[dict], limit: int | None, group_key: str | None) -> list[dict]:
    """The first `limit` items (of each group: lm-eval's --limit applies to each task, e.g. MMLU subject)."""
    if limit is None:
        return records
    taken: Counter[str] = Counter()
    kept = []
    for record in records:
        group = str(record[group_key]) if group_key else ""
        if taken[group] < limit:
            taken[group] += 1
            kept.append(record)
    return kept


def _check_group_field(records: list[dict], source: str, key: str) -> None:
    for record in records:
        if not isinstance(record.get(key), str) or not record[key]:
            raise DataError(
                f"{source}: item {record['id']!r}: {key}: missing (the mmlu preset groups by {key})"
            )


def _group(records: list[dict], key: str | None) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record[key]) if key else "", []).append(record)
    return groups


def load_task(
    *,
    data: str | None,
    fewshot_data: str | None,
    num_fewshot: int | None,
    limit: int | None,
    preset: str | None,
) -> McTask:
    """Items, few-shot pools and settings, validated before any model is loaded."""
    if preset is None:
        return _file_task(data, fewshot_data, num_fewshot or 0, limit)
    return _preset_task(get_preset(preset), data, fewshot_data, num_fewshot, limit)


def _file_task(data: str | None, fewshot_data: str | None, k: int, limit: int | None) -> McTask:
    if data is None:
        raise ConfigError("eval mc: give --data FILE (MC JSONL) or --preset NAME")
    records = _read_mc(data)
    if fewshot_data is not None:
        pool = _read_mc(fewshot_data) if k else []
        exclude_self = (
            Path(fewshot_data).resolve() == Path(data).resolve() if not is_hub_spec(data) else False
        )
    else:
        # No separate pool: examples come from the evaluated file itself (all of it, not only the first
        # `limit` items), never an item for itself — lm-eval's rule when a task has only a test split.
        pool, exclude_self = (records if k else []), True
    return McTask(
        records=_limit_per_group(records, limit, None),
        pools={"": pool},
        descriptions={},
        num_fewshot=k,
        sampler="random",
        exclude_self=exclude_self,
        metric="mc2" if any(isinstance(r["gold"], list) for r in records) else "acc",
        source=data,
        fewshot_source=(fewshot_data if fewshot_data is not None else data) if k else None,
    )


def _preset_task(
    p: Preset, data: str | None, fewshot_data: str | None, k: int | None, limit: int | None
) -> McTask:
    k = p.num_fewshot if k is None else k
    records = _read_mc(data) if data is not None else hub_records(p, p.eval_split)
    source = data or f"hf:{p.hub_path}:{p.eval_split}"
    pool: list[dict] = []
    fewshot_source = None
    if k and fewshot_data is not None:
        pool, fewshot_source = _read_mc(fewshot_data), fewshot_data
    elif k and data is not None:
        raise ConfigError(
            f"preset {p.name}: {k}-shot examples come from the {p.fewshot_split or p.eval_split} split; with "
            f"--data, pass that split as --fewshot-data FILE (MC JSONL), or --num-fewshot 0"
        )
    elif k:
        if p.fewshot_split is None:
            raise ConfigError(f"preset {p.name} has no few-shot split; use --fewshot-data FILE")
        pool, fewshot_source = hub_records(p, p.fewshot_split), f"hf:{p.hub_path}:{p.fewshot_split}"
    key = "subject" if p.by_subject else None
    if key:
        _check_group_field(records, source, key)
        _check_group_field(pool, fewshot_source or "", key)
    records = _limit_per_group(records, limit, key)
    groups = sorted({str(r[key]) for r in records}) if key else [""]
    pools = _group(pool, key) if key else {"": pool}
    return McTask(
        records=records,
        pools={group: pools.get(group, []) for group in groups},
        descriptions={group: mmlu_description(group) for group in groups} if key else {},
        num_fewshot=k,
        sampler=p.sampler,
        exclude_self=False,
        metric=p.metric,
        group_key=key,
        source=source,
        fewshot_source=fewshot_source,
        preset=p.name,
    )


# ---------------------------------------------------------------------------------------------------------
# Results


def item_results(task: McTask, lls: Sequence[Sequence[float]]) -> list[dict]:
    """One line per item: its log-likelihoods, predictions and metrics."""
    truthful = task.metric in ("mc1", "mc2") or any(isinstance(r["gold"], list) for r in task.records)
    lines = []
    for record, item_lls in zip(task.records, lls, strict=True):
        line: dict[str, Any] = {"id": record["id"]}
        if task.group_key:
            line[task.group_key] = record[task.group_key]
        line["gold"] = record["gold"]
        line["loglikelihoods"] = list(item_lls)
        line["pred"] = metrics.argmax(item_lls)
        line["pred_norm"] = metrics.argmax(metrics.normalized_lls(item_lls, record["choices"]))
        line.update(metrics.item_metrics(item_lls, record["choices"], record["gold"], truthful=truthful))
        lines.append(line)
    return lines


def summarize_items(task: McTask, lines: Sequence[dict]) -> dict[str, Any]:
    names = [n for n in ("acc", "acc_norm", "mc1", "mc2") if n in lines[0]]
    if not task.group_key:
        return metrics.summarize(lines, names)
    by_group = _group(list(lines), task.group_key)
    groups = {
        group: {**metrics.summarize(group_lines, names), "items": len(group_lines)}
        for group, group_lines in sorted(by_group.items())
    }
    summary: dict[str, Any] = metrics.summarize_groups(groups, names)
    # The mean over all items (lm-eval's group score with weight_by_size), next to the unweighted one.
    summary.update({f"{name}_weighted": metrics.mean([line[name] for line in lines]) for name in names})
    summary[f"{task.group_key}s"] = groups
    return summary


def render_markdown(results: dict[str, Any]) -> str:
    title = results["preset"] or Path(results["data"]).name
    lines = [
        f"# Multiple choice: {title}",
        "",
        f"model `{results['model']}` · {results['counts']['items']} items · {results['num_fewshot']}-shot "
        f"({results['fewshot_sampler']}) · max length {results['max_length']}",
        "",
        "| metric | value | stderr |",
        "|---|---:|---:|",
    ]
    for name in ("acc", "acc_norm", "mc1", "mc2"):
        if name in results:
            stderr = results[f"{name}_stderr"]
            marker = " **(score)**" if name == results["metric"] else ""
            lines.append(
                f"| {name}{marker} | {results[name]:.4f} | {'—' if stderr is None else f'{stderr:.4f}'} |"
            )
    if "subjects" in results:
        lines += ["", "| subject | items | acc | acc_norm |", "|---|---:|---:|---:|"]
        for subject, group in results["subjects"].items():
            lines.append(f"| {subject} | {group['items']} | {group['acc']:.4f} | {group['acc_norm']:.4f} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str | Path, results: dict[str, Any], lines: Sequence[dict]) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    io.write_jsonl(folder / ITEMS, lines)
    io.write_text(folder / RESULTS, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    io.write_text(folder / MARKDOWN, render_markdown(results))


# ---------------------------------------------------------------------------------------------------------
# The command


def _load_model(spec: str, device: str | None) -> tuple[Any, Any]:
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, dtype=torch.float32, attn_implementation=register_packed_attention()).eval()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, tokenizer


def _run_info(task: McTask, model: str, pairs: Sequence[Sequence[Pair]], truncated: int) -> dict[str, Any]:
    return {
        "model": model,
        "preset": task.preset,
        "data": task.source,
        "fewshot_data": task.fewshot_source,
        "num_fewshot": task.num_fewshot,
        "fewshot_sampler": f"random (seed {FEWSHOT_SEED})" if task.sampler == "random" else task.sampler,
        "metric": task.metric,
        "counts": {
            "items": len(pairs),
            "requests": sum(len(item) for item in pairs),
            "truncated_requests": truncated,
        },
    }


def run_mc(cfg: McEvalConfig, model: str, out: str | Path, *, device: str | None = None) -> dict[str, Any]:
    """Score every item of `cfg.data` (or of a preset's dataset) with `model`; write results.json, items.jsonl
    and results.md into `out`; return the results. `num_fewshot` None: the preset's (0 without one);
    `max_length` None: the model's (as lm-eval resolves it)."""
    io.check_output_dir(out)  # before the model loads: an unwritable or full folder fails now
    task = load_task(
        data=cfg.data,
        fewshot_data=cfg.fewshot_data,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        preset=cfg.preset,
    )
    contexts = build_contexts(task)  # before the model loads: few-shot problems surface at once
    lm, tokenizer = _load_model(model, device)
    max_length = cfg.max_length or model_max_length(lm.config, tokenizer)
    encoder = LmEvalTokenization(tokenizer)
    pairs = [encoder.encode_choices(ctx, r["choices"]) for ctx, r in zip(contexts, task.records, strict=True)]
    truncated = sum(is_truncated(pair, max_length) for item in pairs for pair in item)
    if truncated:
        logger.warning("%d requests exceed max_length %d: truncated from the left", truncated, max_length)
    started = time.perf_counter()
    ids = [r["id"] for r in task.records]
    lls = score_items(lm, pairs, batch_size=cfg.batch_size, max_length=max_length, item_names=ids)
    seconds = time.perf_counter() - started
    lines = item_results(task, lls)
    summary = summarize_items(task, lines)
    results = {
        **_run_info(task, model, pairs, truncated),
        "max_length": max_length,
        "batch_size": cfg.batch_size,
        "seconds": round(seconds, 3),
        "items_per_second": round(len(lines) / seconds, 3) if seconds > 0 else None,
        "score": summary[task.metric],
        **summary,
    }
    write_outputs(out, results, lines)
    logger.info("%s: %s = %.4f over %d items", task.source, task.metric, results["score"], len(lines))
    return results
