"""Packed attention and target-only log-probs, against the plain full-logits computation per document."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from zephyr.data.packing import collate_packed, collate_padded
from zephyr.training import attention, forward
from zephyr.training.attention import (
    block_causal_mask,
    dense_causal_attention,
    packed_attention_mask,
    register_packed_attention,
    segment_ids_from_cu_seqlens,
    segment_ids_from_positions,
)
from zephyr.training.forward import sequence_logps, target_doc_ids, token_logps

VOCAB = 128
LENGTHS = (5, 9, 3, 7, 1)


def make_docs(seed: int = 0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        mask = [0] * min(2, n) + [1] * max(0, n - 2)  # two prompt tokens, the rest trained
        docs.append((ids, mask))
    return docs


def reference_logps(model, docs) -> torch.Tensor:
    """The plain way: each document alone, full logits, log_softmax, gather the trained next tokens."""
    out = []
    for ids, mask in docs:
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        out += [logp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1]]
    return torch.stack(out)


@pytest.fixture
def tiny(tiny_llama_factory):
    """A tiny random Llama with the given attention implementation (same seed, same weights)."""

    def build(impl: str = "zephyr_packed", seed: int = 0):
        register_packed_attention()
        model = tiny_llama_factory(VOCAB, seed=seed)
        model.set_attn_implementation(impl)
        return model

    return build


# --- packed attention ------------------------------------------------------------------------------------


def test_register_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert register_packed_attention() == register_packed_attention() == "zephyr_packed"
    assert AttentionInterface._global_mapping["zephyr_packed"] is attention.packed_attention_forward
    assert AttentionMaskInterface._global_mapping["zephyr_packed"] is attention.packed_attention_mask


def test_block_causal_mask_golden():
    # segments [0, 0, 1]: token 1 sees 0 and itself; token 2 starts a new document and sees only itself
    mask = block_causal_mask(torch.tensor([[0, 0, 1]]))
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_segment_ids_golden():
    assert segment_ids_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist() == [[1, 1, 1, 2, 2, 3]]
    assert segment_ids_from_cu_seqlens(torch.tensor([0, 3, 5, 6], dtype=torch.int32), 6).tolist() == [
        [0, 0, 0, 1, 1, 2]
    ]


def test_dense_attention_equals_per_segment_attention_with_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=g)
    k = torch.randn(1, 2, 12, 8, generator=g)  # two query heads per KV head
    v = torch.randn(1, 2, 12, 8, generator=g)
    cu = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    out = dense_causal_attention(q, k, v, cu, None, 0.0, None)  # [1, T, H, D]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        kk = k[:, :, a:b].repeat_interleave(2, dim=1)
        vv = v[:, :, a:b].repeat_interleave(2, dim=1)
        expected = F.scaled_dot_product_attention(q[:, :, a:b], kk, vv, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, a:b], expected, atol=1e-6, rtol=1e-6)


def test_mask_function_builds_nothing_for_packed_rows_and_sdpa_masks_for_padding():
    assert packed_attention_mask(batch_size=1, q_length=6, kv_length=6, attention_mask=None) is None
    padding = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    mask = packed_attention_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=padding)
    # row 1's third key is padding: causal & padding
    assert mask[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_boundaries_must_describe_the_packed_row():
    q = k = v = torch.zeros(1, 2, 6, 4)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)  # 5 tokens described, 6 in the row
    with pytest.raises(ValueError, match="packed row"):
        attention.packed_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_model_uses_the_packed_path_with_boundaries(monkeypatch, tiny):
    seen = []
    dense = attention.dense_causal_attention

    def spy(query, key, value, cu_seqlens, *args):
        seen.append(None if cu_seqlens is None else cu_seqlens.tolist())
        return dense(query, key, value, cu_seqlens, *args)

    monkeypatch.setattr(attention, "dense_causal_attention", spy)
    model = tiny()
    docs = make_docs()
    token_logps(model, collate_packed(docs))
    assert seen == [[0, 5, 14, 17, 24, 25]] * model.config.num_hidden_layers


def test_boundaries_from_position_ids_alone(tiny):
    model = tiny()
    docs = make_docs()
    batch = collate_packed(docs)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    for (ids, _), a in zip(docs, batch["cu_seqlens"][:-1].tolist(), strict=True):
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits[a : a + len(ids)], alone, atol=1e-5, rtol=1e-5)


def test_without_boundaries_documents_leak_and_the_comparison_notices(tiny):
    # Control for the exactness tests: the same packed row run as one causal sequence (positions 0..T-1,
    # no boundaries) lets later documents attend to earlier ones, and the log-probs move well past 1e-5.
    model = tiny()
    docs = make_docs()
    batch = collate_packed(docs)
    t = batch["input_ids"].shape[1]
    leaky = {
        "input_ids": batch["input_ids"],
        "position_ids": torch.arange(t)[None],
        "attention_mask": torch.ones(1, t, dtype=torch.long),
        "labels": batch["labels"],
    }
    assert (token_logps(model, leaky) - reference_logps(model, docs)).abs().max() > 1e-3


# --- token log-probs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["zephyr_packed", "sdpa", "eager"])
def test_packed_logps_equal_per_document_logps(impl, tiny):
    model = tiny(impl)
    docs = make_docs()
    with torch.no_grad():
        packed = token_logps(model, collate_packed(docs))
        expected = reference_logps(model, docs)
    assert packed.dtype == torch.float32
    assert packed.shape == (sum(n - 2 for n in LENGTHS if n > 2),)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)


def test_packed_logps_with_padding_segment(tiny):
    model = tiny()
    docs = make_docs()
    with torch.no_grad():
        padded_row = token_logps(model, collate_packed(docs, pad_to=40))
        torch.testing.assert_close(padded_row, reference_logps(model, docs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["zephyr_packed", "sdpa"])
def test_padded_logps_equal_per_document_logps(impl, tiny):
    model = tiny(impl)
    docs = make_docs(seed=1)
    with torch.no_grad():
        padded = token_logps(model, collate_padded(docs, pad_to=12))
        torch.testing.assert_close(padded, reference_logps(model, docs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
def test_chunked_head_equals_full_logits(chunk_size, tiny):
    model = tiny()
    docs = make_docs(seed=2)
    with torch.no_grad():
        chunked = token_logps(model, collate_packed(docs), chunk_size=chunk_size)
        torch.testing.assert_close(chunked, reference_logps(model, docs), atol=1e-5, rtol=0)


def test_lm_head_runs_on_target_rows_only_in_chunks(tiny, monkeypatch):
    model = tiny()
    docs = make_docs()
    own = []  # calls of the head module: the model's own forward
    model.lm_head.register_forward_hook(lambda m, args, out: own.append(args[0].shape[:-1].numel()))
    rows = []
    real = forward.head_projection

    def counting(causal_lm):
        project = real(causal_lm)
        return lambda h: rows.append(len(h)) or project(h)

    monkeypatch.setattr(forward, "head_projection", counting)
    with torch.no_grad():
        n = token_logps(model, collate_packed(docs), chunk_size=4).numel()
    # the model's own forward projects nothing; then ⌈16 / 4⌉ chunks of at most 4 rows, through the weight
    assert n == 16
    assert own == [0]
    assert rows == [4, 4, 4, 4]


def test_under_zero3_every_process_runs_the_head_as_often_as_the_busiest(tiny, monkeypatch):
    """ZeRO-3 gathers the head's partitioned weight at every call of the module, a collective each process
    must join equally often: here another process needs 6 chunks and this one 4, so it adds 2 empty ones,
    and its log-probs and gradients are unchanged."""
    from types import SimpleNamespace

    docs = make_docs()
    plain = tiny()
    expected = token_logps(plain, collate_packed(docs), chunk_size=4)
    expected.sum().backward()

    model = tiny()
    model.lm_head.weight.ds_id = 0  # how DeepSpeed marks a partitioned parameter
    calls = []
    model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[:-1].numel()))
    reduced = []

    def all_reduce(tensor, op):
        reduced.append((int(tensor), op))
        tensor.fill_(6)  # the other process's count

    max_op = torch.distributed.ReduceOp.MAX
    stub = SimpleNamespace(
        is_initialized=lambda: True, all_reduce=all_reduce, ReduceOp=SimpleNamespace(MAX=max_op)
    )
    monkeypatch.setattr(forward, "dist", stub)
    logps = token_logps(model, collate_packed(docs), chunk_size=4)
    assert reduced == [(4, max_op)]
    assert calls == [0, 4, 4, 4, 4, 0, 0]  # the model's own call, then 6 chunks through the module
    torch.testing.assert_close(logps, expected, atol=0, rtol=0)
    logps.sum().backward()
    assert calls[7:] == [0, 0, 4, 4, 4, 4]  # backward recomputes every chunk, last first, empty ones too
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0, msg=name)


def test_gradients_packed_equal_per_document(tiny):
    docs = make_docs(seed=3)
    weights = torch.linspace(-1.0, 2.0, sum(n - 2 for n in LENGTHS if n > 2))

    packed_model = tiny(seed=7)
    (token_logps(packed_model, collate_packed(docs), chunk_size=3) * weights).sum().backward()
    plain_model = tiny("sdpa", seed=7)
    (reference_logps(plain_model, docs) * weights).sum().backward()

    for (name, p), q in zip(packed_model.named_parameters(), plain_model.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_no_grad_and_empty_targets(tiny):
    model = tiny()
    docs = make_docs()
    with torch.no_grad():
        assert not token_logps(model, collate_packed(docs)).requires_grad
    untrained = [(ids, [0] * len(ids)) for ids, _ in docs]
    empty = token_logps(model, collate_packed(untrained))
    assert empty.shape == (0,)
    empty.sum().backward()  # an all-prompt micro-batch still backpropagates (zero gradients)
    assert model.lm_head.weight.grad is not None and not model.lm_head.weight.grad.any()


def test_sequence_logps_golden():
    # targets −1, −2 belong to segment 0; −3, −4, −5 to segment 2; segment 1 has none
    sums, counts = sequence_logps(
        torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]), torch.tensor([0, 0, 2, 2, 2]), 3
    )
    assert sums.tolist() == [-3.0, 0.0, -12.0]
    assert counts.tolist() == [2, 0, 3]
    assert counts.dtype == torch.long


def test_sequence_logps_of_a_packed_batch(tiny):
    model = tiny()
    docs = make_docs()
    batch = collate_packed(docs, pad_to=30)
    with torch.no_grad():
        sums, counts = sequence_logps(token_logps(model, batch), target_doc_ids(batch), len(docs))
        expected = reference_logps(model, docs)
    assert counts.tolist() == [3, 7, 1, 5, 0]
    bounds = [0, 3, 10, 11, 16, 16]
    torch.testing.assert_close(
        sums, torch.stack([expected[a:b].sum() for a, b in itertools.pairwise(bounds)]), atol=1e-5, rtol=0
    )


# --- CUDA varlen kernel ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_varlen_kernel_equals_dense_path():
    if attention._varlen_attn() is None:
        pytest.skip("torch.nn.attention.varlen is not available")
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 38, 200, 331], dtype=torch.int32, device="cuda")
    shape = (1, 8, 331, 64)
    q = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn((1, 2, 331, 64), generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn((1, 2, 331, 64), generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = attention.varlen_causal_attention(q, k, v, cu, 162, 0.125)
    grad_out = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    expected = dense_causal_attention(q32, k32, v32, cu, None, 0.0, 0.125)
    expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad_out.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_packed_model_on_cuda_equals_per_document(tiny):
    if attention._varlen_attn() is None:
        pytest.skip("torch.nn.attention.varlen is not available")
    model = tiny().to("cuda", torch.bfloat16)
    docs = make_docs(lengths=(50, 130, 7, 300))
    with torch.no_grad():
        packed = token_logps(model, collate_packed(docs)).cpu()
        plain = tiny("sdpa").to("cuda", torch.bfloat16)
        expected = torch.cat(
            [token_logps(plain, collate_padded([doc])).cpu() for doc in docs]
        )  # each document alone
    torch.testing.assert_close(packed, expected, atol=3e-2, rtol=0)
