"""The scoring primitive (`zephyr.scoring.continuations`): batches planned by hand, and every continuation's
log-probs and next-token distribution against one plain forward per [prefix; continuation] (tiny random
Llama with GQA, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from rounding import tolerance
from zephyr.data.packing import collate_shared_prefix
from zephyr.scoring.continuations import group_tokens, longest_request, plan_batches, score_groups

VOCAB = 96

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_sizes_golden():
    group = ([1, 2, 3], [[4, 5], [6, 7, 8]])
    # scored, the row is [1 2 3 4 | 3 6 7]: 7 tokens (each answer's last token only predicted); alone,
    # [1 2 3 6 7] feeds 5
    assert group_tokens(group) == 7 == collate_shared_prefix([group], feed_last=False).input_ids.numel()
    assert longest_request(group) == 5


def test_collate_without_the_last_tokens_golden():
    batch = collate_shared_prefix([([1, 2, 3], [[4, 5], [6, 7, 8]]), ([9], [[10]])], feed_last=False)
    # [1 2 3 4] predicts 4, 5; [3 6 7] predicts 6, 7, 8; [9] predicts 10: the labels of the full rows
    x = -100
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 3, 6, 7, 9]]
    assert batch.labels.tolist() == [[x, x, 4, 5, 6, 7, 8, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0]]
    assert batch.cu_seqlens.tolist() == [0, 4, 7, 8] and batch.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2]]
    assert batch.shared.kv_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7]
    assert batch.shared.cu_seqlens_k.tolist() == [0, 4, 9, 10]


def test_plan_batches_by_hand():
    big = (list(range(10)), [[1, 2, 3]] * 4)  # 10 + 12 − 1 = 21 tokens; longest request 10 + 3 − 1 = 12
    small = (list(range(6)), [[1, 2]] * 6)  # 6 + 12 − 1 = 17 tokens; longest request 7
    groups = [big, small, big]
    # longest first (ties in input order): batch size 3 allows 3 × 12 = 36 tokens: 21 + 21 do not fit,
    # 21 + 17 neither, 17 alone
    assert plan_batches(groups, 3) == [[0], [2], [1]]
    assert plan_batches(groups, 4) == [[0, 2], [1]]  # 4 × 12 = 48: 21 + 21 fit, 17 more do not
    assert plan_batches(groups, 1) == [[0], [2], [1]]  # never more groups than the batch size
    assert plan_batches(groups, 10) == [[0, 2, 1]]
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(groups, 0)


def alone(model, prefix, continuation) -> tuple[float, torch.Tensor]:
    """[prefix; continuation] alone, full logits: the continuation's summed log-probs (float64) and the
    log-softmax after its last token."""
    ids = torch.tensor([list(prefix) + list(continuation)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    scored = logp[len(prefix) - 1 : -1].gather(-1, torch.tensor(continuation)[:, None])
    return float(scored.sum()), logp[-1].float()


def test_score_groups_equal_one_forward_per_continuation():
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    groups = [
        (ids(7), [ids(3), ids(1), ids(5)]),
        (ids(1), [ids(2)]),  # a one-token prefix, a single continuation
        (ids(12), [ids(4), ids(4)]),
        (ids(3), [ids(1), ids(6), ids(2), ids(2)]),
    ]
    model = make_tiny_llama(VOCAB, seed=2, initializer_range=0.3)  # transformers' SDPA attention
    model.train()
    scores = score_groups(model, groups, batch_size=2, next_token=True)
    assert model.training and model.config._attn_implementation == "sdpa"  # both given back
    n = sum(len(c) for _, c in groups)
    assert scores.sums.shape == scores.counts.shape == (n,) and scores.next_logps.shape == (n, VOCAB)
    assert scores.counts.tolist() == [len(c) for _, cs in groups for c in cs]
    model.eval()
    k = 0
    for prefix, continuations in groups:
        for continuation in continuations:
            total, after = alone(model, prefix, continuation)
            assert float(scores.sums[k]) == pytest.approx(total, abs=tolerance(total))
            # the size the log-softmax rounds at: the whole row (tests/rounding.py)
            torch.testing.assert_close(scores.next_logps[k], after, atol=tolerance(after), rtol=0)
            k += 1


def test_score_groups_without_next_token_rows_and_without_groups():
    model = make_tiny_llama(VOCAB)
    scores = score_groups(model, [([1, 2], [[3]])], batch_size=4)
    assert scores.next_logps is None and scores.counts.tolist() == [1]
    empty = score_groups(model, [], batch_size=4)
    assert empty.sums.shape == (0,) and empty.counts.dtype == torch.long
