"""The pure parts of the transformers backend, against values computed by hand: the decoding step
(`generation.decoding`), the text stream, and the judge's shared-prefix groups and merged distributions
(`generation.distributions`)."""

from __future__ import annotations

import math

import pytest
import torch

from rounding import tolerance
from zephyr.generation.decoding import (
    Sampler,
    TokenScore,
    cut_at_stop,
    next_tokens,
    sample_token,
    streamable,
    token_scores,
    worth_pruning,
)
from zephyr.generation.distributions import branch_groups, logaddexp, merge_by_text, shared_length
from zephyr.generation.streaming import TextStream

# ---------------------------------------------------------------------------------------------------------
# The decoding step

PAD = 99


def test_next_tokens_take_the_argmax_for_greedy_rows_and_pad_finished_ones():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 0.0, 4.9], [0.0, 0.0, 0.0, 9.0]])
    assert next_tokens(logits, [Sampler(), Sampler(), None], PAD) == [1, 0, PAD]
    # A tiny nucleus holds only the most likely token, whatever the temperature.
    nucleus = Sampler(temperature=5.0, top_p=1e-6, rng=torch.Generator().manual_seed(0))
    assert next_tokens(logits, [nucleus, nucleus, nucleus], PAD) == [1, 0, 3]


def test_a_sampled_row_draws_from_its_own_generator_whatever_the_batch():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.5, 0.4, 0.3, 0.2], [1.0, 1.0, 1.0, 1.0]])

    def row(seed: int) -> Sampler:
        return Sampler(temperature=1.5, top_p=0.9, rng=torch.Generator().manual_seed(seed))

    alone = [sample_token(logits[1], 1.5, 0.9, torch.Generator().manual_seed(s)) for s in range(20)]
    # The same row in the middle of a batch, beside a greedy row, a finished one and another sampled one.
    in_batch = [next_tokens(logits, [Sampler(), row(s), row(1000 + s)], PAD)[1] for s in range(20)]
    finished_first = [next_tokens(logits, [None, row(s), Sampler()], PAD)[1] for s in range(20)]
    assert in_batch == alone == finished_first
    assert len(set(alone)) > 1  # sampled, not argmax


def test_token_scores_are_the_models_log_probs_with_the_top_k():
    # softmax of log(1, 3, 4) is (1/8, 3/8, 4/8)
    logits = torch.log(torch.tensor([[1.0, 3.0, 4.0], [1.0, 3.0, 4.0], [4.0, 3.0, 1.0]]))
    first, second, third = token_scores(logits, [1, 0, 2], [2, None, 0])
    expected = torch.log(torch.tensor([1 / 8, 3 / 8, 4 / 8]))
    allowed = tolerance(expected)  # log-probs of the row's whole vocabulary (tests/rounding.py)
    assert isinstance(first, TokenScore) and first.logprob == pytest.approx(math.log(3 / 8), abs=allowed)
    assert [i for i, _ in first.top] == [2, 1]
    assert [v for _, v in first.top] == pytest.approx([math.log(1 / 2), math.log(3 / 8)], abs=allowed)
    assert second is None  # this row asked for no log-probs
    assert (
        third is not None and third.top == [] and third.logprob == pytest.approx(math.log(1 / 8), abs=allowed)
    )
    assert token_scores(logits, [0, 0, 0], [None, None, None]) == [None, None, None]


def test_worth_pruning_once_a_quarter_of_the_batch_has_finished():
    assert not worth_pruning(8, 8)
    assert not worth_pruning(7, 8)  # one of eight: fewer than a quarter
    assert worth_pruning(6, 8)
    assert worth_pruning(2, 3)  # small batches: any finished row
    assert worth_pruning(0, 1)


# ---------------------------------------------------------------------------------------------------------
# Stop strings and streaming

PIECES = {1: "he", 2: "llo", 3: " wo", 4: "rld", 5: "!"}


def decode(ids) -> str:
    return "".join(PIECES[i] for i in ids)


def test_cut_at_stop_keeps_the_tokens_wholly_before_the_stop_string():
    # "hello world!": "o w" starts at 4, inside "llo"; only "he" lies wholly before it.
    assert cut_at_stop([1, 2, 3, 4, 5], ["o w"], decode) == ("hell", 1)
    # The earliest of several stop strings wins; a stop string right after a token keeps that token.
    assert cut_at_stop([1, 2, 3, 4, 5], ["!", " wo"], decode) == ("hello", 2)
    assert cut_at_stop([1, 2, 3], ["he"], decode) == ("", 0)
    assert cut_at_stop([1, 2, 3], ["xyz"], decode) is None


def test_streamable_text_holds_back_a_possible_stop_string_and_half_characters():
    assert streamable("hello wor", ["world"]) == "hello "
    assert streamable("hello w", ["wx", "world"]) == "hello "
    assert streamable("caf\ufffd", []) == "caf"
    assert streamable("hello", ["xyz"]) == "hello"


def test_a_text_stream_sends_pieces_that_add_up_to_the_final_text():
    sent: list[str] = []
    stream = TextStream(sent.append, ["lo"])
    stream.update("he", final=False)
    stream.update("hel", final=False)  # "l" may start "lo": held back
    stream.update("help", final=False)
    stream.update("help\ufffd", final=False)  # half a character: held back
    stream.update("help!", final=True)
    assert sent == ["he", "lp", "!"]
    stream.update("help!", final=True)  # nothing new: nothing sent
    assert sent == ["he", "lp", "!"]


# ---------------------------------------------------------------------------------------------------------
# The judge's distributions


def test_prompts_sharing_a_start_become_one_group():
    rows = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]
    assert shared_length(rows) == 2
    assert branch_groups(rows) == [([1, 2], [[3, 4], [5], [3]])]
    # Equal rows still keep one token each to read the distribution after it.
    assert shared_length([[1, 2], [1, 2]]) == 1
    assert branch_groups([[1, 2], [1, 2]]) == [([1], [[2], [2]])]
    # Nothing shared: each row alone, its last token the continuation.
    assert branch_groups([[1, 2], [3, 4, 5]]) == [([1], [[2]]), ([3, 4], [[5]])]


def test_tokens_with_the_same_text_merge_and_probabilities_add():
    text = {5: "a", 6: "b", 7: "b", 8: "c"}
    pairs = [(6, -2.0), (5, -1.0), (7, -2.0), (5, -1.0), (8, -math.inf)]  # token 5 twice: counted once
    merged = merge_by_text(pairs, text.__getitem__)
    assert list(merged) == ["a", "b", "c"]  # most likely first
    assert merged["a"] == -1.0 and merged["c"] == -math.inf
    assert merged["b"] == pytest.approx(-2.0 + math.log(2), abs=4 * math.ulp(2.0))  # p = 2 e^-2
    assert logaddexp(-math.inf, -3.0) == -3.0
    assert logaddexp(0.0, 0.0) == pytest.approx(math.log(2), abs=math.ulp(1.0))
