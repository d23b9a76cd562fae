"""`zephyr eval mt-bench`: answer the MT-Bench questions with a model, grade them with a judge, report.

The protocol is FastChat `llm_judge`'s single-answer grading (see `zephyr.evaluation.mt_bench`):

1. Turn 1 of every question is answered, then turn 2 with the conversation `[q1, a1, q2]`, each through the
   model's own chat template (the generator's tokenizer decides it, never the model's name). The sampling
   temperature is the category's (`Question.temperature`; FastChat decodes greedily below 1e-4), so every
   turn is one batched `generate` call per temperature.
2. Every turn is judged with `mt_bench.judge_messages` (reference answers for math, reasoning and coding),
   all in one batched judge call.
3. Written to the output folder: `answers.jsonl`, `judgments.jsonl` (one line per judge call: the exact
   messages, the raw answer, the score or null and the reason), `results.json` (`mt_bench.aggregate` with
   the failures counted), `results.md` and `categories.png`.

A turn whose answer could not be generated is not sent to the judge: its judgment line has no messages, a
null score and the reason, and it counts as a failure. An existing `answers.jsonl` that covers every
question with every turn is reused (the judge is run again), so a run that stopped while judging resumes
without regenerating.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr.errors import DataError
from zephyr.evaluation import mt_bench
from zephyr.evaluation.mt_bench import Judgment, Question
from zephyr.generation import Completion, Generator, SamplingParams, make_generator

# FastChat gen_model_answer.py: `do_sample = temperature >= 1e-4`.
GREEDY_BELOW = 1e-4
# Sampled categories get a fixed seed so that a run can be repeated.
ANSWER_SEED = 0
ANSWER_FAILED = "the model's answer could not be generated"


@dataclass
class Answer:
    """The model's answers to one question, one entry per turn (a line of answers.jsonl)."""

    question_id: int
    category: str
    model: str
    turns: list[str]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    errors: list[str | None]

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def run_mt_bench(
    model: str,
    judge: str,
    out: str | os.PathLike,
    questions: str | os.PathLike | None = None,
    limit: int | None = None,
    max_new_tokens: int = 1024,
    judge_max_tokens: int = 2048,
    *,
    model_generator: Generator | None = None,
    judge_generator: Generator | None = None,
) -> dict[str, Any]:
    """Run MT-Bench (module docstring) and return the results (also written to `out/results.json`).

    `model` and `judge` are model specs (`make_generator`); `model_generator` / `judge_generator`, when
    given, are used instead of loading them. The same spec for both loads one model.
    """
    folder = _asset_folder()
    question_list = mt_bench.load_questions(questions or folder / "question.jsonl")
    if limit is not None:
        question_list = question_list[:limit]
    if not question_list:
        raise DataError(f"{questions or folder / 'question.jsonl'}: no questions")
    judge_prompts = mt_bench.load_judge_prompts(folder / "judge_prompts.jsonl")
    references = mt_bench.load_references(folder / "reference_answer" / "gpt-4.jsonl")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    answers = _read_answers(out / "answers.jsonl", question_list, model)
    if answers is None:
        model_generator = model_generator or make_generator(model)
        answers = answer_questions(model_generator, question_list, max_new_tokens, label=model)
        _write_jsonl(out / "answers.jsonl", [a.to_dict() for a in answers])

    if judge_generator is None:
        judge_generator = model_generator if judge == model and model_generator else make_generator(judge)
    judge_params = SamplingParams(max_tokens=judge_max_tokens, temperature=0.0)  # FastChat: judge at 0
    records = judge_answers(judge_generator, judge_params, question_list, answers, judge_prompts, references)
    _write_jsonl(out / "judgments.jsonl", records)

    judgments = [Judgment.from_record(r) for r in records]
    results = {
        "model": model,
        "judge": judge,
        **mt_bench.aggregate(judgments, question_list),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(results_markdown(results), encoding="utf-8")
    _plot(results, out / "categories.png")
    return results


def _asset_folder() -> Path:
    from zephyr import assets

    return Path(assets.fetch("mt-bench"))


# ---------------------------------------------------------------------------------------------------------
# Answering


def answer_params(question: Question, max_new_tokens: int) -> SamplingParams:
    temperature = question.temperature
    if temperature < GREEDY_BELOW:
        return SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    return SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=ANSWER_SEED)


