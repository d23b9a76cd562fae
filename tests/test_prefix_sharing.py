"""DPO prefix sharing: each pair's prompt runs once, the rejected answer's queries attending to the prompt's
keys of the chosen side. Golden rows and masks, then exactness against the unshared rows and against full
logits per sequence (tiny random Llama with GQA, fp32, CPU), gradients, the DPO task at step 0, the
reference pass, and the CUDA varlen kernel against the dense path (`gpu`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from rounding import BUG_FACTOR, preference_tolerance, tolerance
from varlen_fake import FakeVarlen, use_fake_kernel
from zephyr.data.packing import SharedKeys, collate_shared_prefix
from zephyr.scoring import attention
from zephyr.scoring.attention import (
    Segments,
    dense_block_attention,
    register_packed_attention,
    segment_blocks,
)
from zephyr.training.logps import compute_logps, pack_pairs, pair_logps
from zephyr.training.pairs import tokenize_pairs

PAIRS_FILE = "recipes/data/tiny_pairs.jsonl"
# single-turn prompts of several lengths, and multi-turn ones (lines 37-48 of the file are multi-turn)
LINES = [0, 1, 6, 18, 36, 37, 40, 47]
LN2 = math.log(2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(smollm_tokenizer):
    lines = Path(PAIRS_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(lines[i]) for i in LINES]
    out, _ = tokenize_pairs(smollm_tokenizer, records, max_length=None, max_prompt_length=None)
    assert len({len(p.prompt_ids) for p in out}) > 4  # prompts of different lengths
    assert any(len(r["chosen"]) > 2 for r in records)  # multi-turn prompts among them
    return out


@pytest.fixture(scope="module")
def model(smollm_tokenizer):
    register_packed_attention()
    net = make_tiny_llama(len(smollm_tokenizer), seed=3)
    net.set_attn_implementation("zephyr_packed")
    return net


def naive_logps(net, prompt, answer) -> float:
    """Full logits of [prompt; answer] alone, sdpa attention, sum of the answer's log-probs."""
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        logits = net(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1 :].sum())


# --- rows and masks (golden) -----------------------------------------------------------------------------


def test_collate_shared_prefix_golden():
    batch = collate_shared_prefix([([1, 2, 3], [[4, 5], [6, 7, 8]]), ([9], [[10], [11, 12]])])
    # group 0: [1 2 3 4 5] then [3 6 7 8] (the prompt's last token repeated, positions continuing at 2);
    # group 1: [9 10] then [9 11 12]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 10, 9, 11, 12]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5, 0, 1, 0, 1, 2]]
    x = -100
    assert batch.labels.tolist() == [[x, x, 4, 5, x, 6, 7, 8, x, 10, x, 11, 12, x]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3]]
    assert batch.cu_seqlens.tolist() == [0, 5, 9, 11, 14]
    assert batch.num_docs == 4
    # keys: [1 2 3 4 5], [1 2 | 3 6 7 8], [9 10], [| 9 11 12]
    assert batch.shared.cu_seqlens_k.tolist() == [0, 5, 11, 13, 16]
    assert batch.shared.kv_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert (batch.max_seqlen, batch.shared.max_seqlen_k) == (5, 6)
    assert batch.cu_seqlens.dtype == batch.shared.cu_seqlens_k.dtype == torch.int32


def test_groups_of_one_answer_share_nothing():
    from zephyr.data.packing import collate_packed

    batch = collate_shared_prefix([([1, 2], [[3, 4]]), ([5], [[6]])])
    assert batch.shared is None
    packed = collate_packed([([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6], [0, 1])])
    for name in ("input_ids", "position_ids", "labels", "doc_ids", "cu_seqlens"):
        assert torch.equal(getattr(batch, name), getattr(packed, name)), name
    assert (batch.max_seqlen, batch.num_docs) == (packed.max_seqlen, packed.num_docs) == (4, 2)


@pytest.mark.parametrize(
    "groups",
    [[([], [[1]])], [([1], [])], [([1], [[2], []])], []],
    ids=["prefix", "none", "empty", "no groups"],
)
def test_collate_shared_prefix_refuses_empty_parts(groups):
    with pytest.raises(ValueError):
        collate_shared_prefix(groups)


def shared_segments(batch) -> Segments:
    return Segments(
        batch.cu_seqlens,
        batch.shared.cu_seqlens_k,
        batch.max_seqlen,
        batch.shared.max_seqlen_k,
        batch.shared.kv_index,
    )


