"""MT-Bench: judge prompts, score parsing and aggregation, the same as FastChat's `llm_judge`.

Single-answer grading (the MT-Bench score). Every question is judged twice: turn 1 sees the first question and
answer; turn 2 sees the whole two-turn conversation and grades the second answer. Math, reasoning and coding
questions (`NEED_REF_CATEGORIES`) are graded against GPT-4's reference answers. The judge prompt is picked and
filled exactly as FastChat's `gen_judgment.py` / `common.py` do:

| category               | turn 1            | turn 2                        |
|------------------------|-------------------|-------------------------------|
| math, reasoning, coding| `single-math-v1`  | `single-math-v1-multi-turn`   |
| every other category   | `single-v1`       | `single-v1-multi-turn`        |

The template is filled with `str.format` and sent as two chat messages, the prompt's `system_prompt` as the
system message and the filled template as the user message (FastChat's conversation for an OpenAI judge).
The reference answers come from `reference_answer/gpt-4.jsonl`, not from the `reference` field that some
lines of `question.jsonl` carry (FastChat does not read that field either).

The score is the first `[[x]]` in the judge's answer, else the first `[x]`; no range check (as FastChat).
FastChat writes -1 when neither is found and `show_result.py` drops those rows from the means; here a
missing score is kept as a counted parse failure with its reason, and `aggregate` reports the failures next
to the means (which, like FastChat's, are over the parsed scores only).

Pairwise mode (FastChat's `pairwise-baseline`, the `pair-v2` family of prompts picked by the same table as
above with `pair-` names) is here too: `pairwise_messages`, `parse_verdict`, `combine_verdicts` and
`aggregate_pairwise`. Each (question, turn) is one game judged twice, the model as Assistant A and then the
baseline as A; a win counts only when the judge picks the same answer in both orders, every other pair of
parsed verdicts is a tie (FastChat's position swap). The win rate is FastChat's `win_rate_adjusted`,
(win + tie / 2) / games.

Logprobs mode (zephyr's, for small local judges that seldom write the format): the judge's answer is forced
to `Rating: [[` and the score is the expected rating under its next-token distribution over 1..10
(`expected_score`, with `Rating: [[1` telling 10 from 1); pairwise, forced to `[[`, the verdict is the
likeliest of A, B, C (`likeliest_verdict`). Too little probability on those tokens is a counted failure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr.core.errors import DataError
from zephyr.io import iter_rows
from zephyr.judge import parsing
from zephyr.judge.rating import Rating

# FastChat llm_judge/common.py `temperature_config`: sampling temperature of the answering model per category.
CATEGORY_TEMPERATURE: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
# FastChat llm_judge/common.py `NEED_REF_CATS` (minus arena-hard-200, not an MT-Bench category).
NEED_REF_CATEGORIES: frozenset[str] = frozenset({"math", "reasoning", "coding"})

SINGLE_PROMPTS = {  # (needs reference, turn) -> judge prompt name, as gen_judgment.make_judge_single
    (False, 1): "single-v1",
    (True, 1): "single-math-v1",
    (False, 2): "single-v1-multi-turn",
    (True, 2): "single-math-v1-multi-turn",
}
PAIR_PROMPTS = {  # as gen_judgment.make_judge_pairwise
    (False, 1): "pair-v2",
    (True, 1): "pair-math-v1",
    (False, 2): "pair-v2-multi-turn",
    (True, 2): "pair-math-v1-multi-turn",
}

NO_SCORE = "no [[rating]] or [rating] in the judge's answer"
NO_VERDICT = "no [[A]], [[B]] or [[C]] in the judge's answer"

# FastChat common.py `one_score_pattern` and `one_score_pattern_backup`, tried in this order; first match wins.
_SCORE_PATTERNS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


@dataclass(frozen=True)
class Question:
    """One line of FastChat's `question.jsonl`."""

    question_id: int
    category: str
    turns: tuple[str, ...]

    @property
    def needs_reference(self) -> bool:
        return self.category in NEED_REF_CATEGORIES

    @property
    def temperature(self) -> float:
        """FastChat's sampling temperature for the category (0.7 for categories it does not list); FastChat
        decodes greedily below 1e-4."""
        return CATEGORY_TEMPERATURE.get(self.category, 0.7)


