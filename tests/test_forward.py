"""Packed attention and target-only log-probs, against the plain full-logits computation per document."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from rounding import BUG_FACTOR, tolerance
from varlen_fake import FakeVarlen, use_fake_kernel
from zephyr.data.packing import PaddedBatch, collate_packed, collate_padded
from zephyr.scoring import attention, forward
from zephyr.scoring.attention import (
    Segments,
    block_causal_mask,
    dense_block_attention,
    packed_attention_mask,
    register_packed_attention,
    segment_ids_from_positions,
)
from zephyr.scoring.forward import sequence_logps, target_doc_ids, token_logps

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


def test_dense_blocks_of_packed_documents_golden():
    # documents of 3, 1 and 2 tokens: three blocks side by side, padded to 3 slots; causal inside each
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    blocks = attention.segment_blocks(Segments(cu, cu, 3, 3), 6)
    assert blocks.index.tolist() == [[0, 1, 2], [3, 4, 5], [4, 5, 5]]  # padding slots repeat a row
    assert blocks.slots.tolist() == [0, 1, 2, 3, 6, 7]
    causal = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    alone = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # one token, then two padding slots seeing only themselves
    pair = [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert blocks.mask[:, 0].int().tolist() == [causal, alone, pair]


def test_dense_attention_equals_per_segment_attention_with_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=g)
    k = torch.randn(1, 2, 12, 8, generator=g)  # two query heads per KV head
    v = torch.randn(1, 2, 12, 8, generator=g)
    cu = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    out = dense_block_attention(q, k, v, Segments(cu, cu, 6, 6), 0.0, None)  # [1, T, H, D]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        kk = k[:, :, a:b].repeat_interleave(2, dim=1)
        vv = v[:, :, a:b].repeat_interleave(2, dim=1)
        expected = F.scaled_dot_product_attention(q[:, :, a:b], kk, vv, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, a:b], expected, atol=tolerance(expected), rtol=0)


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
    dense = attention.dense_block_attention

    def spy(query, key, value, segments, *args, **kwargs):
        seen.append(segments.cu_q.tolist())
        return dense(query, key, value, segments, *args, **kwargs)

    monkeypatch.setattr(attention, "dense_block_attention", spy)
    model = tiny()
    docs = make_docs()
    token_logps(model, collate_packed(docs))
    assert seen == [[0, 5, 14, 17, 24, 25]] * model.config.num_hidden_layers


def test_boundaries_from_position_ids_alone(tiny):
    model = tiny()
    docs = make_docs()
    batch = collate_packed(docs)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
    for (ids, _), a in zip(docs, batch.cu_seqlens[:-1].tolist(), strict=True):
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits[a : a + len(ids)], alone, atol=tolerance(alone), rtol=0)


def test_without_boundaries_documents_leak_and_the_comparison_notices(tiny):
    # Control for the exactness tests: the same packed row run as one causal sequence (positions 0..T-1,
    # no boundaries) lets later documents attend to earlier ones: seen 0.14, 7,000 times the tolerance.
    model = tiny()
    docs = make_docs()
    batch = collate_packed(docs)
    t = batch.input_ids.shape[1]
    leaky = PaddedBatch(
        input_ids=batch.input_ids,
        attention_mask=torch.ones(1, t, dtype=torch.long),
        position_ids=torch.arange(t)[None],
        labels=batch.labels,
        doc_ids=torch.zeros(1, t, dtype=torch.long),
        num_docs=1,
    )
    expected = reference_logps(model, docs)
    assert (token_logps(model, leaky) - expected).abs().max() > BUG_FACTOR * tolerance(expected)


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
    torch.testing.assert_close(packed, expected, atol=tolerance(expected), rtol=0)


def test_packed_logps_with_padding_segment(tiny):
    model = tiny()
    docs = make_docs()
    with torch.no_grad():
        padded_row = token_logps(model, collate_packed(docs, pad_to=40))
        expected = reference_logps(model, docs)
        torch.testing.assert_close(padded_row, expected, atol=tolerance(expected), rtol=0)


@pytest.mark.parametrize("impl", ["zephyr_packed", "sdpa"])
def test_padded_logps_equal_per_document_logps(impl, tiny):
    model = tiny(impl)
    docs = make_docs(seed=1)
    with torch.no_grad():
        padded = token_logps(model, collate_padded(docs, pad_to=12))
        expected = reference_logps(model, docs)
        torch.testing.assert_close(padded, expected, atol=tolerance(expected), rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
def test_chunked_head_equals_full_logits(chunk_size, tiny):
    model = tiny()
    docs = make_docs(seed=2)
    with torch.no_grad():
        chunked = token_logps(model, collate_packed(docs), chunk_size=chunk_size)
        expected = reference_logps(model, docs)
        torch.testing.assert_close(chunked, expected, atol=tolerance(expected), rtol=0)


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
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)  # the same ops, plus exact zeros


def test_gradients_packed_equal_per_document(tiny):
    docs = make_docs(seed=3)
    weights = torch.linspace(-1.0, 2.0, sum(n - 2 for n in LENGTHS if n > 2))

    packed_model = tiny(seed=7)
    (token_logps(packed_model, collate_packed(docs), chunk_size=3) * weights).sum().backward()
    plain_model = tiny("sdpa", seed=7)
    (reference_logps(plain_model, docs) * weights).sum().backward()

    for (name, p), q in zip(packed_model.named_parameters(), plain_model.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=tolerance(q.grad), rtol=0, msg=name)


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
    expected_sums = torch.stack([expected[a:b].sum() for a, b in itertools.pairwise(bounds)])
    torch.testing.assert_close(sums, expected_sums, atol=tolerance(expected_sums), rtol=0)


# --- what the varlen kernel is given (a stand-in kernel on the CPU) ---------------------------------------


def test_under_autocast_fp32_weights_reach_the_kernel_in_bf16(tiny, monkeypatch):
    # fp32 weights under bf16 autocast (the default recipe): the rotary embedding returns fp32 cos/sin, so
    # query and key arrive in fp32 and value in bf16; the kernel takes half precision only.
    fake = use_fake_kernel(monkeypatch, attention, FakeVarlen(gqa="refuse"))
    model = tiny()
    docs = make_docs(lengths=(12, 30, 7))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            through_kernel = token_logps(model, collate_packed(docs))
        exact = reference_logps(model, docs)
    layers = model.config.num_hidden_layers
    assert [c["dtypes"] for c in fake.calls] == [(torch.bfloat16,) * 3] * layers
    assert [c["heads"] for c in fake.calls] == [(4, 4)] * layers  # this kernel refuses fewer KV heads
    assert attention.attention_paths()[0] == ("varlen", "float32 cast to bfloat16 under autocast")
    # bf16 activations: per-token log-probs near ln(128) ≈ 4.9 within one bf16 rounding at that size (0.04)
    torch.testing.assert_close(
        through_kernel, exact, atol=tolerance(exact, torch.bfloat16, roundings=1), rtol=0
    )


def test_without_autocast_fp32_takes_the_dense_path_and_says_why_once(tiny, monkeypatch, caplog):
    fake = use_fake_kernel(monkeypatch, attention, FakeVarlen())
    model = tiny()
    with torch.no_grad(), caplog.at_level("INFO", logger="zephyr.scoring.attention"):
        for _ in range(2):
            token_logps(model, collate_packed(make_docs()))
    assert fake.calls == []
    assert attention.attention_paths() == [("dense", "float32 without half-precision autocast")]
    said = [r.getMessage() for r in caplog.records if "zephyr_packed attention" in r.getMessage()]
    assert said == ["zephyr_packed attention on cpu: dense (float32 without half-precision autocast)"]


@pytest.mark.parametrize(
    ("behaviour", "native"), [("native", True), ("refuse", False), ("interleaved", False)]
)
def test_the_gqa_probe_takes_fewer_kv_heads_only_from_a_kernel_that_gets_them_right(
    behaviour, native, tiny, monkeypatch
):
    fake = use_fake_kernel(monkeypatch, attention, FakeVarlen(gqa=behaviour))
    assert attention.gqa_mode(torch.device("cpu")) == ("native" if native else "repeat")
    assert {"cpu": native} == attention._NATIVE_GQA  # probed once, then remembered
    fake.calls.clear()
    model = tiny().to(torch.bfloat16)
    docs = make_docs(lengths=(12, 30, 7))
    with torch.no_grad():
        got = token_logps(model, collate_packed(docs))
        expected = token_logps(tiny("sdpa").to(torch.bfloat16), collate_padded(docs))
    heads = [c["heads"] for c in fake.calls]
    assert heads == [(4, 2) if native else (4, 4)] * model.config.num_hidden_layers
    assert {"cpu": native} == attention._NATIVE_GQA  # probed once, at the first layer
    # bf16 model, the same math: per-token log-probs near 4.9 within one bf16 rounding at that size
    torch.testing.assert_close(got, expected, atol=tolerance(expected, torch.bfloat16, roundings=1), rtol=0)


def test_a_kernel_with_a_gqa_argument_gets_it_and_no_probe(tiny, monkeypatch):
    fake = use_fake_kernel(monkeypatch, attention, FakeVarlen(gqa="refuse"), gqa_argument=True)
    with torch.no_grad():
        token_logps(tiny().to(torch.bfloat16), collate_packed(make_docs()))
    assert {c["heads"] for c in fake.calls} == {(4, 2)}
    assert attention._NATIVE_GQA == {}


# --- sliding windows -------------------------------------------------------------------------------------


def test_windowed_block_causal_mask_golden():
    # window 2: a token sees itself and the one before it, within its document
    mask = block_causal_mask(torch.tensor([[0, 0, 0, 0, 1, 1]]), window=2)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]


def tiny_mistral(impl: str, window: int):
    from transformers import MistralConfig, MistralForCausalLM

    register_packed_attention()
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config).float().eval()
    model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("kernel", [False, True])
def test_packed_mistral_keeps_its_sliding_window(kernel, monkeypatch):
    # documents of 9 and 7 tokens under a window of 4: each alone through transformers' SDPA (its own
    # sliding-window mask) against the packed row, through the dense path or the stand-in kernel
    fake = use_fake_kernel(monkeypatch, attention, FakeVarlen()) if kernel else None
    if kernel:
        monkeypatch.setattr(attention, "varlen_dtype", lambda query: (query.dtype, "a fake kernel in fp32"))
    docs = make_docs(lengths=(5, 9, 3, 7, 1))
    with torch.no_grad():
        packed = token_logps(tiny_mistral("zephyr_packed", 4), collate_packed(docs))
        alone = reference_logps(tiny_mistral("sdpa", 4), docs)
        unwindowed = reference_logps(tiny_mistral("sdpa", 64), docs)
    assert (alone - unwindowed).abs().max() > BUG_FACTOR * tolerance(alone)  # the window matters here
    torch.testing.assert_close(packed, alone, atol=tolerance(alone), rtol=0)
    if kernel:
        assert {c["window"] for c in fake.calls} == {(3, 0)}


def test_a_window_no_document_outgrows_is_plain_causal_for_the_kernel(monkeypatch):
    fake = use_fake_kernel(monkeypatch, attention, FakeVarlen())
    monkeypatch.setattr(attention, "varlen_dtype", lambda query: (query.dtype, "a fake kernel in fp32"))
    with torch.no_grad():
        token_logps(tiny_mistral("zephyr_packed", 9), collate_packed(make_docs()))  # longest document: 9
    assert {c["window"] for c in fake.calls} == {(-1, 0)}


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
    expected = dense_block_attention(q32, k32, v32, Segments(cu, cu, 162, 162), 0.0, 0.125)
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


@pytest.mark.gpu
def test_varlen_kernel_keeps_a_sliding_window():
    if attention._varlen_attn() is None:
        pytest.skip("torch.nn.attention.varlen is not available")
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 38, 200, 331], dtype=torch.int32, device="cuda")
    q, k, v = (
        torch.randn((1, h, 331, 64), generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (8, 2, 2)
    )
    out = attention.varlen_causal_attention(q, k, v, cu, 162, 0.125, window=16)
    grad_out = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    segments = Segments(cu, cu, 162, 162)
    expected = dense_block_attention(q32, k32, v32, segments, 0.0, 0.125, window=16)
    unwindowed = dense_block_attention(q32, k32, v32, segments, 0.0, 0.125)
    assert (expected - unwindowed).abs().max() > 0.1  # the window changes the answer
    expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad_out.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_the_gqa_probe_answers_and_the_chosen_mode_equals_the_repeat():
    if attention._varlen_attn() is None:
        pytest.skip("torch.nn.attention.varlen is not available")
    mode = attention.gqa_mode(torch.device("cuda"))
    print(f"varlen kernel on {torch.cuda.get_device_name()}: KV heads {mode}")
    assert mode in ("enable_gqa", "native", "repeat")
    g = torch.Generator(device="cuda").manual_seed(1)
    cu = torch.tensor([0, 100, 356], dtype=torch.int32, device="cuda")
    q, k, v = (
        torch.randn((1, h, 356, 128), generator=g, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8)
    )
    chosen = attention.varlen_causal_attention(q, k, v, cu, 256, None)
    repeated = attention.varlen_causal_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), cu, 256, None
    )
    # the same math, summed in another order at most: one bf16 rounding at the outputs' size
    torch.testing.assert_close(
        chosen, repeated, atol=tolerance(repeated, torch.bfloat16, roundings=1), rtol=0
    )


@pytest.mark.gpu
def test_fp32_weights_under_autocast_take_the_varlen_kernel_on_cuda(tiny, monkeypatch):
    """The default recipe: fp32 master weights, bf16 autocast. The query leaves the rotary embedding in fp32;
    it must still reach the varlen kernel (cast to bf16), forward and backward."""
    if attention._varlen_attn() is None:
        pytest.skip("torch.nn.attention.varlen is not available")
    monkeypatch.setattr(attention, "_PATHS", {})
    model = tiny().to("cuda")
    docs = make_docs(lengths=(50, 130, 7, 300))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = token_logps(model, collate_packed(docs))
    assert attention.attention_paths() == [("varlen", "float32 cast to bfloat16 under autocast")]
    packed.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        plain = tiny("sdpa").to("cuda")
        expected = torch.cat([token_logps(plain, collate_padded([doc])) for doc in docs])  # fp32, alone
    # bf16 activations: per-token log-probs near ln(128) ≈ 4.9 within one bf16 rounding at that size
    limit = tolerance(expected, torch.bfloat16, roundings=1)
    torch.testing.assert_close(packed.detach(), expected, atol=limit, rtol=0)
