"""`zephyr eval alpaca-eval` end to end with a scripted model and a scripted judge (no model, no hub).

The judge reads the two answers out of the real alpaca_eval_gpt4 prompt in the order shown and ranks the
longer one first. The model therefore wins exactly where its output is longer than the reference, whichever
side it was shown on: a wrong switch bookkeeping would flip the switched items.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from pathlib import Path

import pytest

from zephyr.cli import main
from zephyr.core.config import AlpacaEvalEvalConfig, build
from zephyr.core.errors import ConfigError, DataError
from zephyr.generation import Completion
from zephyr.judge.client import JUDGE_CALL_FAILED
from zephyr.models import assets
from zephyr.stages.alpaca_eval import protocol as ae
from zephyr.stages.alpaca_eval import run as alpaca_eval_run
from zephyr.stages.alpaca_eval.protocol import is_switched
from zephyr.stages.alpaca_eval.run import read_instructions, run_alpaca_eval

DATA = Path(__file__).parent / "data" / "alpaca" / "instructions.jsonl"

# instruction -> the model's answer; L longer than the reference, S shorter, = identical
MODEL_ANSWERS = {
    "Name a primary colour.": "Red is a primary colour.",  # L
    "What is 2 + 2?": "4.",  # S
    "Give a synonym for happy.": "Cheerful, or joyful.",  # L
    "Translate 'bonjour' to English.": "Hello.",  # S
    "Name a planet in the solar system.": "Jupiter is the largest planet in the solar system.",  # L
    "What is the capital of France?": "Paris.",  # =
    "Suggest a name for a cat.": "Whiskers is a classic name for a cat, or Luna.",  # L
    "Write a haiku about rain.": "Rain falls.",  # S
}
LONGER = [0, 2, 4, 6]
SHORTER = [1, 3, 7]
IDENTICAL = 5

_ANSWERS = re.compile(r'"answer": """(.*?)"""', re.S)
LEFT_FIRST = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
RIGHT_FIRST = "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakeModel:
    model_id = "fake-model"

    def __init__(self):
        self.calls = []

    def generate(self, conversations, params):
        self.calls.append((list(conversations), params))
        return [Completion(MODEL_ANSWERS[c[-1]["content"]], "stop", 10, 5) for c in conversations]


class FakeJudge:
    """Answers `answer(first, second)` given the two outputs in the order the prompt shows them."""

    model_id = "fake-judge"

    def __init__(self, answer=None):
        self.answer = answer or (
            lambda first, second: LEFT_FIRST if len(first) > len(second) else RIGHT_FIRST
        )
        self.prompts = []

    def generate(self, conversations, params):
        out = []
        for messages in conversations:
            self.prompts.append(messages)
            first, second = _ANSWERS.findall(messages[-1]["content"])
            value = self.answer(first, second)
            out.append(value if isinstance(value, Completion) else Completion(value, "stop", 300, 30))
        return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(tmp_path, judge=None, **settings):
    """`settings` are the recipe's alpaca_eval keys, built into the config as a recipe's are."""
    model, judge = FakeModel(), judge or FakeJudge()
    values = {"judge": "fake-judge", "instructions": str(DATA), **settings}
    cfg = build(AlpacaEvalEvalConfig, {k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
    results = run_alpaca_eval(cfg, "fake-model", tmp_path, model_generator=model, judge_generator=judge)
    return results, model, judge


def test_longer_answer_judge_gives_the_hand_computed_win_rate_with_switches_undone(tmp_path):
    results, model, judge = run(tmp_path)
    instructions = list(MODEL_ANSWERS)
    switched = [is_switched(i) for i in instructions]
    assert {switched[i] for i in LONGER} == {True, False}  # wins on both sides of the switch
    assert {switched[i] for i in SHORTER} == {True, False}

    # the model: one batched greedy call, the instruction as the only user turn
    [(conversations, params)] = model.calls
    assert conversations == [[{"role": "user", "content": i}] for i in instructions]
    assert params.temperature == 0.0 and params.max_tokens == 2048

    outputs = read_jsonl(tmp_path / "outputs.jsonl")
    references = [r["output"] for r in read_jsonl(DATA)]
    assert [o["instruction"] for o in outputs] == instructions
    assert [o["output"] for o in outputs] == list(MODEL_ANSWERS.values())
    assert [o["reference_output"] for o in outputs] == references
    assert {o["generator"] for o in outputs} == {"fake-model"}

    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    preferences = [a["preference"] for a in annotations]
    assert preferences == [2.0, 1.0, 2.0, 1.0, 2.0, 1.5, 2.0, 1.0]
    assert [a["switched"] for a in annotations] == switched
    assert annotations[IDENTICAL]["judge_answer"] is None
    for i in LONGER + SHORTER:
        shown = _ANSWERS.findall(
            judge.prompts[[p for p in range(8) if p != IDENTICAL].index(i)][-1]["content"]
        )
        model_first = shown[0] == MODEL_ANSWERS[instructions[i]]
        assert model_first == switched[i]  # the recorded side is the side the judge saw
        assert annotations[i]["judge_answer"] in (LEFT_FIRST, RIGHT_FIRST)

    # 4 wins, 3 losses, 1 draw: values 1,0,1,0,1,.5,1,0 -> mean 4.5/8; sum of squared deviations 1.71875
    assert results["win_rate"] == pytest.approx(56.25)
    assert results["discrete_win_rate"] == pytest.approx(56.25)
    assert results["standard_error"] == pytest.approx(100 * math.sqrt(1.71875 / 7 / 8))
    assert (results["n_wins"], results["n_wins_base"], results["n_draws"]) == (4, 3, 1)
    assert results["n_failed"] == 0 and results["n_annotations"] == 8
    assert results["avg_length"] == sum(map(len, MODEL_ANSWERS.values())) // 8
    assert results["length_controlled_glm"] == "length_controlled_minimal"
    assert results["length_controlled_winrate"] is not None
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "56.25" in (tmp_path / "results.md").read_text()

    audit = read_jsonl(tmp_path / "judge_audit.jsonl")
    assert len(audit) == 7 and len(judge.prompts) == 7  # no call for the identical pair
    assert [a["raw"] for a in audit] == [annotations[i]["judge_answer"] for i in range(8) if i != IDENTICAL]


def test_garbage_and_failed_judge_answers_are_counted_not_dropped(tmp_path):
    answers = iter(["I like both of them.", Completion.failed("HTTP 500")] * 4)
    results, _, _ = run(tmp_path, FakeJudge(lambda first, second: next(answers)))
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    judged = [a for i, a in enumerate(annotations) if i != IDENTICAL]
    assert [a["preference"] for a in judged] == [None] * 7
    assert [a["reason"] for a in judged] == [
        "no valid ranking in the judge's answer",
        JUDGE_CALL_FAILED,
    ] * 3 + ["no valid ranking in the judge's answer"]
    assert judged[1]["judge_error"] == "HTTP 500"
    assert annotations[IDENTICAL]["preference"] == 1.5
    assert results["n_failed"] == 7 and results["n_annotations"] == 8
    assert results["win_rate"] == pytest.approx(50.0)  # only the draw is a valid preference
    assert results["standard_error"] is None and results["length_controlled_winrate"] is None
    assert results["judge_usage"]["failed_calls"] == 3


def test_limit_takes_the_items_alpaca_eval_max_instances_takes(tmp_path):
    results, model, judge = run(tmp_path, limit=3)
    # RandomState(123).permutation(8)[:3] = [0, 1, 3]: longer, shorter, shorter (the first 3: L, S, L)
    instructions = list(MODEL_ANSWERS)
    assert [c[-1]["content"] for c in model.calls[0][0]] == [instructions[i] for i in (0, 1, 3)]
    assert len(judge.prompts) == 3
    assert [a["preference"] for a in read_jsonl(tmp_path / "annotations.jsonl")] == [2.0, 1.0, 1.0]
    assert results["n_annotations"] == 3 and results["win_rate"] == pytest.approx(100 / 3)


def test_limited_positions_are_pandas_sample_with_seed_123():
    import pandas as pd

    for n, limit in ((805, 50), (8, 3), (20, 20), (5, 9)):
        shuffled = pd.DataFrame({"x": range(n)}).sample(frac=1, random_state=123).index[:limit].tolist()
        assert ae.limited(n, limit) == shuffled
    assert ae.limited(4, None) == [0, 1, 2, 3]


def test_function_calling_annotator_is_refused_before_any_generation(tmp_path):
    with pytest.raises(ConfigError, match="function call"):
        run(tmp_path, annotator="alpaca_eval_gpt4_turbo_fn")
    assert not (tmp_path / "outputs.jsonl").exists()


def test_bad_instruction_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    with pytest.raises(DataError) as exc:
        read_instructions(path)
    assert str(exc.value) == f"{path}:2: not valid JSON: Expecting ',' delimiter at column 20"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\xff{}\n')
    with pytest.raises(DataError) as exc:
        read_instructions(path)
    assert str(exc.value) == f"{path}:2: not valid UTF-8: byte 0xff at column 1"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'output'"):
        read_instructions(path)
    listed = tmp_path / "listed.json"  # a JSON list, alpaca_eval's own format: lines as written
    listed.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"listed\.json:3: field 'output'"):
        read_instructions(listed)


def test_cli_runs_with_the_generators_it_makes(tmp_path, monkeypatch):
    made = {"m": FakeModel(), "j": FakeJudge()}
    monkeypatch.setattr(alpaca_eval_run, "make_generator", lambda spec, **kw: made[spec])
    argv = ["eval", "alpaca-eval", "--model", "m", "--judge", "j", "--out", str(tmp_path)]
    assert main([*argv, "--instructions", str(DATA), "--limit", "5"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["annotator"] == "alpaca_eval_gpt4" and results["model"] == "m"
    # items 0, 1, 3, 7, 4 (alpaca_eval's max_instances=5): longer, shorter, shorter, shorter, longer
    assert results["n_annotations"] == 5 and results["win_rate"] == pytest.approx(100 * 2 / 5)
    assert (tmp_path / "results.md").exists()


def test_cli_hub_unreachable_exits_2_with_a_clear_message(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    def no_model(spec, **kwargs):
        raise AssertionError("no model should load before the instructions are read")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(alpaca_eval_run, "make_generator", no_model)
    assets.fetch("alpaca-eval-templates")
    code = main(["eval", "alpaca-eval", "--model", "m", "--judge", "j", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "hf:tatsu-lab/alpaca_eval:eval" in err and "hub" in err and "--instructions" in err


# ---------------------------------------------------------------------------------------------------------
# Logprobs judge mode: the preference from the judge's probability of ranking each shown output first


class FakeLogprobJudge:
    """A local judge's scorer: after the forced answer start, P(`tokens[0]`) = 0.8 when the output shown
    first is the longer one, else 0.3 (P(`tokens[1]`) the rest); `low` instructions get (almost) no mass on
    them."""

    model_id = "fake-logprob-judge"

    def __init__(self, low=(), tokens=("1", "2")):
        self.low = low
        self.tokens = tokens
        self.calls = []

    def generate(self, conversations, params):
        raise AssertionError("a logprobs judge writes no answer")

    def next_token_logprobs(self, conversations, top_k=20, *, candidates=(), answer_prefix=""):
        return [{c: -30.0 for c in candidates} for _ in conversations]  # the client's candidate probe

    def prefix_logprobs(self, conversations, prefixes, top_k=20, *, candidates=()):
        self.calls.append((list(conversations), tuple(prefixes), tuple(candidates)))
        out = []
        for messages in conversations:
            one, two = self.tokens
            if any(f'"""{i}"""' in messages[-1]["content"] for i in self.low):
                out.append([{"name": 0.0, one: math.log(3e-4), two: math.log(3e-4)}] * len(prefixes))
                continue
            first, second = _SHOWN.findall(messages[-1]["content"])
            p = 0.8 if len(first) > len(second) else 0.3
            out.append([{one: math.log(p), two: math.log(1 - p), "A": math.log(1e-3)}] * len(prefixes))
        return out


def test_logprobs_mode_gives_fractional_preferences_with_switches_undone(tmp_path):
    judge = FakeLogprobJudge()
    results, _, _ = run(tmp_path, judge, judge_mode="logprobs")
    instructions = list(MODEL_ANSWERS)
    assert [is_switched(i) for i in instructions] == [True, False, False, True, False, False, False, False]
    # longer model answer: shown second P(second ranked first) = .7 -> 1.7; shown first (switched)
    # 1 + .2 = 1.2 -> 3 - 1.2 = 1.8. Shorter: shown second 1.2; shown first 1.7 -> 1.3. Identical: 1.5.
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    assert [a["preference"] for a in annotations] == pytest.approx([1.8, 1.2, 1.7, 1.3, 1.7, 1.5, 1.7, 1.2])
    assert all(a["judge_mode"] == "logprobs" for a in annotations)
    prefix = "[\n    {'model': 'model_"
    for i in LONGER + SHORTER:
        assert annotations[i]["answer_prefix"] == prefix and annotations[i]["judge_answer"] is None
        assert set(annotations[i]["top_logprobs"]) == {"1", "2", "A"}
        assert annotations[i]["evidence"]["mass"] == pytest.approx(1.0)
    assert annotations[0]["evidence"]["ranked_first"] == {"1": pytest.approx(0.8), "2": pytest.approx(0.2)}

    # the prompts are text mode's, byte for byte; one forced start, the digits always scored
    text_dir = tmp_path / "text"
    _, _, text_judge = run(text_dir)
    assert [c[0][0] for c in judge.calls] == text_judge.prompts
    assert {(c[1], c[2]) for c in judge.calls} == {((prefix,), ("1", "2"))}
    audit = read_jsonl(tmp_path / "judge_audit.jsonl")
    assert len(audit) == 7 and all(a["answer_prefixes"] == [prefix] for a in audit)
    assert audit[0]["judge"] == "fake-judge|alpaca_eval_gpt4|logprobs"

    # values .8 .2 .7 .3 .7 .5 .7 .2: mean .5125; squared deviations sum to .42875
    assert results["judge_mode"] == "logprobs"
    assert results["win_rate"] == pytest.approx(51.25)
    assert results["standard_error"] == pytest.approx(100 * math.sqrt(0.42875 / 7 / 8))
    assert results["discrete_win_rate"] == pytest.approx(56.25)  # rounded: 4 wins, 3 losses, the draw
    assert (results["n_wins"], results["n_wins_base"], results["n_draws"]) == (4, 3, 1)
    assert results["n_failed"] == 0 and results["length_controlled_winrate"] is not None


def test_logprobs_mode_counts_too_little_mass_as_a_failure(tmp_path):
    low = ["Red.", "Joyful."]  # the reference outputs of items 0 and 2
    results, _, _ = run(tmp_path, FakeLogprobJudge(low=low), judge_mode="logprobs")
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    assert [annotations[i]["preference"] for i in (0, 2)] == [None, None]
    assert annotations[0]["reason"] == ae.LOW_MASS
    assert annotations[0]["evidence"]["mass"] == pytest.approx(6e-4)
    assert results["n_failed"] == 2 and results["judge_usage"]["parse_failures"] == {ae.LOW_MASS: 2}
    # the others as before: .2 .3 .7 .5 .7 .2
    assert results["win_rate"] == pytest.approx(100 * 2.6 / 6)


def test_logprobs_mode_needs_a_local_judge_and_a_ranking_annotator(tmp_path):
    with pytest.raises(ConfigError, match=r"judge_mode logprobs.*'fake-judge'"):
        run(tmp_path, FakeJudge(), judge_mode="logprobs")
    assert not (tmp_path / "outputs.jsonl").exists()  # refused before the model answers
    with pytest.raises(ConfigError, match=r"judge_mode: must be one of 'text' \| 'logprobs', got 'logits'"):
        run(tmp_path, FakeLogprobJudge(), judge_mode="logits")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("annotator", "tokens"),
    [("alpaca_eval_gpt4", {"1", "2"}), ("weighted_alpaca_eval_gpt4_turbo", {"m", "M"})],
)
def test_smollm2_logprobs_judge_prefers_fractionally_through_the_cli(tmp_path, annotator, tokens):
    out = tmp_path / "ae"
    spec = "asset:smollm2-135m-instruct"
    argv = ["eval", "alpaca-eval", "--model", spec, "--judge", spec, "--out", str(out), "--limit", "2"]
    argv += ["--instructions", str(DATA), "--max-new-tokens", "8", "--judge-mode", "logprobs"]
    assert main([*argv, "--annotator", annotator]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["judge_mode"] == "logprobs" and results["n_failed"] == 0
    for annotation in read_jsonl(out / "annotations.jsonl"):
        assert 1.0 < annotation["preference"] < 2.0  # a probability, not a parsed rank
        assert annotation["evidence"]["mass"] >= 1e-3 and tokens <= set(annotation["top_logprobs"])


# ---------------------------------------------------------------------------------------------------------
# Annotators by name: one default; AlpacaEval 2.0's weighted judge; chatgpt

# the two outputs in the order shown, in alpaca_eval_gpt4's ("answer") and the clf template's ("output")
_SHOWN = re.compile(r'"(?:answer|output)": """(.*?)"""', re.S)


def test_one_default_annotator_which_the_runner_takes():
    import inspect

    from zephyr.cli import build_parser
    from zephyr.core.config import DEFAULT_ALPACA_EVAL_ANNOTATOR
    from zephyr.stages.alpaca_eval.run import check_annotator

    assert DEFAULT_ALPACA_EVAL_ANNOTATOR == "alpaca_eval_gpt4"  # the paper's AlpacaEval (1) judge
    assert AlpacaEvalEvalConfig().annotator == DEFAULT_ALPACA_EVAL_ANNOTATOR
    assert "annotator" not in inspect.signature(run_alpaca_eval).parameters  # it reads the config's
    args = build_parser().parse_args(["eval", "alpaca-eval", "--model", "m", "--judge", "j", "--out", "o"])
    assert args.annotator == DEFAULT_ALPACA_EVAL_ANNOTATOR
    # the evaluation module names no default of its own (it had one, which the runner refused)
    assert inspect.signature(ae.load_annotator).parameters["name"].default is inspect.Parameter.empty
    assert not hasattr(ae, "DEFAULT_ANNOTATOR")
    check_annotator(ae.load_annotator(assets.fetch("alpaca-eval-templates"), DEFAULT_ALPACA_EVAL_ANNOTATOR))


class FakeWeightedJudge:
    """weighted_alpaca_eval_gpt4_turbo's judge: one answer token and its top log-probs, where "m" (the
    output shown first) has .9 × .8 when that output is the longer one, else .9 × .3, "M" .9 × the rest."""

    model_id = "fake-weighted-judge"

    def __init__(self, with_logprobs=True):
        self.with_logprobs = with_logprobs
        self.params = []

    def generate(self, conversations, params):
        self.params.append(params)
        out = []
        for messages in conversations:
            first, second = _SHOWN.findall(messages[-1]["content"])
            p = 0.8 if len(first) > len(second) else 0.3
            tops = {"m": 0.9 * p, "M": 0.9 * (1 - p), "Both": 0.1}
            top = sorted(
                ({"token": t, "logprob": math.log(v)} for t, v in tops.items()), key=lambda t: -t["logprob"]
            )
            answer = {**top[0], "top_logprobs": top}
            logprobs = [answer] if self.with_logprobs else None
            out.append(Completion(top[0]["token"], "length", 400, 1, logprobs=logprobs))
        return out


def test_weighted_annotator_reads_the_top_logprobs_of_one_token(tmp_path):
    """AlpacaEval 2.0's default: max_tokens 1, logprobs with top_logprobs 5, temperature 1 (its config),
    the preference 2 - P(m) / (P(m) + P(M)) in the order shown, unswitched."""
    judge = FakeWeightedJudge()
    results, _, _ = run(tmp_path, judge, annotator="weighted_alpaca_eval_gpt4_turbo")
    [params] = judge.params
    assert (params.max_tokens, params.temperature, params.logprobs, params.top_logprobs) == (1, 1.0, True, 5)
    # switched (seed 0): items 0 and 3. Shown first longer: P(m | m or M) = .8 -> 1.2, else .3 -> 1.7;
    # item 0 (model longer, shown first): 3 - 1.2 = 1.8; item 3 (model shorter, shown first): 3 - 1.7 = 1.3
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    assert [a["preference"] for a in annotations] == pytest.approx([1.8, 1.2, 1.7, 1.3, 1.7, 1.5, 1.7, 1.2])
    assert annotations[0]["judge_answer"] == "m" and annotations[1]["judge_answer"] == "m"
    assert annotations[1]["evidence"]["top_logprobs"][0][0] == {
        "token": "m",
        "logprob": pytest.approx(math.log(0.72)),
    }
    assert results["annotator"] == "weighted_alpaca_eval_gpt4_turbo" and results["n_failed"] == 0
    assert results["win_rate"] == pytest.approx(51.25)  # as the forced logprobs mode's hand values below

    no_logprobs = tmp_path / "none"  # a backend that returns text only: no preference, each counted
    results, _, _ = run(
        no_logprobs, FakeWeightedJudge(with_logprobs=False), annotator="weighted_alpaca_eval_gpt4_turbo"
    )
    assert results["n_failed"] == 7 and results["judge_usage"]["parse_failures"] == {ae.NO_LOGPROBS: 7}


def test_weighted_annotator_in_logprobs_mode_scores_m_and_M(tmp_path):
    """A local judge: the answer's first token, with "m" and "M" always scored (no forced text before it)."""
    judge = FakeLogprobJudge(tokens=("m", "M"))
    results, _, _ = run(tmp_path, judge, annotator="weighted_alpaca_eval_gpt4_turbo", judge_mode="logprobs")
    assert {(c[1], c[2]) for c in judge.calls} == {(("",), ("m", "M"))}
    annotations = read_jsonl(tmp_path / "annotations.jsonl")
    assert [a["preference"] for a in annotations] == pytest.approx([1.8, 1.2, 1.7, 1.3, 1.7, 1.5, 1.7, 1.2])
    assert annotations[0]["evidence"]["ranked_first"] == {"m": pytest.approx(0.8), "M": pytest.approx(0.2)}
    assert results["win_rate"] == pytest.approx(51.25)