@dataclass(frozen=True)
class JudgePrompt:
    """One line of FastChat's `judge_prompts.jsonl`."""

    name: str
    type: str  # "single" or "pairwise"
    system_prompt: str
    prompt_template: str
    output_format: str  # "[[rating]]" or "[[A]]"


@dataclass(frozen=True)
class PairJudgment:
    """One game of the model (model 1) against the baseline (model 2) at one turn.

    `first` is the judge's verdict ("A", "B", "tie") with the model as Assistant A, `swapped` with the
    baseline as A; None when the judge gave none (or was not asked: `reason` says why).
    """

    question_id: int
    category: str
    turn: int
    first: str | None
    swapped: str | None
    reason: str | None = None

    @property
    def outcome(self) -> str | None:
        """ "model_1", "model_2", "tie", or None for a failed game (`combine_verdicts`)."""
        return combine_verdicts(self.first, self.swapped)

    @property
    def inconsistent(self) -> bool:
        """Both verdicts parsed but the two orders named different winners (position bias): a tie."""
        return self.outcome is not None and verdict_winner(self.first, 1) != verdict_winner(self.swapped, 2)


@dataclass(frozen=True)
class Judgment:
    """One graded turn: `score` is None when the judge's answer held no score (`reason` says why)."""

    question_id: int
    category: str
    turn: int
    score: float | None
    reason: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any], category: str | None = None) -> Judgment:
        """From a judgments.jsonl row (`question_id`, `turn`, `score`, optional `category` and `reason`);
        `category` fills in for rows without one. FastChat's `score: -1` reads as a parse failure."""
        raw = record.get("score")
        score = None if raw is None or raw == -1 else float(raw)
        failed = score is None
        category = record.get("category", category)
        if category is None:
            raise DataError(f"judgment for question {record.get('question_id')}: category: missing")
        return cls(
            question_id=int(record["question_id"]),
            category=str(category),
            turn=int(record["turn"]),
            score=score,
            reason=record.get("reason") or (NO_SCORE if failed else None),
        )


# ---------------------------------------------------------------------------------------------------------
# Files


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, dict]]:
    for number, record, problem in iter_rows(str(path)):
        if problem is not None:  # a line that does not decode ("invalid JSON: ...", "not valid UTF-8: ...")
            detail = problem.message.removeprefix("invalid JSON: ")
            raise DataError(f"{path}:{number}: not valid JSON: {detail}")
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        yield number, record