def test_dense_blocks_of_a_shared_prefix_golden():
    # [1 2 3 4 5 | 3 6 7 8]: one block; the second answer's queries see the prompt's first two tokens (rows
    # 0, 1: its keys 0 and 1) and its own segment causally, never the first answer
    batch = collate_shared_prefix([([1, 2, 3], [[4, 5], [6, 7, 8]])])
    blocks = segment_blocks(shared_segments(batch), 9)
    assert blocks.index.tolist() == [list(range(9))] and blocks.slots.tolist() == list(range(9))
    assert blocks.mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 1],
    ]


def test_dense_blocks_with_a_window_golden():
    # window 2, counted among each segment's keys: a query sees its own key and the one before it; the
    # second answer's first query (key 2 of [1 2 | 3 6 7 8]) sees key 1, the prompt's second token (row 1)
    batch = collate_shared_prefix([([1, 2, 3], [[4, 5], [6, 7, 8]])])
    mask = segment_blocks(shared_segments(batch), 9, window=2).mask[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_dense_blocks_are_the_groups():
    # two groups: two blocks padded to the longer (9 and 6 rows); a prompt of one token shares no key, so
    # its answers are blocks of their own
    batch = collate_shared_prefix([([1, 2, 3], [[4, 5], [6, 7, 8]]), ([9, 10], [[11], [12, 13]])])
    blocks = segment_blocks(shared_segments(batch), 15)
    assert blocks.index[:, 0].tolist() == [0, 9] and blocks.mask.shape == (2, 1, 9, 9)
    alone = collate_shared_prefix([([1], [[2, 3], [4]])])
    assert segment_blocks(shared_segments(alone), 5).index.tolist() == [[0, 1, 2], [3, 4, 4]]


def test_dense_attention_of_a_shared_row_equals_attention_over_each_segments_keys_with_gqa():
    g = torch.Generator().manual_seed(0)
    batch = collate_shared_prefix([([1, 2, 3, 4], [[5, 6], [7, 8, 9]]), ([1, 2], [[3], [4, 5]])])
    t = batch.input_ids.shape[1]
    q = torch.randn(1, 4, t, 8, generator=g)
    k = torch.randn(1, 2, t, 8, generator=g)  # two query heads per KV head
    v = torch.randn(1, 2, t, 8, generator=g)
    seg = shared_segments(batch)
    out = dense_block_attention(q, k, v, seg, 0.0, None)
    cu_q, cu_k, index = seg.cu_q.tolist(), seg.cu_k.tolist(), seg.kv_index
    for s in range(len(cu_q) - 1):
        rows = index[cu_k[s] : cu_k[s + 1]]  # this segment's keys: the row positions it attends to
        kk, vv = (x[:, :, rows].repeat_interleave(2, dim=1) for x in (k, v))
        qq = q[:, :, cu_q[s] : cu_q[s + 1]]
        n_q, n_k = qq.shape[2], kk.shape[2]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)  # end-aligned causal
        expected = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed).transpose(1, 2)
        torch.testing.assert_close(out[:, cu_q[s] : cu_q[s + 1]], expected, atol=tolerance(expected), rtol=0)


def test_boundaries_must_describe_the_gathered_keys():
    q = k = v = torch.zeros(1, 2, 4, 4)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="shared_kv_index holds"):
        attention.packed_attention_forward(
            None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, shared_kv_index=torch.arange(5)
        )
    with pytest.raises(ValueError, match="without attention mask"):
        attention.packed_attention_forward(
            None, q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), shared_kv_index=torch.arange(4)
        )


# --- the model: shared = unshared -------------------------------------------------------------------------


def test_pair_logps_with_sharing_equal_the_unshared_rows_and_full_logits(model, pairs):
    with torch.no_grad():
        plain = pair_logps(model, pack_pairs(pairs))
        shared = pair_logps(model, pack_pairs(pairs, prefix_sharing=True))
    torch.testing.assert_close(shared.chosen, plain.chosen, atol=tolerance(plain.chosen), rtol=0)
    torch.testing.assert_close(shared.rejected, plain.rejected, atol=tolerance(plain.rejected), rtol=0)
    assert shared.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]
    assert shared.rejected_tokens.tolist() == [len(p.rejected_ids) for p in pairs]
    sdpa = make_tiny_llama(model.config.vocab_size, seed=3)  # same weights, transformers' own attention
    for i, pair in enumerate(pairs):
        for got, answer in ((shared.chosen[i], pair.chosen_ids), (shared.rejected[i], pair.rejected_ids)):
            want = naive_logps(sdpa, pair.prompt_ids, answer)
            assert float(got) == pytest.approx(want, abs=tolerance(want))


