"""AlpacaEval: judge requests, preference parsing, win rates and the length-controlled GLM.

Golden values by hand first; then parity with alpaca_eval 0.6.6's own functions (one slow module fixture,
its import takes seconds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import warnings

import numpy as np
import pytest

from zephyr.core.errors import AssetError, ConfigError
from zephyr.judge.rating import Rating
from zephyr.models import assets
from zephyr.stages.alpaca_eval import protocol as ae
from zephyr.stages.alpaca_eval.protocol import Annotation, GamedBaselines

FN_SYSTEM = (
    "You are a highly efficient assistant, who evaluates and rank large language models (LLMs) based on the "
    "quality of their responses to given prompts. This process will create a leaderboard reflecting the most "
    "accurate and human-preferred answers."
)


ANNOTATORS = ("alpaca_eval_gpt4", "weighted_alpaca_eval_gpt4_turbo", "chatgpt", "alpaca_eval_gpt4_turbo_fn")


@pytest.fixture(scope="module")
def annotators():
    folder = assets.fetch("alpaca-eval-templates")
    return {name: ae.load_annotator(folder, name) for name in ANNOTATORS}


# ---------------------------------------------------------------------------------------------------------
# Requests and parsing


def test_load_annotators(annotators):
    fn = annotators["alpaca_eval_gpt4_turbo_fn"]
    assert (fn.parser, fn.model_1_name, fn.annotation_key) == ("json_ranking", "m", "ordered_models")
    assert fn.completions_kwargs["tool_choice"]["function"]["name"] == "make_partial_leaderboard"
    assert fn.completions_kwargs["temperature"] == 0
    gpt4 = annotators["alpaca_eval_gpt4"]
    assert (gpt4.parser, gpt4.model_1_name, gpt4.annotation_key) == ("ranking", "model_1", None)


def test_load_the_alpaca_eval_2_and_chatgpt_annotators(annotators):
    """AlpacaEval 2.0's default judge: the clf template, one token, top-5 log-probs, "m" names output_1."""
    weighted = annotators["weighted_alpaca_eval_gpt4_turbo"]
    assert weighted.parser == "logprob"
    assert weighted.logprob == ae.LogprobRule("m", ("m", "M"), is_binarize=False)
    assert weighted.logprob.tokens == ("m", "M")
    assert {k: weighted.completions_kwargs[k] for k in ("max_tokens", "temperature", "logprobs", "top_logprobs")} == {
        "max_tokens": 1, "temperature": 1, "logprobs": True, "top_logprobs": 5,
    }  # fmt: skip
    assert weighted.template.rstrip().endswith("## Best Model Identifier\n<|im_end|>")
    assert '"model_identifier": "m",\n        "output": """{output_1}"""' in weighted.template
    chatgpt = annotators["chatgpt"]  # no parser in its config: alpaca_eval's pairwise default, regex_parser
    assert chatgpt.parser == "regex" and chatgpt.completions_kwargs["max_tokens"] == 50
    assert chatgpt.outputs_to_match == ((1, r"(?:^|\n) ?Output \(a\)"), (2, r"(?:^|\n) ?Output \(b\)"))


def test_annotators_are_chosen_by_name(tmp_path):
    folder = assets.fetch("alpaca-eval-templates")
    assert ae.annotator_names(folder) == sorted(ANNOTATORS)
    with pytest.raises(AssetError) as exc:
        ae.load_annotator(folder, "gpt4")
    assert str(exc.value).endswith(f"annotators in {folder}: {', '.join(sorted(ANNOTATORS))}")
    (tmp_path / "batched").mkdir()  # alpaca_eval settings zephyr does not reproduce are refused, not ignored
    (tmp_path / "batched" / "configs.yaml").write_text(
        "batched:\n  prompt_template: t.txt\n  batch_size: 5\n  processors_to_kwargs: {}\n"
    )
    with pytest.raises(AssetError, match=r"'batched' sets processors_to_kwargs, batch_size 5: not supported"):
        ae.load_annotator(tmp_path, "batched")