def test_chatgpt_annotator_reads_output_a_or_b(tmp_path):
    shown = re.compile(r"## Output \(a\):\n(.*?)\n\n## Output \(b\):\n(.*?)\n\n## Which", re.S)

    def answer(messages):
        first, second = shown.findall(messages[-1]["content"])[-1]  # after the prompt's own example
        return "Output (a)" if len(first) > len(second) else "Output (b)"

    class ChatgptJudge(FakeJudge):
        def generate(self, conversations, params):
            self.prompts += conversations
            return [Completion(answer(m), "stop", 300, 3) for m in conversations]

    results, _, judge = run(tmp_path, ChatgptJudge(), annotator="chatgpt")
    assert [a["preference"] for a in read_jsonl(tmp_path / "annotations.jsonl")] == [2, 1, 2, 1, 2, 1.5, 2, 1]
    assert results["win_rate"] == pytest.approx(56.25) and len(judge.prompts) == 7


# ---------------------------------------------------------------------------------------------------------
# Length control: alpaca_eval's df_gamed.csv gives length_controlled_v1

GAMED_HEADER = "model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\n"
DIFFICULTY = [0.3, -1.2, 0.8, 0.05, -0.4, 1.5, -0.9, 0.6]


def write_gamed(path, n=8):
    """alpaca_eval's layout: the verbose baseline's rows for every instruction in order, then the concise's."""
    rows = [
        f"{model},{i},{'' if (i, model) == (3, 'concise') else round(0.1 + 0.1 * ((5 * i + k) % 9), 2)},"
        f"{round((-1) ** (i + k) * 0.25 * (i + 1), 2)},{DIFFICULTY[i]},False\n"
        for k, model in enumerate(("verbose", "concise"))
        for i in range(n)
    ]
    path.write_text(GAMED_HEADER + "".join(rows))
    return path