def test_sharing_runs_each_prompt_once_and_counts_unshared_tokens(pairs):
    plain, shared = pack_pairs(pairs), pack_pairs(pairs, prefix_sharing=True)
    saved = sum(len(p.prompt_ids) - 1 for p in pairs)  # the prompt's last token runs twice
    assert shared.rows.input_ids.numel() == plain.rows.input_ids.numel() - saved
    assert shared.num_tokens == plain.num_tokens == plain.rows.input_ids.numel()
    assert shared.num_pairs == plain.num_pairs == len(pairs)
    assert plain.rows.shared is None and shared.rows.shared is not None


def test_every_layer_takes_the_shared_path(model, pairs, monkeypatch):
    calls = []
    original = attention.dense_block_attention

    def spy(query, key, value, segments, *args, **kwargs):
        calls.append(int(segments.kv_index.numel()))
        return original(query, key, value, segments, *args, **kwargs)

    monkeypatch.setattr(attention, "dense_block_attention", spy)
    batch = pack_pairs(pairs[:2], prefix_sharing=True)
    with torch.no_grad():
        pair_logps(model, batch)
    assert calls == [batch.rows.shared.kv_index.numel()] * model.config.num_hidden_layers


def test_rejected_without_the_prompt_keys_differs(model, pairs):
    # Control: the same shared row whose rejected segments see only their own tokens (no prompt keys) gives
    # other rejected log-probs, by more than the tolerance of the comparisons here: they notice a mask that
    # loses the prompt (a random tiny model depends little on context, hence a modest margin: seen 6.3e-3 on
    # -130, 12 tolerances).
    pair = max(pairs, key=lambda p: len(p.prompt_ids))
    good = pack_pairs([pair], prefix_sharing=True)
    rows = good.rows
    own_keys = SharedKeys(rows.cu_seqlens.clone(), rows.max_seqlen, torch.arange(rows.input_ids.shape[1]))
    bad = dataclasses.replace(good, rows=dataclasses.replace(rows, shared=own_keys))
    with torch.no_grad():
        right, wrong = pair_logps(model, good), pair_logps(model, bad)
    assert float(wrong.chosen[0]) == pytest.approx(float(right.chosen[0]), abs=tolerance(right.chosen))
    assert abs(float(wrong.rejected[0]) - float(right.rejected[0])) > BUG_FACTOR * tolerance(right.rejected)


def test_a_model_with_other_attention_is_refused(pairs):
    net = make_tiny_llama(128)  # sdpa: it would ignore the key index and read the wrong keys
    batch = pack_pairs(pairs[:1], prefix_sharing=True)
    batch = dataclasses.replace(
        batch, rows=dataclasses.replace(batch.rows, input_ids=batch.rows.input_ids % 128)
    )
    with pytest.raises(ValueError, match="zephyr_packed"):
        pair_logps(net, batch)