def test_request_places_outputs_by_switch(annotators):
    fn = annotators["alpaca_eval_gpt4_turbo_fn"]
    instructions = [f"Name {i} rivers." for i in range(40)]
    switches = [ae.is_switched(text) for text in instructions]
    assert 10 < sum(switches) < 30  # about half
    assert switches == [ae.is_switched(text) for text in instructions]  # seeded, not random per call
    assert switches != [ae.is_switched(text, seed=7) for text in instructions]
    for text, switched in zip(instructions[:6], switches[:6], strict=True):
        request = ae.make_request(fn, text, "REFERENCE {output_1}", "MODEL")
        assert request.switched is switched and not request.identical
        assert request.model_position == (1 if switched else 2)
        first, second = ("MODEL", "REFERENCE {output_1}") if switched else ("REFERENCE {output_1}", "MODEL")
        system, user = request.messages
        assert system == {"role": "system", "content": FN_SYSTEM}
        assert user["role"] == "user"
        assert f'"instruction": """{text}""",' in user["content"]
        assert f'"model": "m",\n        "output": """{first}"""' in user["content"]
        assert f'"model": "M",\n        "output": """{second}"""' in user["content"]
        assert user["content"].endswith("the model with the highest quality output is ranked first.")
    assert ae.make_request(fn, "x", "same", "same").identical


def test_fill_template_inserts_values_verbatim():
    template = "{instruction} | {output_1} | {output_2} | {output_1}"
    filled = ae.fill_template(template, {"instruction": "say {output_2}", "output_1": "a", "output_2": "b"})
    assert filled == "say {output_2} | a | b | {output_1}"  # first occurrence only, values not rescanned
    with pytest.raises(Exception, match="has no value"):
        ae.fill_template("{instruction} {other}", {"instruction": "x"})


@pytest.mark.parametrize(
    ("completion", "switched", "expected"),
    [
        ('{"ordered_models": [{"model": "m", "rank": 1}, {"model": "M", "rank": 2}]}', False, 1.0),
        ('{"ordered_models": [{"model": "M", "rank": 1}, {"model": "m", "rank": 2}]}', False, 2.0),
        # switched: the model was shown first as "m", so m ranked first means the model wins
        ('{"ordered_models": [{"model": "m", "rank": 1}, {"model": "M", "rank": 2}]}', True, 2.0),
        ('{"ordered_models": [{"model": "m", "rank": 2.0}, {"model": "M", "rank": 1}]}', True, 1.0),
        ('Sure:\n```json\n{"ordered_models": [{"model": "m", "rank": 2}]}\n```', False, 2.0),
        ('{"ordered_models": [{"model": "m", "rank": 3}, {"model": "M", "rank": 1}]}', False, None),
        ('{"ordered_models": [{"model": "M", "rank": 1}]}', False, None),  # m not ranked
        ('{"ranking": []}', False, None),
        ("[[m]] is better", False, None),
        ("", False, None),
    ],
)
def test_parse_function_call_preference(annotators, completion, switched, expected):
    rating = ae.parse_preference(annotators["alpaca_eval_gpt4_turbo_fn"], completion, switched)
    assert rating.value == expected
    assert (rating.reason is None) == (expected is not None)


def test_parse_ranking_preference(annotators):
    gpt4 = annotators["alpaca_eval_gpt4"]
    text = "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]"
    assert ae.parse_preference(gpt4, text, switched=False) == Rating(2.0)
    assert ae.parse_preference(gpt4, text, switched=True) == Rating(1.0)
    assert ae.parse_preference(gpt4, "model_1 is better", switched=False) == Rating(None, ae.NO_RANKING)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Output (a)", 1.0),
        ("Output (b)", 2.0),
        (" Output (b)", 2.0),  # one optional space at the start
        ("Best:\nOutput (a)", 1.0),  # or right after a newline
        ("Output (b)\n\nOutput (b) is clearer.", None),  # found twice: alpaca_eval wants exactly one
        ("Output (a) is better than Output (b)", 1.0),  # the second mention is not at a line start
        ("I choose Output (a)", None),  # not at a line start
        ("output (a)", None),  # case-sensitive
        ("", None),
    ],
)
def test_parse_regex_preference(annotators, completion, expected):
    """chatgpt's regex_parser: the pattern matched earliest, searching on after each match."""
    chatgpt = annotators["chatgpt"]
    assert ae.parse_preference(chatgpt, completion, switched=False).value == expected
    flipped = None if expected is None else 3 - expected  # the model was shown as output (a)
    assert ae.parse_preference(chatgpt, completion, switched=True).value == flipped


def _answer(tops: dict[str, float]) -> list[dict]:
    """One answer token in the API's logprobs.content shape, with its top alternatives."""
    top = [{"token": t, "logprob": v} for t, v in tops.items()]
    return [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]


