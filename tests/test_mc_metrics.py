"""Multiple-choice metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from zephyr.stages.mc import metrics


def test_acc_picks_the_highest_loglikelihood():
    assert metrics.acc([-1.0, -2.0, -0.5, -3.0], 2) == 1.0
    assert metrics.acc([-1.0, -2.0, -0.5, -3.0], 0) == 0.0
    # Several gold indices: any of them counts (lm-eval's multiple_target).
    assert metrics.acc([-1.0, -2.0, -0.5, -3.0], [0, 2]) == 1.0
    assert metrics.acc([-1.0, -2.0, -0.5, -3.0], [0, 1]) == 0.0


def test_ties_go_to_the_first_index():
    assert metrics.argmax([-1.0, -1.0, -2.0]) == 0
    assert metrics.argmax([-3.0, -1.0, -1.0]) == 1
    assert metrics.acc([-1.0, -1.0], 1) == 0.0


def test_acc_norm_divides_by_the_characters_of_the_choice():
    # -4/8 = -0.5 beats -3/2 = -1.5: the longer choice wins once normalised, the shorter one without.
    lls, choices = [-4.0, -3.0], ["abcdefgh", "ab"]
    assert metrics.normalized_lls(lls, choices) == [-0.5, -1.5]
    assert metrics.acc(lls, 0) == 0.0
    assert metrics.acc_norm(lls, choices, 0) == 1.0


def test_acc_norm_does_not_count_the_leading_space():
    # len("abc") = 3, len("ab") = 2: -3/3 = -2/2 = -1, a tie -> index 0. Counting the delimiter's space
    # (4 and 3 characters) would give -0.75 < -0.667 and pick index 1.
    assert metrics.acc_norm([-3.0, -2.0], ["abc", "ab"], 0) == 1.0


def test_mc1_wants_the_first_gold_index():
    lls = [-2.0, -1.0, -3.0]
    assert metrics.mc1(lls, [1, 0]) == 1.0
    assert metrics.mc1(lls, [0, 1]) == 0.0  # acc would be 1 here
    assert metrics.acc(lls, [0, 1]) == 1.0
    assert metrics.mc1(lls, 1) == 1.0


def test_mc2_is_the_normalised_probability_of_the_true_choices():
    lls = [math.log(0.5), math.log(0.25), math.log(0.25)]
    assert metrics.mc2(lls, [0, 1]) == pytest.approx(0.75)
    assert metrics.mc2(lls, [2]) == pytest.approx(0.25)
    # Unnormalised probabilities: 0.2, 0.1, 0.1 -> 0.2 / 0.4.
    assert metrics.mc2([math.log(0.2), math.log(0.1), math.log(0.1)], [0]) == pytest.approx(0.5)


def test_mc2_stays_finite_when_every_probability_underflows():
    lls = [math.log(0.5) - 2000, math.log(0.25) - 2000, math.log(0.25) - 2000]
    assert metrics.mc2(lls, [0, 1]) == pytest.approx(0.75)


def test_item_metrics_adds_mc1_and_mc2_for_truthful_items():
    lls, choices = [-1.0, -2.0], ["a", "b"]
    assert metrics.item_metrics(lls, choices, 0, truthful=False) == {"acc": 1.0, "acc_norm": 1.0}
    full = metrics.item_metrics(lls, choices, [1], truthful=True)
    assert full["acc"] == 0.0 and full["mc1"] == 0.0
    assert full["mc2"] == pytest.approx(math.exp(-2) / (math.exp(-1) + math.exp(-2)))


def test_mean_and_stderr():
    # mean 0.75; sample variance ((0.25^2) * 3 + 0.75^2) / 3 = 0.25; stderr sqrt(0.25) / sqrt(4) = 0.25.
    assert metrics.mean([1, 0, 1, 1]) == 0.75
    assert metrics.mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    assert metrics.mean_stderr([1]) is None
    assert metrics.mean_stderr([0.5, 0.5]) == 0.0


def test_unweighted_mean_of_groups():
    assert metrics.unweighted_mean_stderr([0.3, 0.4]) == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2
    assert metrics.unweighted_mean_stderr([0.3, None]) is None
    groups = {
        "a": {"acc": 1.0, "acc_stderr": 0.3},
        "b": {"acc": 0.5, "acc_stderr": 0.4},
    }
    summary = metrics.summarize_groups(groups, ["acc"])
    assert summary == {"acc": 0.75, "acc_stderr": pytest.approx(0.25)}


def test_summarize_reports_mean_and_stderr_per_metric():
    items = [{"acc": 1.0, "acc_norm": 0.0}, {"acc": 0.0, "acc_norm": 0.0}]
    summary = metrics.summarize(items, ["acc", "acc_norm"])
    # acc: mean 0.5, sample sd sqrt(0.5) -> stderr sqrt(0.5) / sqrt(2) = 0.5.
    assert summary == {"acc": 0.5, "acc_stderr": pytest.approx(0.5), "acc_norm": 0.0, "acc_norm_stderr": 0.0}


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 choices"):
        metrics.normalized_lls([-1.0, -2.0], ["a", "b", "c"])