def answer_questions(
    generator: Generator, questions: Sequence[Question], max_new_tokens: int, label: str | None = None
) -> list[Answer]:
    """Every turn of every question, turn by turn; each turn one `generate` call per temperature.
    `label` names the model in the answers (default: the generator's `model_id`)."""
    label = label or generator.model_id
    answers = [Answer(q.question_id, q.category, label, [], [], [], [], []) for q in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        groups: dict[SamplingParams, list[int]] = {}
        for i, q in enumerate(questions):
            if turn < len(q.turns):
                groups.setdefault(answer_params(q, max_new_tokens), []).append(i)
        for params, indices in groups.items():
            conversations = [_conversation(questions[i], answers[i], turn) for i in indices]
            completions = generator.generate(conversations, params)
            if len(completions) != len(indices):
                raise DataError(f"model {generator.model_id}: {len(completions)} answers for {len(indices)}")
            for i, completion in zip(indices, completions, strict=True):
                _add_turn(answers[i], completion)
    return answers


def _conversation(question: Question, answer: Answer, turn: int) -> list[dict[str, str]]:
    messages = []
    for k in range(turn):
        messages += [
            {"role": "user", "content": question.turns[k]},
            {"role": "assistant", "content": answer.turns[k]},
        ]
    return [*messages, {"role": "user", "content": question.turns[turn]}]


def _add_turn(answer: Answer, completion: Completion) -> None:
    # FastChat strips the generated text (gen_model_answer.py: `output.strip()`).
    answer.turns.append(completion.text.strip())
    answer.finish_reasons.append(completion.finish_reason)
    answer.prompt_tokens.append(completion.prompt_tokens)
    answer.completion_tokens.append(completion.completion_tokens)
    answer.errors.append(None if completion.ok else (completion.error or "unknown error"))


def _read_answers(path: Path, questions: Sequence[Question], model: str) -> list[Answer] | None:
    """The answers of `model` from an earlier run, when they cover every question and turn without errors;
    else None."""
    if not path.exists():
        return None
    by_id = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            by_id[record["question_id"]] = Answer(**record)
        except (json.JSONDecodeError, KeyError, TypeError):
            return None  # a partial or foreign file: answer again
    answers = [by_id.get(q.question_id) for q in questions]
    complete = all(
        a is not None and a.model == model and len(a.turns) == len(q.turns) and not any(a.errors)
        for a, q in zip(answers, questions, strict=True)
    )
    return answers if complete else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Judging


def judge_answers(
    generator: Generator,
    params: SamplingParams,
    questions: Sequence[Question],
    answers: Sequence[Answer],
    judge_prompts: Mapping[str, mt_bench.JudgePrompt],
    references: Mapping[int, list[str]],
) -> list[dict[str, Any]]:
    """One judgments.jsonl record per (question, turn), in question order; one batched judge call."""
    from zephyr.feedback.judge import JudgeClient, JudgeRequest, Rating, audit_record

    client = JudgeClient(generator, params, judge_id=judge_id(generator, params))
    requests, records = [], []
    for question, answer in zip(questions, answers, strict=True):
        for turn in range(1, len(question.turns) + 1):
            meta = {"question_id": question.question_id, "turn": turn, "category": question.category}
            messages, prompt_name = mt_bench.judge_messages(
                question, answer.turns, turn, judge_prompts, references.get(question.question_id)
            )
            failed = [e for e in answer.errors[:turn] if e]
            if failed:  # grading an empty answer would read as a bad answer, not as a failed run
                reason = f"{ANSWER_FAILED}: {failed[0]}"
                records.append(meta | {"judge_prompt": prompt_name, "messages": None, "raw": None})
                records[-1] |= {"score": None, "reason": reason}
                continue
            records.append(meta)
            requests.append(
                JudgeRequest(
                    f"{question.question_id}/{turn}",
                    messages,
                    parse=lambda a: [Rating(*mt_bench.parse_score(a.text))],
                    slots=({"question_id": question.question_id, "turn": turn},),
                    meta=meta | {"judge_prompt": prompt_name},
                )
            )
    replies = iter(client.judge(requests))
    for k, record in enumerate(records):
        if "messages" not in record:
            reply = next(replies)
            [rating] = reply.ratings
            records[k] = audit_record(client.judge_id, reply) | {
                "score": rating.value,
                "reason": rating.reason,
            }
    return records


def judge_id(generator: Generator, params: SamplingParams) -> str:
    """`MODEL|HASH`: the judge model and a hash of its sampling parameters and the grading mode."""
    pinned = {"mode": "mt-bench-single", "sampling": params.to_dict()}
    digest = hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()
    return f"{generator.model_id}|{digest[:12]}"


# ---------------------------------------------------------------------------------------------------------
# Reports


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.2f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results as a Markdown report: overall, per turn, per category, failures."""
    lines = [
        f"# MT-Bench: {results['model']}",
        "",
        f"Judge: {results['judge']}",
        "",
        f"**Score: {_fmt(results['score'])}** ({results['n_scored']} of {results['n']} judgments scored, "
        f"{results['n_failed']} failed)",
        "",
        "| turn | score | scored | failed |",
        "|---|---|---|---|",
    ]
    for turn, summary in results["turns"].items():
        lines.append(f"| {turn} | {_fmt(summary['score'])} | {summary['n_scored']} | {summary['n_failed']} |")
    lines += ["", "| category | score | turn 1 | turn 2 | scored | failed |", "|---|---|---|---|---|---|"]
    for category, s in results["categories"].items():
        lines.append(
            f"| {category} | {_fmt(s['score'])} | {_fmt(s.get('turn_1'))} | {_fmt(s.get('turn_2'))} "
            f"| {s['n_scored']} | {s['n_failed']} |"
        )
    if results["failures"]:
        lines += ["", "Failures (not in the means):", ""]
        lines += [
            f"- question {f['question_id']} turn {f['turn']}: {f['reason']}" for f in results["failures"]
        ]
    if results.get("missing"):
        lines += ["", f"Missing judgments: {len(results['missing'])}"]
    return "\n".join(lines) + "\n"


def _plot(results: Mapping[str, Any], path: Path) -> None:
    from zephyr.evaluation.plots import category_plot

    if len(results["categories"]) >= 3:  # a radar needs three spokes; a --limit run may have fewer
        category_plot({results["model"]: results}, path)


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)