def test_weighted_preference_from_the_top_logprobs(annotators):
    """2 - P(m) / (P(m) + P(M)) over the answer token's top log-probs; m names the output shown first."""
    weighted, ln = annotators["weighted_alpaca_eval_gpt4_turbo"], math.log
    content = _answer({"M": ln(0.6), "m": ln(0.2), "Both": ln(0.1), " m": ln(0.05)})  # " m" is not "m"
    # P(m | m or M) = .2 / .8 = .25: shown frame 1.75; switched (the model shown as m): 3 - 1.75 = 1.25
    # the evidence is every answer token's top log-probs, as the judge audit keeps them
    read = ae.parse_logprob_preference(weighted, content, switched=False)
    assert read == Rating(pytest.approx(1.75), None, {"top_logprobs": [content[0]["top_logprobs"]]})
    assert ae.parse_logprob_preference(weighted, content, switched=True).value == pytest.approx(1.25)
    assert ae.parse_logprob_preference(weighted, _answer({"m": -0.3, "The": -2.0}), False).value == 1.0
    assert ae.parse_logprob_preference(weighted, _answer({"M": -0.3}), True).value == 1.0
    unnamed = ae.parse_logprob_preference(weighted, _answer({"The": -0.1}), False)
    assert (unnamed.value, unnamed.reason) == (None, ae.NO_OUTPUT_TOKEN)
    assert ae.parse_logprob_preference(weighted, None, False) == Rating(None, ae.NO_LOGPROBS)
    two = _answer({"m": -0.1}) * 2
    assert ae.parse_logprob_preference(weighted, two, False).reason == ae.NOT_ONE_TOKEN
    binarized = ae.LogprobRule("m", ("m", "M"), is_binarize=True)
    assert ae.preference_from_top_logprobs(binarized, content[0]["top_logprobs"]) == 2.0
    assert (
        ae.preference_from_top_logprobs(binarized, _answer({"m": -1.0, "M": -1.5})[0]["top_logprobs"]) == 1.0
    )
    with pytest.raises(ConfigError, match="log-probabilities"):
        ae.parse_preference(weighted, "m", switched=False)


def test_ranking_prefix_follows_the_prompts_answer_format(annotators):
    gpt4 = annotators["alpaca_eval_gpt4"]
    prefix = ae.ranking_prefix(gpt4)
    assert prefix == "[\n    {'model': 'model_"
    # the layout the prompt shows, with the model names the prompt gives the outputs
    assert "[\n    {'model': <model-name>, 'rank': <model-rank>}," in gpt4.template
    assert '"model": "model_1"' in gpt4.template and '"model": "model_2"' in gpt4.template
    # the forced start continues into answers the text mode reads: model_2 ranked first is preference 2
    answer = prefix + "2', 'rank': 1},\n    {'model': 'model_1', 'rank': 2}\n]"
    assert ae.parse_preference(gpt4, answer, switched=False) == Rating(2.0)
    with pytest.raises(ConfigError, match="judge_mode logprobs"):
        ae.ranking_prefix(annotators["alpaca_eval_gpt4_turbo_fn"])
    # where each annotator's answer names the preferred output, for logprobs mode
    assert ae.forced_answer(gpt4) == ae.ForcedAnswer(prefix, ("1", "2"))
    assert ae.forced_answer(annotators["weighted_alpaca_eval_gpt4_turbo"]) == ae.ForcedAnswer("", ("m", "M"))
    for name in ("chatgpt", "alpaca_eval_gpt4_turbo_fn"):
        with pytest.raises(ConfigError, match="weighted_alpaca_eval_gpt4_turbo"):
            ae.forced_answer(annotators[name])


def test_preference_from_logprobs_is_fractional_and_undoes_the_switch():
    ln = math.log
    # the output shown first ranked first with .75 ("1"), the second with .25; other tokens do not count
    top = {"1": ln(0.6), "2": ln(0.2), "3": ln(0.1), "A": ln(0.1)}
    read = ae.preference_from_logprobs(top, switched=False)
    assert read.value == pytest.approx(1.25) and read.reason is None  # mostly the reference (shown first)
    assert read.evidence == {
        "mass": pytest.approx(0.8),
        "ranked_first": {"1": pytest.approx(0.75), "2": pytest.approx(0.25)},
    }
    switched = ae.preference_from_logprobs(top, switched=True)  # the model was shown first: mostly the model
    assert switched.value == pytest.approx(1.75)
    assert ae.preference_from_logprobs({"2": 0.0}, switched=False).value == 2.0
    assert ae.preference_from_logprobs({"2": 0.0}, switched=True).value == 1.0
    named = ae.preference_from_logprobs({"M": ln(0.3), "m": ln(0.1)}, switched=False, tokens=("m", "M"))
    assert (named.value, named.evidence["ranked_first"]) == (
        pytest.approx(1.75),
        {"m": pytest.approx(0.25), "M": pytest.approx(0.75)},
    )
    low = ae.preference_from_logprobs({"model": 0.0, "1": ln(5e-4), "2": ln(4e-4)}, switched=False)
    assert (low.value, low.reason, low.evidence["ranked_first"]) == (None, ae.LOW_MASS, {})
    assert low.evidence["mass"] == pytest.approx(9e-4)


