"""AlpacaEval: pairwise judge prompts and win-rate metrics, the same as alpaca_eval 0.6.6.

Vocabulary (alpaca_eval's): `output_1` is the reference (baseline) output, `output_2` the evaluated model's;
a preference is a number in [1, 2]: 1 the reference is better, 2 the model is better, 1.5 a draw (0 is read
as a draw too). None marks a judge answer that could not be parsed.

Prompts. An annotator is a prompt template plus a parser (`load_annotator` reads alpaca_eval's
`configs.yaml` and template). Before the prompt is filled, the two outputs are swapped for about half the
items: alpaca_eval's `RandomSwitchTwoColumnsProcessor` with its seeding, `random.Random("is_switched_outputs"
+ instruction + str(seed)).choices([False, True])[0]`, with the seed its evaluation pipeline uses, 0
(`PairwiseAnnotator` hands its seed, default 0, down to the switch). The judge's ranking is read in the
order shown and mapped back (3 - x when switched). The template's `{instruction}`, `{output_1}`,
`{output_2}` are filled as alpaca_eval's `make_prompts` does (see `fill_template` for the one difference)
and the prompt is split into chat messages at `<|im_start|>` markers (alpaca_eval's `prompt_to_chatml`).
Identical outputs are a draw (1.5) without a judge call. A limit of N instructions takes the N that
alpaca_eval's `max_instances=N` takes (`limited`).

Parsers (alpaca_eval `completion_parsers.py`): `ranking` (a Python list of {'model', 'rank'}),
`json_ranking` (the function-calling annotators' JSON), `regex` (the first of the `outputs_to_match`
patterns found, exactly once: `chatgpt`) and `logprob` (the weighted annotators: the judge writes one token
and the preference is read from the top log-probabilities of the tokens that name the two outputs,
`preference_from_top_logprobs`).

Logprobs mode (local judges): the judge's answer is forced up to the token that names the output it prefers
(`forced_answer`: after `ranking_prefix` for the `ranking` annotator, at the very start for a weighted one)
and the preference is 1 + P(the output shown second), P renormalised over the two naming tokens, which are
always scored (`preference_from_logprobs`), unswitched as above.

Metrics (alpaca_eval `metrics/helpers.py`, `winrate.py`, `glm_winrate.py`):
- `win_rate`: 100 × mean(preference − 1) over the preferences in [1, 2]; `standard_error`: 100 × the
  sample standard error of the same values (ddof 1); `discrete_win_rate`: the same mean after rounding each
  preference to 1, 1.5 (exactly 1.5 only) or 2 (alpaca_eval's `ZeroOneScoringRule`).
- `avg_length`: int(mean characters of the model's outputs).
- `length_controlled_win_rate`: a logistic GLM of the preference on tanh(standardized length difference),
  instruction difficulty and a model intercept, fitted with L1 penalty, C chosen among logspace(-4, 4, 10)
  by 5-fold grouped cross-validation on the soft-label log loss (alpaca_eval's LogisticRegressionCV with
  liblinear); the LC win rate is the mean predicted preference with the length difference set to 0.
  See `length_controlled_win_rate` for the three GLMs and the data the default one needs.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zephyr.core.errors import AssetError, ConfigError
from zephyr.judge.rating import Rating

# alpaca_eval's PairwiseAnnotator seed (BaseAnnotator's default), which it passes to the output-order switch;
# SingleAnnotator's own default, 123, is always overridden in its pipeline.
DEFAULT_SEED = 0
SWITCH_SEED_PREFIX = "is_switched_outputs"  # alpaca_eval's `_switch_column` for pairwise annotators

LIMIT_SEED = 123  # alpaca_eval's `evaluate`: `max_instances` are the first of a shuffle with this seed

NO_RANKING = "no valid ranking in the judge's answer"


def limited(n: int, limit: int | None) -> list[int]:
    """The positions of the instructions evaluated, in order: all n in file order without a limit, else those
    alpaca_eval's `max_instances=limit` evaluates, the first `limit` of pandas' `sample(frac=1,
    random_state=123)` (numpy's `RandomState(123).permutation(n)`), so that a quick run with a limit judges
    the same instructions as alpaca_eval's, and a spread of the set rather than its first topics."""
    if limit is None:
        return list(range(n))
    return [int(i) for i in np.random.RandomState(LIMIT_SEED).permutation(n)[:limit]]


# ---------------------------------------------------------------------------------------------------------
# Annotators and prompts


PARSERS = ("ranking", "json_ranking", "regex", "logprob")


@dataclass(frozen=True)
class LogprobRule:
    """alpaca_eval `logprob_parser` settings of a weighted annotator: `numerator_token` names the output
    shown first, `denominator_tokens` both outputs' tokens; `is_binarize` rounds the preference to 1 or 2."""

    numerator_token: str
    denominator_tokens: tuple[str, str]
    is_binarize: bool

    @property
    def tokens(self) -> tuple[str, str]:
        """The tokens naming the output shown first and the output shown second."""
        other = next(t for t in self.denominator_tokens if t != self.numerator_token)
        return self.numerator_token, other


@dataclass(frozen=True)
class Annotator:
    """An alpaca_eval annotator: template, how to read its answer, and the judge request settings.

    `parser` (one of `PARSERS`): "ranking" (the answer is a Python list of {'model', 'rank'} dicts,
    `ranking_parser`; `model_1_name` is the name the template gives the output shown first),
    "json_ranking" (a JSON object whose `annotation_key` holds that list: the function-calling annotators;
    the judge's answer is the tool call's `arguments` string), "regex" (`regex_parser` with
    `outputs_to_match`, (preference, pattern) pairs: `chatgpt`) or "logprob" (`logprob_parser` with
    `logprob`: the weighted annotators, whose one-token answer is read through its top log-probabilities).
    `completions_kwargs` is the config's request block (model_name, max_tokens, temperature, logprobs,
    top_logprobs, tools, tool_choice) for the judge layer.
    """

    name: str
    template: str
    parser: str
    model_1_name: str = "model_1"
    annotation_key: str | None = None
    completions_kwargs: Mapping[str, Any] = field(default_factory=dict)
    outputs_to_match: tuple[tuple[int, str], ...] = ()
    logprob: LogprobRule | None = None


# The configs.yaml keys zephyr reads (pretty_name, link: documentation only; fn_completions: zephyr's judge
# spec picks the backend). Others (processors_to_kwargs, is_randomize_output_order) change what alpaca_eval
# does in ways zephyr does not reproduce, so such annotators are refused rather than judged differently.
_CONFIG_KEYS = frozenset(
    {"prompt_template", "fn_completions", "completions_kwargs", "fn_completion_parser",
     "completion_parser_kwargs", "batch_size", "completion_key", "pretty_name", "link"}
)  # fmt: skip


def annotator_names(folder: str | os.PathLike[str]) -> list[str]:
    """The annotators of an `evaluators_configs`-layout folder (each a `NAME/configs.yaml`)."""
    return sorted(p.parent.name for p in Path(folder).glob("*/configs.yaml"))


def load_annotator(folder: str | os.PathLike[str], name: str) -> Annotator:
    """An annotator from alpaca_eval's `evaluators_configs` layout: `folder/NAME/configs.yaml` + template."""
    import yaml

    config_path = Path(folder) / name / "configs.yaml"
    if not config_path.is_file():
        known = ", ".join(annotator_names(folder)) or "none"
        raise AssetError(f"{config_path}: no annotator named {name!r}; annotators in {folder}: {known}")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))[name]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise AssetError(f"{config_path}: no annotator config named {name!r} ({exc})") from exc
    unsupported = sorted(set(config) - _CONFIG_KEYS)
    if config.get("batch_size", 1) != 1:
        unsupported.append(f"batch_size {config['batch_size']}")
    if unsupported:
        raise AssetError(f"{config_path}: annotator {name!r} sets {', '.join(unsupported)}: not supported")
    template_path = Path(folder) / config["prompt_template"]
    try:
        template = template_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AssetError(f"{template_path}: cannot read the prompt template: {exc}") from exc
    fields = _parser_fields(config, f"{config_path}: annotator {name!r}")
    return Annotator(name, template, completions_kwargs=config.get("completions_kwargs") or {}, **fields)