def test_read_lc_data_takes_difficulty_by_index_and_the_rows_in_file_order(tmp_path):
    from zephyr.stages.alpaca_eval.run import read_lc_data

    lc = read_lc_data(write_gamed(tmp_path / "df_gamed.csv"), 8, "set")
    assert lc["instruction_difficulty"] == dict(enumerate(DIFFICULTY))
    gamed = lc["gamed"]
    assert gamed.preference[:3] == [0.1, 0.6, 0.2] and gamed.preference[8:10] == [0.2, 0.7]
    assert math.isnan(gamed.preference[11])  # empty: NaN, which the fit leaves out (as alpaca_eval)
    assert gamed.std_delta_len[:3] == [0.25, -0.5, 0.75] and gamed.std_delta_len[8] == -0.25
    assert gamed.instruction_difficulty == DIFFICULTY + DIFFICULTY


def test_lc_data_gives_length_controlled_v1(tmp_path):
    from zephyr.stages.alpaca_eval.run import LC_VARIANT_NOTE, read_lc_data

    path = write_gamed(tmp_path / "df_gamed.csv")
    results, _, _ = run(tmp_path / "v1", lc_data=path)
    assert results["length_controlled_glm"] == "length_controlled_v1" and results["lc_data"] == str(path)
    annotations = [
        ae.Annotation(i, a["preference"], o, r["output"])
        for i, (a, o, r) in enumerate(
            zip(
                read_jsonl(tmp_path / "v1" / "annotations.jsonl"),
                MODEL_ANSWERS.values(),
                read_jsonl(DATA),
                strict=True,
            )
        )
    ]
    expected = ae.summarize(annotations, **read_lc_data(path, 8, DATA))
    assert results["length_controlled_winrate"] == expected["length_controlled_winrate"]
    assert results["length_controlled_winrate"] != ae.summarize(annotations)["length_controlled_winrate"]
    assert "length_controlled_v1" in (tmp_path / "v1" / "results.md").read_text()
    assert "The length-controlled win rate uses" not in (tmp_path / "v1" / "results.md").read_text()

    minimal, _, _ = run(tmp_path / "minimal")  # no data: alpaca_eval's minimal GLM, named as such
    assert minimal["length_controlled_glm"] == "length_controlled_minimal" and minimal["lc_data"] is None
    note = LC_VARIANT_NOTE.format(glm="length_controlled_minimal")
    assert note in (tmp_path / "minimal" / "results.md").read_text()