# ---------------------------------------------------------------------------------------------------------
# Win rates, by hand


def test_win_rate_golden():
    # 2 model win, 1 reference win, 1.5 and 0 draws, None unparsed: values 1, 0, .5, 1, .5
    prefs = [2, 1, 1.5, 2, None, 0]
    assert ae.win_rate(prefs) == pytest.approx(60.0)
    # deviations .4 -.6 -.1 .4 -.1 -> sum of squares .7, var .175, sem sqrt(.175 / 5)
    assert ae.standard_error(prefs) == pytest.approx(100 * math.sqrt(0.175 / 5))
    assert ae.head_to_head(prefs) == {"n_wins": 2, "n_wins_base": 1, "n_draws": 2, "n_total": 5}
    soft = [1.7, 1.2, 1.5, 1.51]
    assert ae.win_rate(soft) == pytest.approx((0.7 + 0.2 + 0.5 + 0.51) / 4 * 100)
    assert ae.discrete_win_rate(soft) == pytest.approx((1 + 0 + 0.5 + 1) / 4 * 100)  # 1.51 rounds to a win
    # 2.5 is no preference for the win rate (dropped), but the discrete rule rounds first (half to even: 2)
    assert ae.win_rate([2.5, 1.0]) == pytest.approx(0.0)
    assert ae.discrete_win_rate([2.5, 1.0]) == pytest.approx(50.0)
    assert math.isnan(ae.standard_error([2]))
    assert ae.avg_length(["abc", "de", "ü"]) == 2  # int(6 / 3) characters


def test_length_controlled_golden_cases():
    lengths = [10, 200, 35, 400, 90, 60, 500, 7, 120, 300]
    refs = [100] * 10
    # all draws: the L1-penalised fit stays at zero weights, every prediction is 0.5
    lc = ae.length_controlled_win_rate([1.5] * 10, lengths, refs, glm="length_controlled_minimal")
    assert lc.win_rate == pytest.approx(50.0, abs=1e-9)
    assert lc.weights == {ae.LENGTH: 0.0, ae.MODEL: 0.0}
    same = ae.length_controlled_win_rate([2.0] * 10, lengths, refs, same_model=True)
    assert (same.win_rate, same.standard_error, same.C) == (50.0, 0.0, None)
    with pytest.raises(ConfigError, match="instruction difficulty"):
        ae.length_controlled_win_rate([2.0] * 10, lengths, refs)
    with pytest.raises(ConfigError, match="df_gamed"):
        ae.length_controlled_win_rate([2.0] * 10, lengths, refs, instruction_difficulty=[0.0] * 10)
    with pytest.raises(ConfigError, match="unknown"):
        ae.length_controlled_win_rate([2.0] * 10, lengths, refs, glm="lc_v2")


def test_l1_logistic_solution_meets_optimality_conditions():
    """∇ smooth part + subgradient of ||w||₁ contains 0: the fit is the exact minimiser, not a solver's
    approximation (so agreement with alpaca_eval is limited only by liblinear's own tolerance)."""
    rng = np.random.default_rng(0)
    X = np.column_stack([np.tanh(rng.normal(size=60)), rng.normal(size=60), np.ones(60)])
    target = 1 / (1 + np.exp(-(X @ np.array([-1.0, 0.4, 0.3]) + rng.normal(size=60))))
    weight = rng.uniform(0.1, 1.0, size=60)
    for C in (0.05, 1.0, 100.0):
        w = ae._fit_l1_logistic(X, target, weight, C)
        q = 1 / (1 + np.exp(-(X @ w)))
        grad = C * X.T @ (weight * (q - target))
        for j in range(3):
            if w[j] != 0:
                assert grad[j] + np.sign(w[j]) == pytest.approx(0, abs=1e-8)
            else:
                assert abs(grad[j]) <= 1 + 1e-8
    assert np.all(ae._fit_l1_logistic(X, target, weight, 1e-4) == 0)  # tiny C: the penalty wins


def test_summarize_counts_failures_and_reports_glm():
    rng = random.Random(3)
    rows = [
        Annotation(
            i, rng.choice([1.0, 2.0, 1.5, None]), "m" * rng.randint(5, 400), "r" * rng.randint(50, 200)
        )
        for i in range(30)
    ]
    result = ae.summarize(rows)
    parsed = [r for r in rows if r.preference is not None]
    assert result["n_failed"] == 30 - len(parsed) > 0
    assert result["n_total"] == len(parsed)
    assert result["win_rate"] == pytest.approx(ae.win_rate([r.preference for r in parsed]))
    assert result["avg_length"] == int(sum(len(r.model_output) for r in rows) / 30)
    assert result["length_controlled_glm"] == "length_controlled_minimal"
    assert 0 < result["length_controlled_winrate"] < 100