def _parser_fields(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The `Annotator` fields that say how to read the judge's answer, from the config's parser block."""
    parser = config.get("fn_completion_parser") or "regex_parser"  # SinglePairwiseAnnotator's default
    kwargs = config.get("completion_parser_kwargs") or {}
    # alpaca_eval parses `completions` (the text) unless completion_key names the whole API answer
    completion_key = config.get("completion_key", "completions")
    text_answer = completion_key == "completions"
    steps = kwargs.get("parsers_to_kwargs") or {}
    if parser == "ranking_parser" and text_answer:
        return {"parser": "ranking", "model_1_name": kwargs.get("model_1_name", "model_1")}
    if parser == "pipeline_meta_parser" and list(steps) == ["json_parser", "ranking_parser"] and text_answer:
        return {
            "parser": "json_ranking",
            "model_1_name": (steps["ranking_parser"] or {}).get("model_1_name", "model_1"),
            "annotation_key": (steps["json_parser"] or {}).get("annotation_key"),
        }
    if parser == "regex_parser" and kwargs.get("outputs_to_match") and text_answer:
        return {"parser": "regex", "outputs_to_match": tuple(kwargs["outputs_to_match"].items())}
    denominators = tuple(kwargs.get("denominator_tokens") or ())
    if (
        parser == "logprob_parser"
        and completion_key == "completions_all"
        and len(denominators) == len(set(denominators)) == 2
        and kwargs.get("numerator_token") in denominators
        and kwargs.get("log_prob_index", "batch") == "batch"
    ):
        rule = LogprobRule(kwargs["numerator_token"], denominators, bool(kwargs.get("is_binarize", True)))
        return {"parser": "logprob", "logprob": rule}
    detail = f"parser {parser!r} with {dict(kwargs)} (completion_key {completion_key!r})"
    raise AssetError(f"{where}: {detail} is not supported")


def is_switched(instruction: str, seed: int = DEFAULT_SEED) -> bool:
    """Whether the model's output is shown first for this instruction (alpaca_eval's seeded switch)."""
    return random.Random(SWITCH_SEED_PREFIX + instruction + str(seed)).choices([False, True], k=1)[0]


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """The first occurrence of each `{key}` placeholder replaced by its value (alpaca_eval `make_prompts`
    for one example). One pass over the template: a value that itself holds placeholder text, such as an
    instruction quoting "{output_2}", is inserted verbatim (alpaca_eval's chain of `str.replace` calls would
    substitute inside it; identical prompts otherwise)."""
    seen: set[str] = set()

    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key in seen:
            return match.group(0)
        if key not in values:
            raise AssetError(f"annotator template: placeholder {{{key}}} has no value")
        seen.add(key)
        return str(values[key])

    return re.sub(r"{([^ \s]+?)}", substitute, template)


def prompt_to_messages(prompt: str) -> list[dict[str, str]]:
    """alpaca_eval `prompt_to_chatml`: `<|im_start|>ROLE\\nCONTENT<|im_end|>` blocks to chat messages."""
    prompt = prompt.strip()
    if not (prompt.startswith("<|im_start|>") and prompt.endswith("<|im_end|>")):
        raise AssetError("annotator template: expected <|im_start|> ... <|im_end|> chat blocks")
    messages = []
    for block in prompt.split("<|im_start|>")[1:]:
        role, _, rest = block.partition("\n")
        role = role.strip()
        if role != "system" and role.startswith("system"):  # "system name=example_user" (few-shot turns)
            raise AssetError(f"annotator template: named system turns ({role!r}) are not supported")
        messages.append({"role": role, "content": rest.split("<|im_end|>", 1)[0].strip()})
    return messages


@dataclass(frozen=True)
class PairwiseRequest:
    """What to ask the judge about one instruction, and how to read its answer back."""

    messages: list[dict[str, str]]
    switched: bool  # True: the model's output is shown first (as output_1), the reference second
    identical: bool  # the outputs are the same: a draw, no judge call (alpaca_eval)

    @property
    def model_position(self) -> int:
        """1 when the model's output is the first one the judge sees, else 2."""
        return 1 if self.switched else 2