def test_gradients_with_sharing_equal_the_unshared_ones(model, pairs):
    def grads(prefix_sharing: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = pair_logps(model, pack_pairs(pairs[:4], prefix_sharing=prefix_sharing))
        (out.chosen.sum() - 2 * out.rejected.sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for shared, plain in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(shared, plain, atol=tolerance(plain), rtol=0)
    model.zero_grad(set_to_none=True)


def test_reference_pass_with_sharing_equals_without(model, pairs):
    plain = compute_logps(model, pairs, batch_size=3)
    shared = compute_logps(model, pairs, batch_size=5, prefix_sharing=True)
    torch.testing.assert_close(shared.chosen, plain.chosen, atol=tolerance(plain.chosen), rtol=0)
    torch.testing.assert_close(shared.rejected, plain.rejected, atol=tolerance(plain.rejected), rtol=0)
    assert torch.equal(shared.chosen_tokens, plain.chosen_tokens)


def test_cache_key_names_sharing_only_when_on(pairs):
    from zephyr.stages.dpo.reference import CacheKey

    base = dict(weights="w", template="t", max_length=None, max_prompt_length=None, precision="no")
    default = CacheKey(**base, device_type="cpu")
    assert default.fingerprint(pairs) == CacheKey(
        **base, device_type="cpu", prefix_sharing=False
    ).fingerprint(pairs)
    assert default.fingerprint(pairs) != CacheKey(**base, device_type="cpu", prefix_sharing=True).fingerprint(
        pairs
    )


# --- the varlen path's plumbing, on the CPU ----------------------------------------------------------------


@pytest.fixture
def cpu_varlen(monkeypatch):
    """The varlen branch of "zephyr_packed" taken on the CPU in fp32, over a kernel of torch 2.11's
    conventions (`varlen_fake.FakeVarlen`: no GQA argument, end-aligned queries)."""
    use_fake_kernel(monkeypatch, attention, FakeVarlen())
    monkeypatch.setattr(attention, "varlen_dtype", lambda query: (query.dtype, "a fake kernel in fp32"))
    calls = []
    original = attention.varlen_causal_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("kv_index") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "varlen_causal_attention", counted)
    return calls


def test_varlen_path_gathers_the_prompt_keys_for_every_layer(model, pairs, cpu_varlen):
    # The zephyr side of the CUDA path (key gathering, head repeat, key boundaries) against the dense path;
    # the kernel's own end-aligned causal mask is checked on the device (the gpu tests below).
    with torch.no_grad():
        through_varlen = pair_logps(model, pack_pairs(pairs, prefix_sharing=True))
    assert cpu_varlen == [True] * model.config.num_hidden_layers
    with torch.no_grad():
        plain = pair_logps(model, pack_pairs(pairs))  # (its varlen calls gather nothing)
    assert cpu_varlen[model.config.num_hidden_layers :] == [False] * model.config.num_hidden_layers
    torch.testing.assert_close(through_varlen.chosen, plain.chosen, atol=tolerance(plain.chosen), rtol=0)
    torch.testing.assert_close(
        through_varlen.rejected, plain.rejected, atol=tolerance(plain.rejected), rtol=0
    )


def windowed_mistral(impl: str, window: int = 5):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        tie_word_embeddings=False,
    )
    net = MistralForCausalLM(config).float().eval()
    net.set_attn_implementation(impl)
    return net


@pytest.mark.parametrize("kernel", [False, True])
def test_shared_prefix_keeps_a_sliding_window(kernel, monkeypatch):
    # answers whose queries reach past a window of 5 into the shared prompt: each [prompt; answer] alone
    # through transformers' SDPA and its sliding-window mask against the shared row (dense or stand-in kernel)
    register_packed_attention()
    fake = use_fake_kernel(monkeypatch, attention, FakeVarlen()) if kernel else None
    if kernel:
        monkeypatch.setattr(attention, "varlen_dtype", lambda query: (query.dtype, "a fake kernel in fp32"))
    pairs = random_pairs(256, [(3, 6, 9), (8, 2, 4), (1, 7, 7), (12, 1, 3)])
    with torch.no_grad():
        shared = pair_logps(windowed_mistral("zephyr_packed"), pack_pairs(pairs, prefix_sharing=True))
    alone = windowed_mistral("sdpa")
    for i, p in enumerate(pairs):
        for got, answer in ((shared.chosen[i], p.chosen_ids), (shared.rejected[i], p.rejected_ids)):
            want = naive_logps(alone, p.prompt_ids, answer)
            assert float(got) == pytest.approx(want, abs=tolerance(want))
    if kernel:
        assert {c["window"] for c in fake.calls} == {(4, 0)}


# --- the DPO task ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_shared_model")
    make_tiny_llama(len(smollm_tokenizer)).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("reference", ["precomputed", "online"])
def test_dpo_step_zero_loss_is_ln2_with_sharing(model_dir, tmp_path, reference):
    from accelerate import Accelerator

    from zephyr.core.config import DPOConfig
    from zephyr.models.load import load_model
    from zephyr.stages.dpo.run import DPOTask

    lines = Path(PAIRS_FILE).read_text(encoding="utf-8").splitlines()
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines[:6] + lines[-4:]) + "\n", encoding="utf-8")
    cfg = DPOConfig(
        model=str(model_dir),
        train_data=str(data),
        per_device_batch_size=3,
        output_dir=str(tmp_path / "run"),
        precision="fp32",
        reference=reference,
    )
    cfg.prefix_sharing = True  # (set whether or not DPOConfig declares the field)
    task = DPOTask(cfg, cache_dir=tmp_path / "cache")
    assert task.prefix_sharing
    policy = load_model(str(model_dir), attn_implementation=task.attn_implementation).train()
    task.prepare(policy, Accelerator(cpu=True))
    examples = list(task.train_examples())[::-1]  # other groupings than the reference pass's
    for start in range(0, len(examples), 4):
        batch = task.collate(examples[start : start + 4])
        assert batch.rows.shared is not None
        assert task.tokens(batch) == sum(e.pair.num_tokens for e in examples[start : start + 4])
        out = task.loss(policy, batch)
        logps = [float(out.metric_sums[f"logps/{k}"]) / task.units(batch) for k in ("chosen", "rejected")]
        allowed = preference_tolerance(cfg.beta, *logps, *logps)  # policy and reference: other row shapes
        assert float(out.loss_sum.detach()) / task.units(batch) == pytest.approx(LN2, abs=allowed)
        assert float(out.metric_sums["logps/rejected"]) / task.units(batch) < -10  # real log-probs