def _field(record: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {key}: missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _string_list(record: dict, key: str, where: str) -> tuple[str, ...]:
    value = record.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise DataError(f"{where}: {key}: expected a non-empty list of strings")
    return tuple(value)


def load_questions(path: str | Path) -> list[Question]:
    """FastChat `question.jsonl`: `question_id`, `category`, `turns` (one or two user turns)."""
    questions = []
    for number, record in _read_jsonl(path):
        where = f"{path}:{number}"
        questions.append(
            Question(
                question_id=_field(record, "question_id", int, where),
                category=_field(record, "category", str, where),
                turns=_string_list(record, "turns", where),
            )
        )
    return questions


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """FastChat `judge_prompts.jsonl`, by prompt name."""
    prompts = {}
    for number, record in _read_jsonl(path):
        where = f"{path}:{number}"
        prompt = JudgePrompt(
            **{key: _field(record, key, str, where) for key in JudgePrompt.__dataclass_fields__}
        )
        prompts[prompt.name] = prompt
    return prompts


def load_references(path: str | Path) -> dict[int, list[str]]:
    """FastChat reference answers (`reference_answer/gpt-4.jsonl`): question_id -> `choices[0].turns`."""
    references = {}
    for number, record in _read_jsonl(path):
        where = f"{path}:{number}"
        choices = record.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise DataError(f"{where}: choices: expected a non-empty list of objects")
        references[_field(record, "question_id", int, where)] = list(
            _string_list(choices[0], "turns", f"{where}: choices[0]")
        )
    return references


# ---------------------------------------------------------------------------------------------------------
# Judge prompts


def _pick_prompt(
    table: Mapping[tuple[bool, int], str],
    question: Question,
    turn: int,
    judge_prompts: Mapping[str, JudgePrompt],
    reference: Sequence[str] | None,
) -> tuple[JudgePrompt, dict[str, str]]:
    """The judge prompt for (category, turn) and the reference fields of its template."""
    if turn not in (1, 2):
        raise ValueError(f"turn must be 1 or 2, got {turn!r}")
    if turn > len(question.turns):
        raise DataError(f"question {question.question_id} has {len(question.turns)} turn(s), no turn {turn}")
    name = table[(question.needs_reference, turn)]
    if name not in judge_prompts:
        raise DataError(f"judge prompts: no prompt named {name!r}")
    ref_fields: dict[str, str] = {}
    if question.needs_reference:
        if reference is None or len(reference) < turn:
            raise DataError(
                f"question {question.question_id} ({question.category}) is graded against a reference "
                f"answer, but no reference answer for turn {turn} was given"
            )
        ref_fields["ref_answer_1"] = reference[0]
        if turn == 2:
            ref_fields["ref_answer_2"] = reference[1]
    return judge_prompts[name], ref_fields


def _messages(prompt: JudgePrompt, user_prompt: str) -> list[dict[str, str]]:
    # FastChat: conv.set_system_message(system_prompt) then to_openai_api_messages(); an empty system
    # message is left out there, kept out here too.
    messages = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    return [*messages, {"role": "user", "content": user_prompt}]


def _check_answers(answers: Sequence[str], turn: int, what: str) -> None:
    if len(answers) < turn:
        raise DataError(f"{what}: {len(answers)} answer turn(s) given, turn {turn} needs {turn}")


def judge_messages(
    question: Question,
    answers: Sequence[str],
    turn: int,
    judge_prompts: Mapping[str, JudgePrompt],
    reference: Sequence[str] | None = None,
) -> tuple[list[dict[str, str]], str]:
    """Chat messages that ask the judge to grade `answers` (the model's turn answers) at `turn` (1 or 2).

    Returns (messages, judge prompt name). `reference` is the reference answer's turns, required for the
    categories in `NEED_REF_CATEGORIES` and ignored for the others (as FastChat).
    """
    prompt, fields = _pick_prompt(SINGLE_PROMPTS, question, turn, judge_prompts, reference)
    _check_answers(answers, turn, f"question {question.question_id}")
    if turn == 2:
        user_prompt = prompt.prompt_template.format(
            question_1=question.turns[0],
            question_2=question.turns[1],
            answer_1=answers[0],
            answer_2=answers[1],
            **fields,
        )
    else:
        user_prompt = prompt.prompt_template.format(question=question.turns[0], answer=answers[0], **fields)
    return _messages(prompt, user_prompt), prompt.name


def parse_score(text: str) -> Rating:
    """The judge's rating: the first `[[x]]`, else the first `[x]` (FastChat's rule); no value and the
    reason if neither is there."""
    for pattern in _SCORE_PATTERNS:
        match = pattern.search(text)
        if match:
            # FastChat reads the number with ast.literal_eval (8 -> 8, 8.5 -> 8.5); float() agrees on every
            # match of the pattern and also reads "08", on which literal_eval raises.
            return Rating(float(match.group(1)))
    return Rating(None, NO_SCORE)


# ---------------------------------------------------------------------------------------------------------
# Logprobs mode: the score from the judge's next-token probabilities (local judges)

# Every single-grading prompt asks for "Rating: [[5]]"; the judge's answer is forced up to the rating.
RATING_PREFIX = "Rating: [["
# The second prefix tells 10 from 1 for tokenizers that write 10 as "1" then "0" (SmolLM2, Mistral, Llama 2).
RATING_PREFIXES = (RATING_PREFIX, RATING_PREFIX + "1")
RATING_CANDIDATES = tuple(str(d) for d in range(10))  # always scored when single tokens ("0" continues "1")
# Every pairwise prompt asks for "[[A]]", "[[B]]" or "[[C]]"; the answer is forced to "[[" (no explanation).
VERDICT_PREFIX = "[["
VERDICT_TOKENS = {"A": "A", "B": "B", "C": "tie"}
MIN_MASS = 1e-3  # below this the judge is not answering in the format: a failure, not a score
LOW_RATING_MASS = "the rating tokens 1-10 hold under 1e-3 of the judge's probability after 'Rating: [['"
LOW_VERDICT_MASS = "the tokens A, B and C hold under 1e-3 of the judge's probability after '[['"


def expected_score(
    top_logprobs: Mapping[str, float],
    after_one: Mapping[str, float] | None = None,
    min_mass: float = MIN_MASS,
) -> Rating:
    """The expected rating 1..10 under the judge's next-token distribution after `RATING_PREFIX`.

    The distribution is restricted to the rating tokens and renormalised (`parsing.rating_distribution`).
    `after_one`, the distribution after `RATING_PREFIX + "1"`, splits the probability of "1" between 1 and
    10: 10 gets the share of "0", other digits (11-19) are dropped, the rest ("]]", "]", ...) stays with 1.
    When the rating tokens hold less than `min_mass` in all, the judge is not writing a rating there: no
    score, `LOW_RATING_MASS`. The evidence: `rating_mass`, the rating tokens' probability before
    renormalising, and `distribution`, the renormalised probability of each rating ("1".."10").
    """
    mass = math.fsum(
        math.exp(logprob)
        for token, logprob in top_logprobs.items()
        if parsing.rating_distribution({token: logprob}, 10)  # the token spells a rating 1..10
    )
    distribution = parsing.rating_distribution(top_logprobs, 10, after_one=after_one)
    evidence = {"rating_mass": mass, "distribution": {str(v): p for v, p in distribution.items()}}
    if mass < min_mass or not distribution:
        return Rating(None, LOW_RATING_MASS, evidence)
    return Rating(math.fsum(v * p for v, p in distribution.items()), None, evidence)


def likeliest_verdict(top_logprobs: Mapping[str, float], min_mass: float = MIN_MASS) -> Rating:
    """The verdict the judge most likely writes after "[[": the argmax of P("A"), P("B"), P("C") (ties go
    to the first of A, B, C), as a pairwise rating (`A_SHARE`). Each game of a pair is decided this way,
    then combined as in text mode (`combine_verdicts`). The evidence: `verdict_mass`, the three tokens'
    probability before renormalising, and `probabilities`, renormalised over "A", "B", "tie"."""
    p = {
        verdict: math.exp(top_logprobs[token]) if token in top_logprobs else 0.0
        for token, verdict in VERDICT_TOKENS.items()
    }
    mass = math.fsum(p.values())
    if mass < min_mass:
        return Rating(None, LOW_VERDICT_MASS, {"verdict_mass": mass, "probabilities": {}})
    probabilities = {verdict: value / mass for verdict, value in p.items()}
    verdict = max(probabilities, key=probabilities.__getitem__)
    return Rating(A_SHARE[verdict], None, {"verdict_mass": mass, "probabilities": probabilities})


# ---------------------------------------------------------------------------------------------------------
# Aggregation


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _score(judgment: Judgment) -> float | None:
    """The judgment's score, None when it failed (-1: FastChat's mark of a failed parse)."""
    return None if judgment.score is None or judgment.score == -1 else judgment.score


def _summary(judgments: Sequence[Judgment]) -> dict[str, Any]:
    scores = [score for j in judgments if (score := _score(j)) is not None]
    return {
        "score": _mean(scores),
        "n": len(judgments),
        "n_scored": len(scores),
        "n_failed": len(judgments) - len(scores),
    }


def aggregate(judgments: Iterable[Judgment], questions: Iterable[Question] | None = None) -> dict[str, Any]:
    """MT-Bench results: means over the parsed scores overall, per turn and per category, with counts.

    `score` is the mean over every parsed judgment of both turns (FastChat `show_result.py`'s "Average");
    a category's `score` pools its two turns too. Judgments without a score are counted in `n_failed` and
    listed in `failures`. Given `questions`, (question, turn) pairs with no judgment at all are listed in
    `missing` (a run that stopped early is visible, never read as a complete MT-Bench score).
    """
    judgments = list(judgments)
    by_turn: dict[int, list[Judgment]] = {}
    by_category: dict[str, list[Judgment]] = {}
    for judgment in judgments:
        by_turn.setdefault(judgment.turn, []).append(judgment)
        by_category.setdefault(judgment.category, []).append(judgment)
    categories = {}
    for category, items in sorted(by_category.items()):
        summary = _summary(items)
        for turn in sorted({j.turn for j in items}):
            summary[f"turn_{turn}"] = _summary([j for j in items if j.turn == turn])["score"]
        categories[category] = summary
    result = _summary(judgments)
    result["turns"] = {str(turn): _summary(items) for turn, items in sorted(by_turn.items())}
    result["categories"] = categories
    result["failures"] = [
        {"question_id": j.question_id, "turn": j.turn, "reason": j.reason or NO_SCORE}
        for j in judgments
        if _score(j) is None
    ]
    if questions is not None:
        result["missing"] = missing_turns(questions, {(j.question_id, j.turn) for j in judgments})
    return result


# ---------------------------------------------------------------------------------------------------------
# Pairwise comparison (FastChat `run_judge_pair` / `play_a_match_pair` / `show_result.py`)


def pairwise_messages(
    question: Question,
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    turn: int,
    judge_prompts: Mapping[str, JudgePrompt],
    reference: Sequence[str] | None = None,
) -> tuple[list[dict[str, str]], str]:
    """Chat messages asking the judge which of two answers (A shown first) is better at `turn`."""
    prompt, fields = _pick_prompt(PAIR_PROMPTS, question, turn, judge_prompts, reference)
    _check_answers(answers_a, turn, f"question {question.question_id}, answer A")
    _check_answers(answers_b, turn, f"question {question.question_id}, answer B")
    if turn == 2:
        user_prompt = prompt.prompt_template.format(
            question_1=question.turns[0],
            question_2=question.turns[1],
            answer_a_1=answers_a[0],
            answer_b_1=answers_b[0],
            answer_a_2=answers_a[1],
            answer_b_2=answers_b[1],
            **fields,
        )
    else:
        user_prompt = prompt.prompt_template.format(
            question=question.turns[0], answer_a=answers_a[0], answer_b=answers_b[0], **fields
        )
    return _messages(prompt, user_prompt), prompt.name


# A pairwise verdict as a rating: Assistant A's share of the game (the value the judge audit records).
A_SHARE = {"A": 1.0, "tie": 0.5, "B": 0.0}
_VERDICT_OF = {share: verdict for verdict, share in A_SHARE.items()}


def parse_verdict(text: str) -> Rating:
    """ "A", "B" or "tie" from `[[A]]` / `[[B]]` / `[[C]]`, checked in that order anywhere in the text (as
    FastChat, so an answer that quotes the format before its verdict reads as A), as a pairwise rating
    (`A_SHARE`); no value and the reason if none."""
    for token, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if token in text:
            return Rating(A_SHARE[verdict])
    return Rating(None, NO_VERDICT)


def verdict_of(rating: Rating) -> str | None:
    """The verdict ("A", "B", "tie") a pairwise rating stands for; None when it has no value."""
    return None if rating.value is None else _VERDICT_OF[rating.value]


def combine_verdicts(first: str | None, swapped: str | None) -> str | None:
    """The outcome of a position-swapped pair of judgments, for model 1 against model 2.

    `first` is the verdict with model 1 as A, `swapped` with model 2 as A. Returns "model_1" or "model_2"
    when both orders pick the same model, "tie" when either says tie or they disagree, None when either
    verdict is missing (FastChat's show_result drops those games; count them as failures).
    """
    if first is None or swapped is None:
        return None
    g1, g2 = verdict_winner(first, 1), verdict_winner(swapped, 2)
    if g1 == "tie" or g1 != g2:
        return "tie"
    return g1


def verdict_winner(verdict: str | None, game: int) -> str | None:
    """The model a verdict ("A", "B", "tie" or None) names in game 1 (model 1 shown as A) or game 2 (model 2
    shown as A): "model_1", "model_2", or the verdict itself ("tie", None)."""
    if verdict not in ("A", "B"):
        return verdict
    return "model_1" if (verdict == "A") == (game == 1) else "model_2"


def pairwise_summary(outcomes: Iterable[str | None]) -> dict[str, Any]:
    """Wins, losses and ties of model 1 (FastChat show_result's table); None outcomes counted as failures."""
    outcomes = list(outcomes)
    win, loss, tie = (outcomes.count(k) for k in ("model_1", "model_2", "tie"))
    n = win + loss + tie
    return {
        "win": win,
        "loss": loss,
        "tie": tie,
        "n_failed": outcomes.count(None),
        "win_rate": win / n if n else None,
        "loss_rate": loss / n if n else None,
        "win_rate_adjusted": (win + 0.5 * tie) / n if n else None,
    }


def _pair_summary(games: Sequence[PairJudgment]) -> dict[str, Any]:
    return {
        "n": len(games),
        **pairwise_summary(g.outcome for g in games),
        "n_inconsistent": sum(g.inconsistent for g in games),
    }


def aggregate_pairwise(
    games: Iterable[PairJudgment], questions: Iterable[Question] | None = None
) -> dict[str, Any]:
    """Pairwise results: wins, losses and ties of the model against the baseline overall, per turn and per
    category (`pairwise_summary` with `n` games and `n_inconsistent`, the ties that the position swap made).

    As FastChat's show_result, every (question, turn) is one game and failed games are left out of the
    rates; here they are counted in `n_failed` and listed in `failures`, and given `questions`, games never
    judged are listed in `missing`.
    """
    games = list(games)
    by_turn: dict[int, list[PairJudgment]] = {}
    by_category: dict[str, list[PairJudgment]] = {}
    for game in games:
        by_turn.setdefault(game.turn, []).append(game)
        by_category.setdefault(game.category, []).append(game)
    result = _pair_summary(games)
    result["turns"] = {str(turn): _pair_summary(items) for turn, items in sorted(by_turn.items())}
    result["categories"] = {category: _pair_summary(items) for category, items in sorted(by_category.items())}
    result["failures"] = [
        {"question_id": g.question_id, "turn": g.turn, "reason": g.reason or NO_VERDICT}
        for g in games
        if g.outcome is None
    ]
    if questions is not None:
        result["missing"] = missing_turns(questions, {(g.question_id, g.turn) for g in games})
    return result


def missing_turns(questions: Iterable[Question], seen: set[tuple[int, int]]) -> list[dict[str, int]]:
    """The (question, turn) pairs a run should have judged and has no judgment for."""
    return [
        {"question_id": q.question_id, "turn": turn}
        for q in questions
        for turn in range(1, len(q.turns) + 1)
        if (q.question_id, turn) not in seen
    ]