def make_request(
    annotator: Annotator,
    instruction: str,
    reference_output: str,
    model_output: str,
    seed: int = DEFAULT_SEED,
) -> PairwiseRequest:
    """The judge request for one instruction, with alpaca_eval's seeded order switch."""
    switched = is_switched(instruction, seed)
    first, second = (model_output, reference_output) if switched else (reference_output, model_output)
    prompt = fill_template(
        annotator.template, {"instruction": instruction, "output_1": first, "output_2": second}
    )
    return PairwiseRequest(prompt_to_messages(prompt), switched, reference_output == model_output)


def _rank_of(ranking: Any, model_1_name: str) -> int | None:
    """alpaca_eval `ranking_parser` on a parsed list: the rank (1 or 2) of the output shown first."""
    try:
        rank = next(item for item in ranking if item["model"] == model_1_name)["rank"]
    except (StopIteration, TypeError, KeyError):
        return None
    return int(rank) if rank in (1, 2) else None


def _regex_choice(outputs_to_match: Sequence[tuple[int, str]], completion: str) -> int | None:
    """alpaca_eval `regex_parser` for one example: the key of the earliest matching pattern, the search
    resuming after each match; an annotation only when exactly one match is found (batch size 1)."""
    patterns = [(key, re.compile(pattern)) for key, pattern in outputs_to_match]
    found = []
    while True:
        first = None
        for key, pattern in patterns:
            match = pattern.search(completion)
            if match and (first is None or match.start() < first[1].start()):
                first = (key, match)
        if first is None:
            break
        found.append(first[0])
        completion = completion[first[1].end() :]
    return found[0] if len(found) == 1 and found[0] in (1, 2) else None


def _shown_preference(annotator: Annotator, completion: str) -> int | None:
    """1 or 2: which output, in the order shown, the judge's text prefers (None: no valid answer)."""
    if annotator.parser == "ranking":
        try:
            return _rank_of(ast.literal_eval(completion), annotator.model_1_name)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    if annotator.parser == "regex":
        return _regex_choice(annotator.outputs_to_match, completion)
    if annotator.parser != "json_ranking":
        raise ConfigError(
            f"annotator {annotator.name!r} reads the judge's log-probabilities, not its text "
            "(parse_logprob_preference)"
        )
    if "```json" in completion:  # alpaca_eval json_parser: the content of a ```json fence
        fenced = re.search(r"```json(.*?)```", completion, re.DOTALL)
        if fenced is None:  # a fence never closed
            return None
        completion = fenced.group(1)
    loaded = json.loads(completion)
    items = [loaded] if isinstance(loaded, dict) else loaded
    values = [item[annotator.annotation_key] if annotator.annotation_key else item for item in items]
    if len(values) != 1:  # alpaca_eval: a batch of the wrong size is no annotation
        return None
    return _rank_of(values[0], annotator.model_1_name)