def test_bad_lc_data_fails_before_the_model_answers(tmp_path):
    short = write_gamed(tmp_path / "short.csv", n=5)
    with pytest.raises(ConfigError, match=r"short\.csv: difficulty for 5 instructions, but .* has 8"):
        run(tmp_path / "out", lc_data=short)
    assert not (tmp_path / "out" / "outputs.jsonl").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text(GAMED_HEADER + "verbose,0,0.5,0.1,0.2,False\nverbose,1,0.5,abc,0.2,False\n")
    with pytest.raises(DataError) as exc:
        run(tmp_path / "out", lc_data=bad)
    assert str(exc.value) == f"{bad}:3: std_delta_len: not a number: 'abc'"
    bad.write_text("model,index,preference\nverbose,0,0.5\n")
    with pytest.raises(DataError, match=r"bad\.csv:1: columns instruction_difficulty, std_delta_len missing"):
        run(tmp_path / "out", lc_data=bad)


def test_lc_data_from_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from zephyr.core.errors import ZephyrError

    asked = []

    def download(**kwargs):
        asked.append(kwargs)
        return str(write_gamed(tmp_path / "cached.csv"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    results, _, _ = run(tmp_path / "out", lc_data="hf:tatsu-lab/alpaca_eval")
    assert asked == [
        {
            "repo_id": "tatsu-lab/alpaca_eval",
            "filename": "df_gamed.csv",
            "repo_type": "dataset",
            "revision": None,
        }
    ]
    assert results["length_controlled_glm"] == "length_controlled_v1"

    def offline(**kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(
        ZephyrError, match=r"hf:tatsu-lab/alpaca_eval: could not download .* local df_gamed\.csv"
    ):
        run(tmp_path / "offline", lc_data="hf:tatsu-lab/alpaca_eval")


def test_report_names_the_lc_variant():
    from zephyr.stages.report.blocks import Text
    from zephyr.stages.report.eval_layout import _alpaca_eval_blocks

    evals = {
        "sft": {"alpaca_eval": {"win_rate": 50.0, "length_controlled_glm": "length_controlled_minimal"}},
        "dpo": {"alpaca_eval": {"win_rate": 60.0, "length_controlled_glm": "length_controlled_v1"}},
    }
    texts = [b.text for b in _alpaca_eval_blocks(evals, {}) if isinstance(b, Text)]
    assert texts == [
        "Length-controlled GLM (leaderboard: length_controlled_v1): sft: length_controlled_minimal, "
        "dpo: length_controlled_v1"
    ]


# ---------------------------------------------------------------------------------------------------------
# The whole run against alpaca_eval's own `evaluate` (its annotator pipeline and its metrics)

N_PARITY = 300
_TAGGED = re.compile(r"<(?:MODEL|REF) \d+> [mr]*")


def _parity_set():
    """300 instructions; reference and model outputs tagged so a judge finds them in any template; every
    37th model output equals the reference (a draw without a judge call)."""
    rng = random.Random(5)
    topics = ["tides", "rain", "volcanoes", "tax law", "sourdough", "chess openings"]
    items = []
    for i in range(N_PARITY):
        reference = f"<REF {i}> " + "r" * rng.randint(20, 900)
        model = reference if i % 37 == 0 else f"<MODEL {i}> " + "m" * rng.randint(5, 1500)
        items.append((f"Item {i}: explain {rng.choice(topics)}.", reference, model))
    return items


def _parity_verdict(messages):
    """A judge with a position bias and some noise, deterministic in what it is shown: P(the output shown
    first is better) and a number in [0, 100) that picks the rare unusable answers."""
    first, second = _TAGGED.findall(messages[-1]["content"])
    noise = zlib.crc32((first + "|" + second).encode())
    z = (len(first) - len(second)) / 300 + 0.4 + (noise % 1000) / 1000 - 0.5
    return 1 / (1 + math.exp(-z)), noise % 100


def _parity_answer(name, messages):
    """(text, top log-probs of its one token or None) as each annotator's judge would answer."""
    p_first, unusable = _parity_verdict(messages)
    if name == "weighted_alpaca_eval_gpt4_turbo":
        tops = (
            {"The": -0.05, "Based": -3.0}
            if unusable < 4
            else {"m": math.log(0.95 * p_first), "M": math.log(0.95 * (1 - p_first)), "Both": math.log(0.05)}
        )
        top = [{"token": t, "logprob": v} for t, v in sorted(tops.items(), key=lambda kv: -kv[1])]
        return top[0]["token"], [{**top[0], "top_logprobs": top}]
    if name == "chatgpt":
        text = "Output (a)" if p_first > 0.5 else "Output (b)"
        return ("Output (a)\nOutput (b)" if unusable < 4 else text), None
    ranks = (1, 2) if p_first > 0.5 else (2, 1)
    text = f"[{{'model': 'model_1', 'rank': {ranks[0]}}}, {{'model': 'model_2', 'rank': {ranks[1]}}}]"
    return ("Both are good." if unusable < 4 else text), None


class ParityJudge:
    model_id = "parity-judge"

    def __init__(self, name):
        self.name, self.params, self.prompts = name, [], []

    def generate(self, conversations, params):
        self.params.append(params)
        self.prompts += [list(c) for c in conversations]
        answers = [_parity_answer(self.name, c) for c in conversations]
        return [
            Completion(text, "stop", 500, 1, logprobs=logprobs if params.logprobs else None)
            for text, logprobs in answers
        ]


class ParityModel:
    model_id = "parity-model"

    def __init__(self, outputs):
        self.outputs = outputs

    def generate(self, conversations, params):
        return [Completion(self.outputs[c[-1]["content"]], "stop", 10, 5) for c in conversations]


def _parity_files(tmp_path: Path, items: list) -> tuple[Path, Path]:
    """The instructions with their reference outputs, and a synthetic df_gamed.csv for them."""
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text(
        "".join(
            json.dumps({"instruction": x, "output": r, "generator": "reference"}) + "\n" for x, r, _ in items
        )
    )
    rng = random.Random(7)
    difficulty = [rng.gauss(0, 1) for _ in range(N_PARITY)]
    rows = []
    for model, sign in (("verbose", -1), ("concise", 1)):  # the verbose baseline is longer: Δ < 0, it wins
        for i in range(N_PARITY):
            delta = sign * abs(rng.gauss(1, 0.5))
            z = -1.5 * math.tanh(delta) - 0.5 * difficulty[i] + rng.gauss(0, 0.5)
            rows.append(f"{model},{i},{1 / (1 + math.exp(-z)):.6f},{delta:.6f},{difficulty[i]!r},False\n")
    gamed = tmp_path / "df_gamed.csv"
    gamed.write_text(GAMED_HEADER + "".join(rows))
    return instructions, gamed


def _alpaca_eval_evaluate(monkeypatch, name: str, items: list, gamed: Path, limit: int | None):
    """alpaca_eval's own `evaluate` on the items, its judge's answers from `_parity_answer` and its
    df_gamed.csv from `gamed`: (the leaderboard row, its annotations, the settings of each judge call, the
    prompts sent)."""
    import warnings

    import alpaca_eval.annotators.base as annotator_base
    import alpaca_eval.metrics.glm_winrate as glm
    from alpaca_eval import utils
    from alpaca_eval.main import evaluate

    asked, sent = [], []

    def completions(prompts, **kwargs):
        asked.append(kwargs)
        sent.extend(prompts)
        answers = [_parity_answer(name, utils.prompt_to_chatml(p)) for p in prompts]
        return {
            "completions": [t for t, _ in answers],
            "completions_all": [{"logprobs": {"content": lp}} for _, lp in answers],
        }

    monkeypatch.setattr(annotator_base, "get_fn_completions", lambda _: completions)
    monkeypatch.setattr(glm, "hf_hub_download", lambda **kwargs: str(gamed))
    glm_info = {
        **glm.GLM_INFO["length_controlled_v1"],
        "kwargs": {"n_splits": 5, "tol": 1e-12, "max_iter": 100_000},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leaderboard, annotations = evaluate(
            model_outputs=[{"instruction": x, "output": m, "generator": "parity-model"} for x, _, m in items],
            reference_outputs=[
                {"instruction": x, "output": r, "generator": "reference"} for x, r, _ in items
            ],
            annotators_config=name,
            output_path=None,
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            is_cache_leaderboard=False,
            fn_metric="get_length_controlled_winrate",
            metric_kwargs={"glm_info": glm_info, "save_weights_dir": None},
            caching_path=None,
            max_instances=limit,
        )
    return leaderboard.loc["parity-model"], annotations, asked, sent


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("alpaca_eval_gpt4", None),
        ("weighted_alpaca_eval_gpt4_turbo", None),
        ("chatgpt", None),
        ("alpaca_eval_gpt4", 120),  # alpaca_eval's max_instances: the same 120 of the 300
    ],
)
def test_run_equals_alpaca_eval_evaluate(tmp_path, monkeypatch, name, limit):
    """alpaca_eval 0.6.6's `evaluate` (PairwiseAnnotator, seed 0, its parsers, get_length_controlled_winrate
    with its df_gamed.csv) and `zephyr eval alpaca-eval` on the same 300 instructions, outputs, judge and
    length-control data: the same prompts, preferences (failures included) and leaderboard row; with a limit,
    alpaca_eval's `max_instances` and zephyr's `limit` judge the same instructions."""
    from alpaca_eval import utils

    items = _parity_set()
    instructions, gamed = _parity_files(tmp_path, items)
    expected, expected_annotations, asked, sent = _alpaca_eval_evaluate(
        monkeypatch, name, items, gamed, limit
    )

    judge = ParityJudge(name)
    cfg = AlpacaEvalEvalConfig(
        judge="parity-judge", instructions=str(instructions), annotator=name, lc_data=str(gamed), limit=limit
    )
    results = run_alpaca_eval(
        cfg, "parity-model", tmp_path / "out", model_generator=ParityModel({x: m for x, _, m in items}),
        judge_generator=judge,
    )  # fmt: skip

    # the same requests: every prompt (text and output order) and the judge's settings
    def canonical(messages):
        return json.dumps(messages, sort_keys=True)

    assert sorted(map(canonical, judge.prompts)) == sorted(canonical(utils.prompt_to_chatml(p)) for p in sent)
    [params] = judge.params
    settings = {k: v for k, v in asked[0].items() if k != "model_name"}  # the model: zephyr's judge spec
    assert {k: getattr(params, k) for k in settings} == settings

    # the same preference per instruction, unparsed answers included
    ours = read_jsonl(tmp_path / "out" / "annotations.jsonl")
    theirs = {a["instruction"]: a["preference"] for a in expected_annotations}
    assert [a["instruction"] for a in ours] == [a["instruction"] for a in expected_annotations]
    for a in ours:
        value = theirs[a["instruction"]]
        if a["preference"] is None:
            assert value is None or math.isnan(value), a["instruction"]
        else:  # the weighted ones: 3 - (2 - p), each side's rounding of p = exp(ln P(m) - logsumexp)
            assert a["preference"] == pytest.approx(value, rel=0, abs=4.5e-16), a["instruction"]
    assert results["n_failed"] == sum(a["preference"] is None for a in ours) > 0  # the LC predicts them too
    assert results["n_draws"] == (9 if limit is None else 6)  # identical outputs, never sent to the judge

    for key in ("n_wins", "n_wins_base", "n_draws", "n_total", "avg_length"):
        assert results[key] == expected[key], key
    for key in ("win_rate", "standard_error", "discrete_win_rate"):  # float64 near 50: spacing 7e-15, and
        assert results[key] == pytest.approx(expected[key], rel=0, abs=1e-12), key  # sums in another order
    # the GLM solved to float precision on both sides (liblinear at tol 1e-12): percentages near 50
    assert results["length_controlled_glm"] == "length_controlled_v1"
    assert abs(results["length_controlled_winrate"] - results["win_rate"]) > 5  # the length term matters
    if limit is None:
        for key in ("length_controlled_winrate", "lc_standard_error"):
            assert results[key] == pytest.approx(expected[key], rel=0, abs=1e-6), key
        return
    # alpaca_eval keys instruction difficulty by the row's place among the instructions it judged, which
    # after max_instances' shuffle is not the instruction's own place; zephyr keys it by the instruction's
    # place in the set. Given alpaca_eval's keys, zephyr's GLM gives alpaca_eval's LC win rate.
    outputs = read_jsonl(tmp_path / "out" / "outputs.jsonl")
    misplaced = [
        ae.Annotation(k, a["preference"], o["output"], o["reference_output"])
        for k, (a, o) in enumerate(zip(ours, outputs, strict=True))
    ]
    as_alpaca_eval = ae.summarize(misplaced, **alpaca_eval_run.read_lc_data(gamed, N_PARITY, instructions))
    for key in ("length_controlled_winrate", "lc_standard_error"):
        assert as_alpaca_eval[key] == pytest.approx(expected[key], rel=0, abs=1e-6), key
    assert abs(results["length_controlled_winrate"] - expected["length_controlled_winrate"]) > 1e-3