# --- CUDA: the varlen kernel with gathered keys ----------------------------------------------------------


def _needs_varlen():
    if attention._varlen_attn() is None:
        pytest.skip("torch.nn.attention.varlen is not available")


@pytest.mark.gpu
def test_varlen_shared_attention_equals_dense_path():
    _needs_varlen()
    groups = [(list(range(37)), [list(range(90)), list(range(55))]), ([1], [[2], list(range(160))])]
    batch = collate_shared_prefix(groups)
    t = batch.input_ids.shape[1]
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(heads):
        return torch.randn(
            (1, heads, t, 64), generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )

    q, k, v = rand(8), rand(2), rand(2)
    seg = shared_segments(batch.to("cuda"))
    out = attention.varlen_causal_attention(
        q,
        k,
        v,
        seg.cu_q,
        seg.max_q,
        0.125,
        cu_seqlens_k=seg.cu_k,
        max_seqlen_k=seg.max_k,
        kv_index=seg.kv_index,
    )
    grad_out = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    expected = dense_block_attention(q32, k32, v32, seg, 0.0, 0.125)
    expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad_out.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def random_pairs(vocab: int, lengths, seed: int = 0):
    from zephyr.training.logps import TokenizedPair

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    return [TokenizedPair(str(i), ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate(lengths)]


@pytest.mark.gpu
def test_shared_varlen_pair_logps_equal_the_padded_path_in_bf16():
    _needs_varlen()
    from zephyr.data.packing import collate_padded
    from zephyr.scoring.forward import sequence_logps, target_doc_ids, token_logps

    register_packed_attention()
    vocab = 256
    pairs = random_pairs(vocab, [(1, 40, 7), (37, 90, 200), (300, 12, 64), (5, 1, 1), (128, 128, 129)])
    net = make_tiny_llama(vocab, seed=3).to("cuda", torch.bfloat16)
    net.set_attn_implementation("zephyr_packed")
    padded_net = make_tiny_llama(vocab, seed=3).to("cuda", torch.bfloat16)  # sdpa, one padded row each
    docs = []
    for p in pairs:
        for answer in (p.chosen_ids, p.rejected_ids):
            docs.append((list(p.prompt_ids) + list(answer), [0] * len(p.prompt_ids) + [1] * len(answer)))
    with torch.no_grad():
        shared = pair_logps(net, pack_pairs(pairs, prefix_sharing=True))
        padded = collate_padded(docs)
        sums, _ = sequence_logps(token_logps(padded_net, padded), target_doc_ids(padded), len(docs))
    sums = sums.view(-1, 2).cpu()
    torch.testing.assert_close(shared.chosen.cpu(), sums[:, 0], rtol=1e-2, atol=0)
    torch.testing.assert_close(shared.rejected.cpu(), sums[:, 1], rtol=1e-2, atol=0)


@pytest.mark.gpu
def test_shared_varlen_training_step_starts_at_ln2_in_bf16():
    _needs_varlen()
    from zephyr.training.losses import LossParams, PairLogps, get_preference_loss

    register_packed_attention()
    vocab = 256
    pairs = random_pairs(vocab, [(10, 40, 7), (37, 90, 200), (300, 12, 64)], seed=1)
    net = make_tiny_llama(vocab, seed=3).to("cuda", torch.bfloat16).train()
    net.set_attn_implementation("zephyr_packed")
    reference = compute_logps(
        net, pairs, batch_size=3, device="cuda", prefix_sharing=True
    )  # another row shape
    batch = pack_pairs(pairs[::-1], prefix_sharing=True)
    policy = pair_logps(net, batch)
    ref = reference.select([2, 1, 0])
    ref = PairLogps(
        ref.chosen.cuda().float(), ref.rejected.cuda().float(), ref.chosen_tokens, ref.rejected_tokens
    )
    out = get_preference_loss("sigmoid")(policy, ref, LossParams(0.1, 0.0, 1.0, 0.0))
    assert float(out.losses.detach().mean()) == pytest.approx(LN2, rel=1e-2)  # bf16: other row shapes
    out.losses.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