def parse_preference(annotator: Annotator, completion: str, switched: bool) -> Rating:
    """The preference (1 reference better, 2 model better) from the judge's answer, in the unswitched
    frame; no value and the reason when the answer holds no valid ranking (alpaca_eval drops those)."""
    if not completion:
        return Rating(None, "empty judge answer")
    try:
        shown = _shown_preference(annotator, completion)
    except (ValueError, TypeError, KeyError, AttributeError):  # bad JSON, wrong shapes
        shown = None
    if shown is None:
        return Rating(None, NO_RANKING)
    return Rating(float(3 - shown if switched else shown))


# ---------------------------------------------------------------------------------------------------------
# Weighted annotators: the preference from the top log-probabilities of the judge's one-token answer

NO_LOGPROBS = "the judge's answer carries no log-probabilities (its backend must return top_logprobs)"
NOT_ONE_TOKEN = "the judge's answer is not exactly one token"
NO_OUTPUT_TOKEN = "neither output's token is among the judge's top log-probabilities"


def _logsumexp(values: Sequence[float]) -> float:
    """log Σ exp(v) as scipy's `logsumexp` computes it: max + log1p(the sum of the others' exp(v − max))."""
    top = max(values)
    if top == -math.inf:
        return top
    rest = list(values)
    rest.remove(top)
    return top + math.log1p(math.fsum(math.exp(v - top) for v in rest))


def preference_from_top_logprobs(
    rule: LogprobRule, top_logprobs: Sequence[Mapping[str, Any]]
) -> float | None:
    """alpaca_eval `logprob_parser` on one answer token, in the order shown: 2 − P(numerator) / P(either
    token) from the `{"token", "logprob"}` alternatives (a token not among them has probability 0), or 1 /
    2 when binarized; None (alpaca_eval's NaN) when neither token is among them."""
    wanted = (*rule.denominator_tokens, rule.numerator_token)
    found = {t["token"]: float(t["logprob"]) for t in top_logprobs if t["token"] in wanted}
    if not found:
        return None
    numerator = found.get(rule.numerator_token, -math.inf)
    if rule.is_binarize:
        others = [found.get(t, -math.inf) for t in rule.denominator_tokens if t != rule.numerator_token]
        return 1.0 if all(numerator > other for other in others) else 2.0
    denominator = _logsumexp([found.get(t, -math.inf) for t in rule.denominator_tokens])
    return 2 - math.exp(numerator - denominator)


def parse_logprob_preference(
    annotator: Annotator, content: Sequence[Mapping[str, Any]] | None, switched: bool
) -> Rating:
    """A weighted annotator's preference in the unswitched frame from the judge's answer tokens (each
    `{"token", "logprob", "top_logprobs"}`, the API's `logprobs.content`), with every token's
    `top_logprobs` as the evidence; no value and the reason where alpaca_eval has no annotation."""
    if annotator.logprob is None:
        raise ConfigError(f"annotator {annotator.name!r} reads the judge's text (parse_preference)")
    if not content:
        return Rating(None, NO_LOGPROBS)
    evidence = {"top_logprobs": [t.get("top_logprobs") for t in content]}
    if len(content) != 1:  # alpaca_eval reads one value per token; a batch of one needs one
        return Rating(None, NOT_ONE_TOKEN, evidence)
    shown = preference_from_top_logprobs(annotator.logprob, content[0].get("top_logprobs") or [])
    if shown is None:
        return Rating(None, NO_OUTPUT_TOKEN, evidence)
    return Rating(3 - shown if switched else shown, None, evidence)


# ---------------------------------------------------------------------------------------------------------
# Logprobs mode: the preference from the judge's next-token probabilities (local judges)

MIN_MASS = 1e-3  # below this the judge is not naming an output there: a failure, not a preference
LOW_MASS = "the two outputs' tokens hold under 1e-3 of the judge's probability after the forced answer start"


def ranking_prefix(annotator: Annotator) -> str:
    """The judge's answer forced up to the number of the first model it ranks, in the layout the
    `ranking` prompt shows (`[\\n    {'model': <model-name>, 'rank': <model-rank>},`): `[\\n    {'model':
    'model_`. The next token, "1" or "2", names the output the judge ranks first."""
    name = annotator.model_1_name
    if annotator.parser != "ranking" or not name.endswith("1"):
        raise ConfigError(
            f"annotator {annotator.name!r}: judge_mode logprobs needs a plain-text ranking annotator with "
            "models named like model_1 / model_2 (alpaca_eval_gpt4) or a weighted annotator "
            "(weighted_alpaca_eval_gpt4_turbo)"
        )
    return "[\n    {'model': '" + name[:-1]


@dataclass(frozen=True)
class ForcedAnswer:
    """Where a local judge's answer names the output it prefers: the answer's start (`prefix`) and the
    tokens that come next for the output shown first and second."""

    prefix: str
    tokens: tuple[str, str]


