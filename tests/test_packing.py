"""Best-fit-decreasing packing and the packed / padded collators: hand-made golden results."""

from __future__ import annotations

import random

import pytest
import torch

from zephyr.data.packing import collate_packed, collate_padded, pack_bfd, pack_bfd_arrays

# --- pack_bfd --------------------------------------------------------------------------------------------


def test_pack_bfd_golden():
    # lengths [5, 3, 4, 2, 6], capacity 8; placement order (longest first): 6 (#4), 5 (#0), 4 (#2), 3 (#1), 2 (#3)
    #   #4 → new bin 0 (room 2); #0 → no room ≥ 5 → bin 1 (room 3); #2 → no room ≥ 4 → bin 2 (room 4)
    #   #1 (3) → rooms 2, 3, 4: best fit is bin 1 (room 3 → 0)
    #   #3 (2) → rooms 2, 4: best fit is bin 0 (room 2 → 0)
    assert pack_bfd([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]


def test_pack_bfd_arrays_golden():
    import numpy as np

    # the golden case above as arrays: bins [4, 3], [0, 1], [2] flattened in bin order, and where each starts
    order, bounds = pack_bfd_arrays(np.array([5, 3, 4, 2, 6], dtype=np.int32), 8)
    assert order.tolist() == [4, 3, 0, 1, 2] and bounds.tolist() == [0, 2, 4, 5]
    assert order.dtype == bounds.dtype == np.int64
    order, bounds = pack_bfd_arrays(np.zeros(0, dtype=np.int64), 8)
    assert order.tolist() == [] and bounds.tolist() == [0]


def test_pack_bfd_is_best_fit_not_first_fit():
    # lengths [1, 3, 4, 6], capacity 8: #3 (6) → bin 0 (room 2); #2 (4) → bin 1 (room 4); #1 (3) → bin 1 (room 1)
    # #0 (1): rooms are bin 0: 2, bin 1: 1 → best fit bin 1 (first fit would take bin 0)
    assert pack_bfd([1, 3, 4, 6], 8) == [[3], [2, 1, 0]]


def test_pack_bfd_ties_are_broken_by_index():
    # equal lengths go lowest index first: 0 → bin 0, 1 → bin 0 (room 4 fits 4), 2 → bin 1, 3 → bin 1
    assert pack_bfd([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    # equal room: bins 0 and 1 both have room 2 after #0 and #1; #2 goes to bin 0, then #3 to bin 1
    assert pack_bfd([6, 6, 2, 2], 8) == [[0, 2], [1, 3]]


def test_pack_bfd_edge_cases():
    assert pack_bfd([], 8) == []
    assert pack_bfd([8, 8], 8) == [[0], [1]]  # exactly full bins
    assert pack_bfd([1] * 5, 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("lengths", [[3, 9, 2], [0, 2], [-1]])
def test_pack_bfd_rejects_documents_that_do_not_fit(lengths):
    with pytest.raises(ValueError, match=r"truncate or drop"):
        pack_bfd(lengths, 8)


def test_pack_bfd_100k_documents_valid():
    rng = random.Random(0)
    lengths = [rng.randint(1, 2048) for _ in range(100_000)]
    bins = pack_bfd(lengths, 2048)  # a corpus-sized input: an O(n²) packer would stall the fast suite
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every document exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= 2048
    assert sum(lengths) / (2048 * len(bins)) > 0.95  # BFD leaves little room on uniform lengths


def test_pack_bfd_bin_loads_match_trl():
    # Tie-breaking may differ, but BFD's sequence of room values does not depend on which of several equal
    # bins it picks, so the multiset of bin loads must equal TRL 1.16's.
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("trl")
    from trl.data_utils import _pack_bfd

    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(3000)]
    table = pa.table({"input_ids": [[7] * n for n in lengths]})
    packed = _pack_bfd(table, 512)
    trl_loads = sorted(sum(seq) for seq in packed["seq_lengths"].to_pylist())
    ours = sorted(sum(lengths[i] for i in b) for b in pack_bfd(lengths, 512))
    assert ours == trl_loads


# --- collation -------------------------------------------------------------------------------------------

DOC_A = ([10, 11, 12, 13], [0, 0, 1, 1])  # 2 prompt tokens, 2 answer tokens
DOC_B = ([20, 21, 22], [0, 1, 1])


def test_collate_packed_golden():
    batch = collate_packed([DOC_A, DOC_B])
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # labels[t] = input_ids[t+1] if token t+1 is trained and in the same document:
    #   A: t0 → 11 untrained; t1 → 12; t2 → 13; t3 is A's last token → −100 (never predicts B's 20)
    #   B: t0 → 21; t1 → 22; t2 last → −100
    assert batch.labels.tolist() == [[-100, 12, 13, -100, 21, 22, -100]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 4, 7]
    assert batch.max_seqlen == 4
    assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.long


def test_collate_packed_padding_is_its_own_segment():
    batch = collate_packed([DOC_A, DOC_B], pad_to=10, pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert batch.labels.tolist() == [[-100, 12, 13, -100, 21, 22, -100, -100, -100, -100]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1, -1, -1]]
    assert batch.cu_seqlens.tolist() == [0, 4, 7, 10]
    assert batch.max_seqlen == 4
    assert collate_packed([DOC_A, DOC_B], pad_to=7).cu_seqlens.tolist() == [0, 4, 7]  # nothing to pad


def test_collate_packed_never_targets_across_boundaries():
    rng = random.Random(2)
    docs = []
    for _ in range(20):
        n = rng.randint(1, 12)
        docs.append(([rng.randint(1, 99) for _ in range(n)], [1] * n))  # everything trained
    batch = collate_packed(docs)
    labels, ids = batch.labels[0], batch.input_ids[0]
    ends = batch.cu_seqlens[1:].long() - 1
    assert (labels[ends] == -100).all()
    inside = torch.ones_like(labels, dtype=torch.bool)
    inside[ends] = False
    assert torch.equal(labels[inside], ids[1:][inside[:-1]])  # all other positions predict the next token


def test_collate_padded_golden():
    batch = collate_padded([DOC_A, DOC_B], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch.labels.tolist() == [[-100, 12, 13, -100], [21, 22, -100, -100]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0], [1, 1, 1, -1]]
    assert collate_padded([DOC_B], pad_to=5).labels.tolist() == [[21, 22, -100, -100, -100]]


@pytest.mark.parametrize(
    "docs,kwargs,message",
    [
        ([], {}, "no documents"),
        ([([1, 2], [1])], {}, "2 input ids but 1 loss-mask"),
        ([([], [])], {}, "document 0 is empty"),
        ([DOC_A, DOC_B], {"pad_to": 6}, "more than pad_to=6"),
    ],
)
def test_collate_packed_rejects_bad_input(docs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        collate_packed(docs, **kwargs)


def test_collate_padded_rejects_short_pad_to():
    with pytest.raises(ValueError, match="more than pad_to=3"):
        collate_padded([DOC_A], pad_to=3)


def test_batches_move_to_a_device_whole():
    from zephyr.data.packing import collate_shared_prefix

    # [1 2 3] and [2 4 5]: the second answer's keys are the prompt's first token and its own three
    batch = collate_shared_prefix([([1, 2], [[3], [4, 5]])])
    moved = batch.to("meta")
    assert moved.input_ids.device.type == moved.shared.kv_index.device.type == "meta"
    assert (moved.max_seqlen, moved.num_docs, moved.shared.max_seqlen_k) == (3, 2, 4)
    assert batch.input_ids.device.type == "cpu"  # a moved copy; the batch itself stays
    padded = collate_padded([DOC_A, DOC_B]).to("meta")
    assert padded.attention_mask.device.type == "meta" and padded.num_docs == 2