def test_summarize_small_and_empty():
    few = ae.summarize(
        [Annotation(i, 2.0, "a" * (i + 1), "b") for i in range(3)] + [Annotation(3, None, "x", "y")]
    )
    assert few["win_rate"] == 100.0 and few["n_failed"] == 1
    assert few["length_controlled_winrate"] is None and "needs >= 5" in few["length_controlled_note"]
    none_parsed = ae.summarize([Annotation(0, None, "x", "y")])
    assert none_parsed["win_rate"] is None and none_parsed["standard_error"] is None
    json.dumps(few, allow_nan=False)
    json.dumps(none_parsed, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------
# Parity with alpaca_eval 0.6.6


def _table(n: int = 40, seed: int = 0):
    """A fixed annotation table: soft and hard preferences that depend on length, a few draws."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        model_len, ref_len = rng.randint(50, 1500), rng.randint(200, 900)
        soft = 1 + 1 / (1 + math.exp(-(model_len - ref_len) / 400 + rng.gauss(0, 1)))
        preference = rng.choice([1.0, 2.0]) if rng.random() < 0.3 else round(soft, 3)
        if i % 13 == 0:
            preference = 1.5
        rows.append(Annotation(i, preference, "m" * model_len, "r" * ref_len))
    difficulty = [rng.gauss(0, 1) for _ in range(n)]
    gamed_rows = [
        {"model": m, "index": i, "preference": rng.random(), "std_delta_len": rng.gauss(0, 1)}
        for m in ("verbose", "concise")
        for i in range(n)
    ]
    return rows, difficulty, gamed_rows


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    """alpaca_eval's metrics with the hub download of df_gamed.csv pointed at a local synthetic file."""
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import alpaca_eval.completion_parsers as parsers
        import alpaca_eval.metrics.glm_winrate as glm
        from alpaca_eval import processors, utils
        from alpaca_eval.metrics import get_winrate

    rows, difficulty, gamed_rows = _table()
    df_gamed = pd.DataFrame(gamed_rows)
    df_gamed["instruction_difficulty"] = [difficulty[r["index"]] for r in gamed_rows]
    df_gamed["not_gamed_baseline"] = False
    path = tmp_path_factory.mktemp("alpaca") / "df_gamed.csv"
    df_gamed.to_csv(path, index=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(glm, "hf_hub_download", lambda **kwargs: str(path))
        yield {
            "glm": glm,
            "get_winrate": get_winrate,
            "parsers": parsers,
            "processors": processors,
            "utils": utils,
            "pd": pd,
            "rows": rows,
            "difficulty": difficulty,
            "gamed": GamedBaselines(
                df_gamed["preference"].tolist(),
                df_gamed["std_delta_len"].tolist(),
                df_gamed["instruction_difficulty"].tolist(),
            ),
        }


def _frame(pd, rows):
    return pd.DataFrame(
        [
            {
                "index": r.index,
                "preference": math.nan if r.preference is None else r.preference,
                "output_1": r.reference_output,
                "output_2": r.model_output,
                "generator_1": "baseline",
                "generator_2": "model",
            }
            for r in rows
        ]
    )


def _reference_lc(alpaca, frame, glm_name, **solver):
    glm = alpaca["glm"]
    info = dict(glm.GLM_INFO[glm_name])
    info["kwargs"] = {**info["kwargs"], **solver}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return glm.get_length_controlled_winrate(frame, glm_info=info, save_weights_dir=None)


@pytest.mark.slow
def test_win_rates_equal_alpaca_eval(alpaca):
    rows = alpaca["rows"]
    preferences = [r.preference for r in rows] + [None, 0, 2.5]
    expected = alpaca["get_winrate"]([{"preference": math.nan if p is None else p} for p in preferences])
    assert ae.win_rate(preferences) == pytest.approx(expected["win_rate"], abs=1e-9)
    assert ae.standard_error(preferences) == pytest.approx(expected["standard_error"], abs=1e-9)
    assert ae.discrete_win_rate(preferences) == pytest.approx(expected["discrete_win_rate"], abs=1e-9)
    counts = ae.head_to_head(preferences)
    assert counts == {k: int(expected[k]) for k in ("n_wins", "n_wins_base", "n_draws", "n_total")}


# liblinear (alpaca_eval's solver) stops at tolerance 1e-4; given a 1e-12 tolerance it reaches the exact
# minimiser that zephyr computes, and then the LC win rates agree to 1e-6 (seen: ~1e-10). At alpaca_eval's
# default tolerance the difference is liblinear's early stop, ~1e-3 percentage points here.
EXACT = {"tol": 1e-12, "max_iter": 100_000}


@pytest.mark.slow
@pytest.mark.parametrize("glm_name", list(ae.GLMS))
def test_length_controlled_win_rate_equals_alpaca_eval(alpaca, glm_name):
    rows = alpaca["rows"]
    frame = _frame(alpaca["pd"], rows)
    ours = ae.length_controlled_win_rate(
        [r.preference for r in rows],
        [len(r.model_output) for r in rows],
        [len(r.reference_output) for r in rows],
        glm=glm_name,
        instruction_difficulty=[alpaca["difficulty"][r.index] for r in rows],
        gamed=alpaca["gamed"],
    )
    exact = _reference_lc(alpaca, frame, glm_name, **EXACT)
    assert ours.win_rate == pytest.approx(exact["length_controlled_winrate"], abs=1e-6)
    assert ours.standard_error == pytest.approx(exact["lc_standard_error"], abs=1e-6)
    np.testing.assert_allclose(ours.predictions, frame["glm_preference"], atol=1e-8)
    default = _reference_lc(alpaca, _frame(alpaca["pd"], rows), glm_name)
    assert ours.win_rate == pytest.approx(default["length_controlled_winrate"], abs=1e-2)
    assert ours.win_rate != pytest.approx(ae.win_rate([r.preference for r in rows]), abs=0.5)  # LC moved


@pytest.mark.slow
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_validation_equals_sklearn(alpaca, weighted):
    """Folds, per-fold scores for every C, the chosen C and the refit: alpaca_eval's LogisticRegressionCV."""
    from sklearn.model_selection import GroupKFold

    n = 37
    groups = np.concatenate([np.arange(n), np.arange(n)])  # each item twice, as alpaca_eval duplicates them
    folds = ae._group_folds(n)
    for fold, (_, test) in enumerate(GroupKFold(n_splits=5).split(groups, groups=groups)):
        assert sorted(set(groups[test])) == list(np.flatnonzero(folds == fold))

    rng = np.random.default_rng(1)
    X = np.column_stack([np.tanh(rng.normal(size=n)), rng.normal(size=n), np.ones(n)])
    target = 1 / (1 + np.exp(-(X @ np.array([-0.8, 0.5, 0.2]) + rng.normal(size=n))))
    weight = rng.choice([0.1, 1.0], size=n) if weighted else None
    data = alpaca["pd"].DataFrame(X, columns=["a", "b", "c"]).assign(preference=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = alpaca["glm"].fit_LogisticRegressionCV(
            data, "preference", is_ytrue_proba=True, sample_weight=weight, n_splits=5, **EXACT
        )
    np.testing.assert_allclose(ae._cv_scores(X, target, weight), model.scores_[1], rtol=0, atol=1e-9)
    coef, C = ae._fit_glm_cv(X, target, weight)
    assert model.C_[0] == C
    np.testing.assert_allclose(coef, model.coef_[0], rtol=0, atol=1e-8)


@pytest.mark.slow
def test_summarize_equals_alpaca_eval_pipeline(alpaca):
    """alpaca_eval's pipeline returns unparsed annotations with a null preference (in instruction order) and
    its metrics take them all: the win rates skip them, the GLM is fitted without them but predicts them."""
    rows = [
        Annotation(r.index, None if r.index % 7 == 3 else r.preference, r.model_output, r.reference_output)
        for r in alpaca["rows"]
    ]
    parsed = [r for r in rows if r.preference is not None]
    ours = ae.summarize(rows, instruction_difficulty=alpaca["difficulty"], gamed=alpaca["gamed"])
    assert ours["length_controlled_glm"] == "length_controlled_v1"
    assert ours["n_failed"] == len(rows) - len(parsed) == 6
    expected = _reference_lc(alpaca, _frame(alpaca["pd"], rows), "length_controlled_v1", **EXACT)
    only_parsed = _reference_lc(alpaca, _frame(alpaca["pd"], parsed), "length_controlled_v1", **EXACT)
    assert expected["length_controlled_winrate"] != pytest.approx(
        only_parsed["length_controlled_winrate"], abs=1e-3
    )
    for key in (
        "win_rate",
        "standard_error",
        "discrete_win_rate",
        "length_controlled_winrate",
        "lc_standard_error",
    ):
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key
    for key in ("n_wins", "n_wins_base", "n_draws", "n_total"):
        assert ours[key] == expected[key], key
    same = (
        alpaca["pd"]
        .DataFrame([{"preference": 1.5, "output_1": "a", "output_2": "a"}] * 5)
        .assign(index=range(5), generator_1="baseline", generator_2="baseline")
    )
    expected_same = _reference_lc(alpaca, same, "length_controlled_v1")
    assert (
        expected_same["length_controlled_winrate"]
        == ae.length_controlled_win_rate([1.5] * 5, [1] * 5, [1] * 5, same_model=True).win_rate
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ANNOTATORS)
def test_requests_equal_alpaca_eval_pipeline_prompts(alpaca, annotators, name, monkeypatch):
    """The prompts alpaca_eval's own annotator pipeline (PairwiseAnnotator.annotate_head2head, as its
    `evaluate` runs it) sends to the judge for 300 instructions: same text, same output order."""
    import alpaca_eval.annotators.base as annotator_base
    from alpaca_eval.annotators import PairwiseAnnotator

    utils, n = alpaca["utils"], 300
    sent: dict[int, list[dict]] = {}

    def record(prompts, **kwargs):  # the judge call: keep the prompt, answer nothing parseable
        for prompt in prompts:
            messages = utils.prompt_to_chatml(prompt)
            sent[int(re.search(r"Item (\d+):", messages[-1]["content"]).group(1))] = messages
        return {"completions": [""] * len(prompts), "completions_all": [""] * len(prompts)}

    monkeypatch.setattr(annotator_base, "get_fn_completions", lambda _: record)
    references = [
        {"instruction": f"Item {i}: explain {'tides' if i % 2 else 'rain'}.", "output": f"ref {i}"}
        for i in range(n)
    ]
    outputs = [dict(r, output=f"model answer {i} with {{braces}}") for i, r in enumerate(references)]
    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        judge = PairwiseAnnotator(annotators_config=name, caching_path=None)
        judge.annotate_head2head(outputs_1=references, outputs_2=outputs)
    assert sorted(sent) == list(range(n))
    switched = 0
    for i in range(n):
        request = ae.make_request(
            annotators[name], references[i]["instruction"], f"ref {i}", outputs[i]["output"]
        )
        assert request.messages == sent[i], i
        switched += request.switched
    assert 100 < switched < 200  # about half shown the other way round


@pytest.mark.slow
def test_parsers_equal_alpaca_eval(alpaca, annotators):
    parsers = alpaca["parsers"]

    def reference(annotator, completion):
        try:
            if annotator.parser == "ranking":
                out = parsers.ranking_parser(completion, model_1_name=annotator.model_1_name)
            elif annotator.parser == "regex":  # a fresh dict: regex_parser compiles the patterns in place
                out = parsers.regex_parser(completion, outputs_to_match=dict(annotator.outputs_to_match))
            else:
                steps = {
                    "json_parser": {"annotation_key": annotator.annotation_key},
                    "ranking_parser": {"model_1_name": annotator.model_1_name},
                }
                out = parsers.pipeline_meta_parser(completion, parsers_to_kwargs=steps)
        except Exception:
            return None
        if len(out) != 1 or out[0] is None or (isinstance(out[0], float) and math.isnan(out[0])):
            return None
        return float(out[0])

    completions = {
        "alpaca_eval_gpt4_turbo_fn": [
            '{"ordered_models": [{"model": "m", "rank": 1}, {"model": "M", "rank": 2}]}',
            '{"ordered_models": [{"model": "M", "rank": 1}, {"model": "m", "rank": 2}]}',
            '```json\n{"ordered_models": [{"model": "m", "rank": 2}]}\n```',
            '[{"ordered_models": [{"model": "m", "rank": 1}]}, {"ordered_models": []}]',
            '{"ordered_models": [{"model": "m", "rank": 3}]}',
            '{"ordered_models": [{"model": "x", "rank": 1}]}',
            "not json",
        ],
        "alpaca_eval_gpt4": [
            "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]",
            "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]",
            "[{'model': 'model_1', 'rank': 0}]",
            "model_1 wins",
        ],
        "chatgpt": [
            "Output (a)",
            "Output (b)",
            " Output (b)",
            "Best:\nOutput (a)",
            "Output (b)\n\nOutput (b) is clearer.",
            "Output (a) is better than Output (b)",
            "Output (a)\nOutput (b)",
            "I choose Output (a)",
            "output (a)",
            "",
        ],
    }
    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        for name, texts in completions.items():
            annotator = annotators[name]
            for text in texts:
                assert ae.parse_preference(annotator, text, switched=False).value == reference(
                    annotator, text
                ), text


# What a weighted annotator's one answer token can come back with: the top-5 alternatives in any order,
# the naming tokens missing, one of them only, look-alikes (" m", "m " are other tokens), far-apart values.
TOP_LOGPROBS = [
    {"m": -0.1, "M": -2.5, "Both": -4.0, "The": -6.0, " m": -7.0},
    {"M": -0.3, "m": -1.4},
    {"m": -0.7, "Model": -1.0},
    {"M": -0.01, "A": -5.0},
    {"The": -0.2, "Based": -1.9, " M": -3.0},
    {"m": -700.0, "M": -0.0001},
    {"M": -1e-9, "m": -25.0, "m ": -1.0},
    {"m": -0.6931471805599453, "M": -0.6931471805599453},
    {},
]


@pytest.mark.slow
@pytest.mark.parametrize("binarize", [False, True])
def test_weighted_annotator_parser_equals_alpaca_eval_logprob_parser(alpaca, annotators, binarize):
    """alpaca_eval `logprob_parser` with weighted_alpaca_eval_gpt4_turbo's settings (and the binarized
    clf variant) on the API answer, where its SingleAnnotator wants one value per answer (NaN: none)."""
    parsers = alpaca["parsers"]
    weighted = annotators["weighted_alpaca_eval_gpt4_turbo"]
    annotator = dataclasses.replace(
        weighted, logprob=dataclasses.replace(weighted.logprob, is_binarize=binarize)
    )

    def reference(content):
        try:
            out = parsers.logprob_parser(
                {"logprobs": {"content": content}}, numerator_token="m", denominator_tokens=["m", "M"],
                is_binarize=binarize,
            )  # fmt: skip
        except Exception:
            return None
        return None if len(out) != 1 or math.isnan(out[0]) else out[0]

    answers = [
        _answer(top) if top else [{"token": "x", "logprob": 0.0, "top_logprobs": []}] for top in TOP_LOGPROBS
    ]
    answers += [_answer(TOP_LOGPROBS[0]) * 2, []]  # two answer tokens; no logprobs content at all
    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        expected = [reference(content) for content in answers]
    assert [e is None for e in expected] == [False] * 4 + [True, False, False, False, True, True, True]
    for content, value in zip(answers, expected, strict=True):
        ours = ae.parse_logprob_preference(annotator, content, switched=False).value
        # float64 near 2 is spaced 4.4e-16; scipy's logsumexp and zephyr's may round their last step apart
        assert ours == (None if value is None else pytest.approx(value, rel=0, abs=4.5e-16)), content


def _three_minus_preference(df):
    """alpaca_eval PairwiseAnnotator's `_fn_replace_if_switch`: 3 - x on the preference, once there is one."""
    return df if df.empty or "preference" not in df.columns else df.assign(preference=3 - df["preference"])


@pytest.mark.slow
def test_logprob_preference_equals_alpaca_eval_weighted_parser(alpaca):
    """alpaca_eval's weighted annotators read 2 - P(first) from the top log-probs (`logprob_parser`), then
    undo the switch with its `RandomSwitchTwoColumnsProcessor` (3 - x)."""
    parsers, processors, pd = alpaca["parsers"], alpaca["processors"], alpaca["pd"]
    tops = [
        {"1": -0.1, "2": -2.5, "x": -4.0},
        {"2": -0.3, "1": -1.4},
        {"1": -0.7},
        {"2": -0.01, "A": -5.0},
    ]
    expected = []
    for top in tops:
        content = [{"top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}]
        [value] = parsers.logprob_parser(
            {"logprobs": {"content": content}}, numerator_token="1", denominator_tokens=["1", "2"],
            is_binarize=False,
        )  # fmt: skip
        expected.append(value)
    frame = pd.DataFrame(
        {"instruction": [f"item {i}" for i in range(4)], "output_1": ["r"] * 4, "output_2": ["m"] * 4}
    )
    switch = processors.RandomSwitchTwoColumnsProcessor(  # as alpaca_eval's PairwiseAnnotator sets it up
        two_columns_to_switch=["output_1", "output_2"],
        fn_replace_if_switch=_three_minus_preference,
        random_seed_columns=["instruction"],
        _switch_column="is_switched_outputs",
        seed=0,  # PairwiseAnnotator's, which it hands to the switch
    )
    shown = switch.preprocess(frame)
    assert 0 < shown["is_switched_outputs"].sum() < 4
    undone = switch.postprocess(shown.assign(preference=expected))["preference"].tolist()
    for i, top in enumerate(tops):
        switched = bool(shown["is_switched_outputs"][i])
        assert switched == ae.is_switched(f"item {i}")
        assert ae.preference_from_logprobs(top, switched).value == pytest.approx(undone[i], abs=1e-12)
        assert ae.preference_from_logprobs(top, False).value == pytest.approx(expected[i], abs=1e-12)


def _quiet_logging():
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet():
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)

    return quiet()