def forced_answer(annotator: Annotator) -> ForcedAnswer:
    """A weighted annotator's answer is the naming token itself ("m" / "M"); the `ranking` annotator's
    comes after `ranking_prefix` ("1" / "2"). Others cannot be read this way (ConfigError)."""
    if annotator.logprob is not None:
        return ForcedAnswer("", annotator.logprob.tokens)
    return ForcedAnswer(ranking_prefix(annotator), ("1", "2"))


def preference_from_logprobs(
    top_logprobs: Mapping[str, float],
    switched: bool,
    min_mass: float = MIN_MASS,
    tokens: tuple[str, str] = ("1", "2"),
) -> Rating:
    """The expected preference: 1 + P(the output shown second is named), P renormalised over `tokens` (the
    output shown first's, then second's), mapped back to the unswitched frame (3 − x when switched) as
    `parse_preference` does. Fractional, as alpaca_eval's weighted annotators; its metrics take any value
    in [1, 2]. No value (`LOW_MASS`) when the two tokens carry under `min_mass`. The evidence: `mass`, the
    two tokens' probability before renormalising, and `ranked_first`, the renormalised probability that
    each token comes next."""
    p = {token: math.exp(top_logprobs[token]) if token in top_logprobs else 0.0 for token in tokens}
    mass = math.fsum(p.values())
    if mass < min_mass:
        return Rating(None, LOW_MASS, {"mass": mass, "ranked_first": {}})
    first = {token: value / mass for token, value in p.items()}
    shown = 1.0 + first[tokens[1]]
    return Rating(3.0 - shown if switched else shown, None, {"mass": mass, "ranked_first": first})


# ---------------------------------------------------------------------------------------------------------
# Win rates


def _as_floats(preferences: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if p is None else float(p) for p in preferences], dtype=np.float64)


def _valid_shifted(preferences: Sequence[float | None]) -> np.ndarray:
    """alpaca_eval AbsoluteScoringRule: 0 -> 1.5, keep values in [1, 2] (NaN dropped), minus 1."""
    p = _as_floats(preferences)
    p = np.where(p == 0, 1.5, p)
    return p[(p >= 1) & (p <= 2)] - 1


def _sem(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def win_rate(preferences: Sequence[float | None]) -> float:
    """Percentage of the model winning, draws counting half (alpaca_eval `get_winrate()["win_rate"]`)."""
    values = _valid_shifted(preferences)
    return float(values.mean() * 100) if len(values) else math.nan


def standard_error(preferences: Sequence[float | None]) -> float:
    """Standard error of `win_rate`, in percentage points (sample std with ddof 1 / sqrt(n), × 100)."""
    return _sem(_valid_shifted(preferences)) * 100


def _discrete(preferences: Sequence[float | None]) -> np.ndarray:
    """alpaca_eval ZeroOneScoringRule: 1.5 -> 0, round half to even, then 0 -> 1.5."""
    p = _as_floats(preferences)
    p = np.round(np.where(p == 1.5, 0.0, p))
    return np.where(p == 0, 1.5, p)


def discrete_win_rate(preferences: Sequence[float | None]) -> float:
    """`win_rate` after rounding every preference to a win, a loss or (1.5 exactly) a draw."""
    return win_rate(list(_discrete(preferences)))


def head_to_head(preferences: Sequence[float | None]) -> dict[str, int]:
    """alpaca_eval's counts: n_wins (model), n_wins_base (reference), n_draws, n_total (valid ones)."""
    p = _as_floats(preferences)
    values = _valid_shifted(preferences)
    return {
        "n_wins": int((values > 0.5).sum()),
        "n_wins_base": int((values < 0.5).sum()),
        "n_draws": int(((p == 1.5) | (p == 0)).sum()),
        "n_total": len(values),
    }


def avg_length(outputs: Sequence[str]) -> int:
    """alpaca_eval leaderboard `avg_length`: int(mean length in characters of the model's outputs)."""
    return int(sum(len(o) for o in outputs) / len(outputs))


# ---------------------------------------------------------------------------------------------------------
# Length-controlled win rate

LENGTH = "np.tanh(std_delta_len)"
DIFFICULTY = "instruction_difficulty"
MODEL = "not_gamed_baseline.astype(float)"
GLMS: dict[str, dict[str, Any]] = {  # alpaca_eval GLM_INFO
    "length_controlled_v1": {"features": (LENGTH, DIFFICULTY, MODEL), "regularize_to_baseline_lambda": 0.2},
    "length_controlled_noreg": {
        "features": (LENGTH, DIFFICULTY, MODEL),
        "regularize_to_baseline_lambda": None,
    },
    "length_controlled_minimal": {"features": (LENGTH, MODEL), "regularize_to_baseline_lambda": None},
}
CV_SPLITS = 5
CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV's default grid (Cs=10)
_CLIP = 1e-15  # alpaca_eval `logloss` clips predictions to [eps, 1 - eps]


@dataclass(frozen=True)
class GamedBaselines:
    """alpaca_eval's `df_gamed.csv` (hub dataset `tatsu-lab/alpaca_eval`), used by `length_controlled_v1`:
    annotations of the verbose and concise versions of the baseline against the baseline, one row each.

    `preference` is on the [0, 1] scale (alpaca_eval concatenates the column unchanged with the model's rows
    after their shift from [1, 2] to [0, 1]; NaN rows are dropped), `std_delta_len` the standardized length
    difference as stored, `instruction_difficulty` the difficulty of each row's instruction. Row order is
    the file's (it decides the cross-validation folds).
    """

    preference: Sequence[float]
    std_delta_len: Sequence[float]
    instruction_difficulty: Sequence[float]


@dataclass(frozen=True)
class LengthControlled:
    win_rate: float  # percent
    standard_error: float  # percent, sample standard error of the predicted preferences
    glm: str
    C: float | None  # the chosen inverse regularization strength (None: model equals baseline)
    weights: dict[str, float]
    predictions: tuple[float, ...]  # per row, P(model preferred) at equal length (alpaca_eval glm_preference)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # alpaca_eval `_logistic`, stable for large |z|


def _objective(w: np.ndarray, X: np.ndarray, target: np.ndarray, weight: np.ndarray, C: float) -> float:
    z = X @ w
    loss = weight * (target * _softplus(-z) + (1 - target) * _softplus(z))
    return float(np.abs(w).sum() + C * math.fsum(loss))


def _l1_quadratic_step(w: np.ndarray, grad: np.ndarray, hess: np.ndarray) -> np.ndarray:
    """argmin_d grad·d + ½ d'Hd + ||w + d||₁ by cyclic coordinate descent (few features: exact enough)."""
    d = np.zeros_like(w)
    for _ in range(1000):
        largest = 0.0
        for j in range(len(w)):
            h = hess[j, j] + 1e-12
            u = w[j] + d[j]
            v = u - (grad[j] + hess[j] @ d) / h
            new = math.copysign(max(abs(v) - 1.0 / h, 0.0), v)
            largest = max(largest, abs(new - u))
            d[j] += new - u
        if largest <= 1e-15 * (1.0 + np.abs(w + d).max()):
            break
    return d


def _fit_l1_logistic(X: np.ndarray, target: np.ndarray, weight: np.ndarray, C: float) -> np.ndarray:
    """argmin_w ||w||₁ + C Σ_i weight_i · cross-entropy(target_i, σ(x_i·w)), solved to float precision.

    The objective liblinear minimizes for sklearn's L1 LogisticRegression without intercept, fed (as
    alpaca_eval does) every soft label p as two rows, y=1 weighted p and y=0 weighted 1 − p. Proximal Newton
    with a line search (liblinear's newGLMNET stops earlier, at its tolerance 1e-4).
    """
    w = np.zeros(X.shape[1])
    scale = None
    for _ in range(200):
        q = _sigmoid(X @ w)
        grad = C * (X.T @ (weight * (q - target)))
        hess = C * (X.T * (weight * q * (1 - q))) @ X
        # minimum-norm subgradient: zero at the optimum
        sub = np.where(w != 0, grad + np.sign(w), np.sign(grad) * np.maximum(np.abs(grad) - 1, 0))
        scale = scale or max(1.0, float(np.abs(grad).max()))
        if np.abs(sub).max() <= 1e-11 * scale:
            break
        d = _l1_quadratic_step(w, grad, hess)
        decrease = float(grad @ d + np.abs(w + d).sum() - np.abs(w).sum())
        f0 = _objective(w, X, target, weight, C)
        step = 1.0
        # Armijo backtracking; once the predicted decrease is below float resolution the Newton step is
        # taken as is (the line search can no longer see progress, the quadratic model can).
        if abs(decrease) > 1e-13 * max(1.0, abs(f0)):
            while (
                step > 1e-10 and _objective(w + step * d, X, target, weight, C) > f0 + 0.01 * step * decrease
            ):
                step /= 2
        w = w + step * d
    return w


def _log_loss(X: np.ndarray, w: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> float:
    """alpaca_eval `logloss_continuous` on one fold: mean over its rows of the (weighted) soft log loss."""
    q = np.clip(_sigmoid(X @ w), _CLIP, 1 - _CLIP)
    loss = target * np.log(q) + (1 - target) * np.log(1 - q)
    if weight is not None:
        loss = loss * weight
    return -float(np.mean(loss))


def _group_folds(n_items: int, n_splits: int = CV_SPLITS) -> np.ndarray:
    """sklearn GroupKFold (≥ 1.6, no shuffle) over items that all weigh the same (each is two rows):
    a stable sort keeps item order, the reversed order is dealt to the lightest (first) fold in turn, so
    item g lands in fold (n − 1 − g) mod n_splits."""
    if n_items < n_splits:
        raise ValueError(f"the GLM's {n_splits}-fold cross-validation needs ≥ {n_splits} annotations")
    return (n_items - 1 - np.arange(n_items)) % n_splits


def _cv_scores(X: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """Negative held-out log loss per (fold, C): sklearn LogisticRegressionCV's `scores_` as alpaca_eval
    sets it up (GroupKFold, scorer `logloss_continuous`, training weights p·w and (1 − p)·w)."""
    train_weight = np.ones(len(target)) if weight is None else weight
    folds = _group_folds(len(target))
    scores = np.zeros((CV_SPLITS, len(CS)))
    for fold in range(CV_SPLITS):
        test = folds == fold
        for k, C in enumerate(CS):
            w = _fit_l1_logistic(X[~test], target[~test], train_weight[~test], C)
            scores[fold, k] = -_log_loss(X[test], w, target[test], None if weight is None else weight[test])
    return scores


def _fit_glm_cv(X: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> tuple[np.ndarray, float]:
    """alpaca_eval `fit_LogisticRegressionCV(is_ytrue_proba=True)`: the C with the best summed CV score
    (first on ties, as argmax), then a refit on all rows."""
    best = float(CS[int(np.argmax(_cv_scores(X, target, weight).sum(axis=0)))])
    train_weight = np.ones(len(target)) if weight is None else weight
    return _fit_l1_logistic(X, target, train_weight, best), best


def _standardized_delta(model_lengths: Sequence[int], reference_lengths: Sequence[int]) -> np.ndarray:
    """(reference − model length) / its sample std. Without any spread (all differences equal) there is no
    length effect to control: zeros (alpaca_eval divides by 0 there and its design matrix drops every row)."""
    delta = np.asarray(reference_lengths, dtype=np.float64) - np.asarray(model_lengths, dtype=np.float64)
    sd = np.std(delta, ddof=1) if len(delta) > 1 else 0.0
    return delta / sd if sd > 0 else np.zeros_like(delta)


def _design(
    features: Sequence[str], std_delta_len: np.ndarray, difficulty: np.ndarray, model: float
) -> np.ndarray:
    columns = {
        LENGTH: np.tanh(std_delta_len),
        DIFFICULTY: difficulty,
        MODEL: np.full(len(std_delta_len), model),
    }
    return np.column_stack([columns[name] for name in features])


def length_controlled_win_rate(
    preferences: Sequence[float | None],
    model_lengths: Sequence[int],
    reference_lengths: Sequence[int],
    *,
    glm: str = "length_controlled_v1",
    instruction_difficulty: Sequence[float] | None = None,
    gamed: GamedBaselines | None = None,
    same_model: bool = False,
) -> LengthControlled:
    """alpaca_eval 0.6.6 `get_length_controlled_winrate` on one model's annotations against one baseline.

    The GLM: P(model preferred) = σ(θ_len · tanh(Δ/sd(Δ)) + θ_diff · difficulty + θ_model), with Δ the
    reference length minus the model length in characters over the rows given. The LC win rate is 100 ×
    the mean over all rows of the prediction with Δ = 0. GLMs (alpaca_eval `GLM_INFO`):
    - `length_controlled_v1` (alpaca_eval's default): needs `instruction_difficulty` (per row, from
      `instruction_difficulty` in the hub file `df_gamed.csv` of `tatsu-lab/alpaca_eval`, looked up by the
      instruction's position in the 805-instruction set) and `gamed` (that file's rows, `GamedBaselines`),
      which join the fit with weight 0.2 / 2 each and a model feature of 0;
    - `length_controlled_noreg`: needs `instruction_difficulty` only;
    - `length_controlled_minimal`: no difficulty term, needs nothing else (any instruction set).
    Rows with a None preference are left out of the fit but predicted (as alpaca_eval); its pipeline
    passes them, so `summarize` does too.
    `same_model`: the model is the baseline itself, every prediction is 0.5 (as alpaca_eval).
    """
    if glm not in GLMS:
        raise ConfigError(f"unknown length-controlled GLM {glm!r}; known: {', '.join(GLMS)}")
    info = GLMS[glm]
    features = info["features"]
    n = len(preferences)
    if not (len(model_lengths) == len(reference_lengths) == n):
        raise ValueError("preferences, model_lengths and reference_lengths must have the same length")
    if same_model:
        half = np.full(n, 0.5)
        return LengthControlled(
            50.0, _sem(half) * 100, glm, None, dict.fromkeys(features, 0.0), tuple(half.tolist())
        )
    if DIFFICULTY in features and instruction_difficulty is None:
        raise ConfigError(
            f"{glm} needs the instruction difficulty of each annotation (alpaca_eval's df_gamed.csv from "
            "the hub dataset tatsu-lab/alpaca_eval); use glm=length_controlled_minimal without it"
        )
    lam = info["regularize_to_baseline_lambda"]
    if lam is not None and gamed is None:
        raise ConfigError(f"{glm} needs alpaca_eval's gamed-baseline annotations (df_gamed.csv)")

    difficulty = np.zeros(n) if instruction_difficulty is None else np.asarray(instruction_difficulty, float)
    std_delta = _standardized_delta(model_lengths, reference_lengths)
    target = _as_floats(preferences)
    target = np.where(target == 0, 1.5, target) - 1  # alpaca_eval: to [0, 1], 0 (old draw) -> 0.5
    X = _design(features, std_delta, difficulty, 1.0)
    weight = None
    if lam is not None and gamed is not None:  # (checked above: a GLM with a lambda has the gamed data)
        g_target = np.asarray(gamed.preference, float)
        g_X = _design(
            features,
            np.asarray(gamed.std_delta_len, float),
            np.asarray(gamed.instruction_difficulty, float),
            0.0,
        )
        X = np.vstack([g_X, X])  # alpaca_eval concatenates [df_gamed, df]: the order fixes the folds
        target = np.concatenate([g_target, target])
        weight = np.concatenate([np.full(len(g_target), lam / 2), np.ones(n)])
    keep = ~np.isnan(target)
    coef, C = _fit_glm_cv(X[keep], target[keep], None if weight is None else weight[keep])
    predicted = _sigmoid(_design(features, np.zeros(n), difficulty, 1.0) @ coef)
    return LengthControlled(
        float(predicted.mean() * 100),
        _sem(predicted) * 100,
        glm,
        C,
        dict(zip(features, map(float, coef), strict=True)),
        tuple(predicted.tolist()),
    )


def is_extreme_change(
    win_rate_: float, lc_win_rate: float, abs_diff: float = 10, rel_diff: float = 4
) -> bool:
    """alpaca_eval `get_is_extreme_changes`: LC moved so far from the raw win rate that the GLM may have
    failed (alpaca_eval only warns)."""
    too_small = lc_win_rate < min(win_rate_ - win_rate_ / rel_diff, win_rate_ - abs_diff)
    too_large = lc_win_rate > max(win_rate_ + (100 - win_rate_) / rel_diff, win_rate_ + abs_diff)
    return bool(too_small or too_large)


# ---------------------------------------------------------------------------------------------------------
# One model's results


@dataclass(frozen=True)
class Annotation:
    """One judged instruction: `index` is its position in the evaluation set (keys instruction difficulty)."""

    index: int
    preference: float | None  # None: the judge's answer could not be parsed
    model_output: str
    reference_output: str


def summarize(
    annotations: Sequence[Annotation],
    *,
    glm: str | None = None,
    instruction_difficulty: Sequence[float] | Mapping[int, float] | None = None,
    gamed: GamedBaselines | None = None,
) -> dict[str, Any]:
    """alpaca_eval's leaderboard row for one model (`get_length_controlled_winrate` on the annotations its
    pipeline returns), plus the count of parse failures it would not show.

    Unparsed annotations are counted (`n_failed`). As in alpaca_eval's pipeline, which keeps them with a
    null preference: the win rates and counts leave them out, and the length-controlled GLM is fitted
    without them but averages its predictions over every annotation (their length differences count in
    sd(Δ) too). `instruction_difficulty` is indexed by `Annotation.index`. `glm` None picks
    `length_controlled_v1` when the difficulty and gamed-baseline data are given, else
    `length_controlled_minimal`; the one used is reported as `length_controlled_glm`.
    """
    parsed = [a for a in annotations if a.preference is not None]
    preferences = [a.preference for a in parsed]
    result: dict[str, Any] = {
        "win_rate": win_rate(preferences),
        "standard_error": standard_error(preferences),
        **head_to_head(preferences),
        "discrete_win_rate": discrete_win_rate(preferences),
        "n_annotations": len(annotations),
        "n_failed": len(annotations) - len(parsed),
        "avg_length": avg_length([a.model_output for a in annotations]) if annotations else None,
    }
    if glm is None:
        have_data = instruction_difficulty is not None and gamed is not None
        glm = "length_controlled_v1" if have_data else "length_controlled_minimal"
    result["length_controlled_glm"] = glm
    if len(parsed) < CV_SPLITS:  # the GLM's cross-validation needs a few annotations (alpaca_eval fails)
        result.update(dict.fromkeys(_LC_KEYS))
        result["length_controlled_note"] = f"needs >= {CV_SPLITS} parsed annotations, got {len(parsed)}"
        return _nan_to_none(result)
    difficulty = None
    if instruction_difficulty is not None:
        difficulty = [instruction_difficulty[a.index] for a in annotations]
    lc = length_controlled_win_rate(
        [a.preference for a in annotations],
        [len(a.model_output) for a in annotations],
        [len(a.reference_output) for a in annotations],
        glm=glm,
        instruction_difficulty=difficulty,
        gamed=gamed,
    )
    result.update(
        length_controlled_winrate=lc.win_rate,
        lc_standard_error=lc.standard_error,
        length_controlled_C=lc.C,
        length_controlled_weights=lc.weights,
        length_controlled_extreme_change=is_extreme_change(result["win_rate"], lc.win_rate),
    )
    return _nan_to_none(result)


_LC_KEYS = (
    "length_controlled_winrate",
    "lc_standard_error",
    "length_controlled_C",
    "length_controlled_weights",
    "length_controlled_extreme_change",
)


def _nan_to_none(result: dict[str, Any]) -> dict[str, Any]:
    """NaN (no valid preference, a single one for a standard error) as None: results.json stays JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
