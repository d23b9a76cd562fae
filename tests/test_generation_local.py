"""The transformers backend: batching, stopping, sampling, log-probs; model specs; the vLLM output mapping.

Fast tests use a tiny random Llama with SmolLM2's tokenizer (ChatML); the slow ones the real
SmolLM2-135M-Instruct asset.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_llama
from rounding import tolerance
from zephyr.core.errors import ZephyrError
from zephyr.data import chat
from zephyr.generation import Completion, Request, SamplingParams, make_generator, parse_spec
from zephyr.generation.local import LocalGenerator, first_stop, held_back, sample_token
from zephyr.generation.vllm_backend import completions_from_output


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


PROMPTS = [
    ask("Hi"),
    ask("What is the capital of France?"),
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
    ask("Tell me a long story about a dragon who lived in the mountains and collected old books."),
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    from zephyr.models import load as models

    return models.load_tokenizer("asset:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    # Larger weights than the default init: peaked attention makes the output depend on positions and
    # padding, so batching mistakes change the text instead of vanishing in near-uniform attention.
    model = make_tiny_llama(len(tokenizer), seed=3, initializer_range=0.5)
    return LocalGenerator(model, tokenizer, model_id="tiny", batch_size=3)


def forward_logprobs(generator: LocalGenerator, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = generator.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Batching


def test_batched_greedy_equals_one_at_a_time(tiny):
    params = SamplingParams(max_tokens=8)
    batched = tiny.generate(PROMPTS, params)
    alone = [tiny.generate([p], params)[0] for p in PROMPTS]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.finish_reason == "length" and c.completion_tokens == 8 for c in batched)
    assert [c.prompt_tokens for c in batched] == [len(chat.render_prompt(tiny.tokenizer, p)) for p in PROMPTS]


def test_rows_finishing_early_leave_the_batch_without_changing_the_others(tiny):
    # Different token limits per request: rows drop out (and the cache is pruned) at different steps.
    requests = [Request(p, SamplingParams(max_tokens=2 + 3 * i)) for i, p in enumerate(PROMPTS)]
    wide = LocalGenerator(tiny.model, tiny.tokenizer, batch_size=8)
    together = wide.generate_requests(requests)
    for request, [got] in zip(requests, together, strict=True):
        [alone] = wide.generate([request.messages], request.params)
        assert got.text == alone.text
        assert got.completion_tokens == request.params.max_tokens and got.finish_reason == "length"


def test_greedy_text_is_the_argmax_chain(tiny):
    [out] = tiny.generate([PROMPTS[1]], SamplingParams(max_tokens=4))
    chain = greedy_chain(tiny, PROMPTS[1], 4)
    assert out.text == tiny.tokenizer.decode(chain, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------
# Stopping


def greedy_chain(generator: LocalGenerator, conversation, steps: int) -> list[int]:
    ids = chat.render_prompt(generator.tokenizer, conversation)
    chain: list[int] = []
    for _ in range(steps):
        chain.append(int(forward_logprobs(generator, ids + chain).argmax()))
    return chain


def test_stops_at_a_stop_token_which_is_not_in_the_text(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=3)
    first, second = greedy_chain(LocalGenerator(model, tokenizer), PROMPTS[0], 2)
    # The model's generation config names extra EOS ids; the second greedy token becomes one.
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), second]
    stopping = LocalGenerator(model, tokenizer)
    [out] = stopping.generate([PROMPTS[0]], SamplingParams(max_tokens=3, logprobs=True))
    assert out.finish_reason == "stop"
    assert out.text == tokenizer.decode([first], skip_special_tokens=True)
    assert out.completion_tokens == 2 and len(out.logprobs) == 1
    assert stopping.stop_token_ids == {2, second}


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(tiny):
    [full] = tiny.generate([PROMPTS[3]], SamplingParams(max_tokens=10))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    expected = full.text[: full.text.find(stop)]
    deltas: list[str] = []
    [[out]] = tiny.generate_requests(
        [
            Request(
                PROMPTS[3],
                SamplingParams(max_tokens=10, stop=(stop, "never-there")),
                lambda k, d: deltas.append(d),
            )
        ]
    )
    assert out.text == expected and out.finish_reason == "stop"
    assert "".join(deltas) == expected and all(stop not in d for d in deltas)
    assert out.completion_tokens < 10


def test_streamed_deltas_add_up_to_the_text(tiny):
    deltas: list[tuple[int, str]] = []
    [choices] = tiny.generate_requests(
        [
            Request(
                PROMPTS[1],
                SamplingParams(max_tokens=6, temperature=1.0, seed=1, n=2),
                lambda k, d: deltas.append((k, d)),
            )
        ]
    )
    for k, completion in enumerate(choices):
        assert "".join(d for j, d in deltas if j == k) == completion.text
    assert len(deltas) > 2


def test_first_stop_and_held_back():
    assert first_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert first_stop("abc", ["x"]) is None
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello w", ["world", "wx"]) == 1
    assert held_back("hello", ["world"]) == 0
    assert held_back("ab", []) == 0


# ---------------------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1234)
    alone = tiny.generate([PROMPTS[1]], params)[0].text
    in_batch = tiny.generate(PROMPTS, params)[1].text
    assert alone == in_batch
    other_seed = tiny.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=1.0, seed=99))[0].text
    assert other_seed != alone


def test_the_kth_of_n_samples_uses_seed_plus_k(tiny):
    three = tiny.generate([PROMPTS[2]], SamplingParams(max_tokens=6, temperature=1.0, seed=40, n=3))
    singles = [
        tiny.generate([PROMPTS[2]], SamplingParams(max_tokens=6, temperature=1.0, seed=40 + k))[0]
        for k in range(3)
    ]
    assert [c.text for c in three] == [c.text for c in singles]
    assert len({c.text for c in three}) == 3


def test_unseeded_sampling_follows_torch_manual_seed(tiny):
    params = SamplingParams(max_tokens=6, temperature=1.0)
    torch.manual_seed(5)
    a = tiny.generate([PROMPTS[0]], params)[0].text
    torch.manual_seed(5)
    assert tiny.generate([PROMPTS[0]], params)[0].text == a


def test_a_tiny_nucleus_is_greedy(tiny):
    greedy = tiny.generate(PROMPTS[:2], SamplingParams(max_tokens=6))
    nucleus = tiny.generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=2.0, top_p=1e-6, seed=0))
    assert [c.text for c in nucleus] == [c.text for c in greedy]


def test_sample_token_respects_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    rng = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, 0.6, rng) for _ in range(300)} == {0, 1}
    assert {sample_token(logits, 1.0, 0.5, rng) for _ in range(50)} == {0}
    assert {sample_token(logits, 1.0, 1.0, rng) for _ in range(300)} == {0, 1, 2}


# ---------------------------------------------------------------------------------------------------------
# Log-probs


def test_logprobs_are_the_models_own(tiny):
    [out] = tiny.generate([PROMPTS[2]], SamplingParams(max_tokens=3, logprobs=True, top_logprobs=3))
    ids = chat.render_prompt(tiny.tokenizer, PROMPTS[2])
    chain = greedy_chain(tiny, PROMPTS[2], 3)
    assert len(out.logprobs) == out.completion_tokens == 3
    for step, entry in enumerate(out.logprobs):
        expected = forward_logprobs(tiny, ids + chain[:step])
        top = expected.topk(3)
        assert entry["token"] == tiny.tokenizer.decode([chain[step]])
        # decoding with a KV cache against a full forward; log-probs round at the size of the whole vocabulary's
        # (large logits: tests/rounding.py)
        allowed = tolerance(expected)
        assert entry["logprob"] == pytest.approx(float(expected[chain[step]]), abs=allowed)
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == pytest.approx(top.values.tolist(), abs=allowed)
        assert [t["token"] for t in entry["top_logprobs"]] == [
            tiny.tokenizer.decode([i]) for i in top.indices
        ]
    # Sampled rows report the model's log-probs too (before temperature), one entry per token.
    sampled = SamplingParams(max_tokens=4, temperature=0.7, seed=2, logprobs=True, top_logprobs=2)
    [hot] = tiny.generate([PROMPTS[2]], sampled)
    assert len(hot.logprobs) == 4 and all(len(e["top_logprobs"]) == 2 for e in hot.logprobs)
    assert hot.logprobs[0]["logprob"] <= hot.logprobs[0]["top_logprobs"][0]["logprob"] + 1e-6


def test_next_token_logprobs_match_a_forward_pass(tiny):
    results = tiny.next_token_logprobs(PROMPTS[:4], top_k=5, candidates=["7"], answer_prefix="Rating: ")
    for conv, result in zip(PROMPTS[:4], results, strict=True):
        text = chat.render_text(tiny.tokenizer, conv, add_generation_prompt=True) + "Rating: "
        expected = forward_logprobs(tiny, chat.encode_text(tiny.tokenizer, text))
        seven = tiny.tokenizer.convert_tokens_to_ids("7")
        chosen = [*expected.topk(5).indices.tolist(), seven]
        wanted: dict[str, float] = {}
        for i in dict.fromkeys(chosen):  # tokens that decode alike are merged: probabilities add up
            text = tiny.tokenizer.decode([i])
            wanted[text] = float(torch.logaddexp(torch.tensor(wanted.get(text, -torch.inf)), expected[i]))
        assert result == pytest.approx(wanted, abs=tolerance(expected))  # the whole vocabulary's size
        assert list(result.values()) == sorted(result.values(), reverse=True)
    with pytest.raises(ZephyrError, match="one token"):
        tiny.next_token_logprobs(PROMPTS[:1], candidates=["seventeen thousand"])


# ---------------------------------------------------------------------------------------------------------
# Failures stay with their request


def test_prefix_logprobs_run_the_shared_prompt_once_with_the_same_numbers(tiny):
    conversations = [
        [{"role": "user", "content": "Rate the answers one, two and three."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "?"},
        ],
    ]
    prefixes = ["Output 1\nRating: ", "Output 2\nRating: ", "Output 10\nRating: ", ""]
    branched = tiny.prefix_logprobs(conversations, prefixes, 5, candidates=["1", "2"])
    assert [len(b) for b in branched] == [4, 4]
    for conversation, tops in zip(conversations, branched, strict=True):
        for prefix, top in zip(prefixes, tops, strict=True):
            (alone,) = tiny.next_token_logprobs(
                [conversation], 5, candidates=["1", "2"], answer_prefix=prefix
            )
            assert list(top) == list(alone)  # the same tokens, in the same order
            text = chat.render_text(tiny.tokenizer, conversation, add_generation_prompt=True) + prefix
            # the size these round at: the whole vocabulary's log-probs (tests/rounding.py)
            vocabulary = forward_logprobs(tiny, chat.encode_text(tiny.tokenizer, text))
            assert [top[t] for t in alone] == pytest.approx(list(alone.values()), abs=tolerance(vocabulary))


def test_bad_requests_fail_alone(tokenizer):
    short = LocalGenerator(make_tiny_llama(len(tokenizer), max_position_embeddings=40), tokenizer)
    long_prompt = ask("word " * 60)
    out = short.generate([PROMPTS[0], long_prompt, [], PROMPTS[2]], SamplingParams(max_tokens=3))
    assert [c.finish_reason for c in out] == ["length", "error", "error", "length"]
    assert "context is 40 tokens" in out[1].error
    assert out[2].error and out[2].text == ""
    assert short.usage.requests == 4 and short.usage.failures == 2
    # A prompt that leaves less room than max_tokens ends with "length" at the context's end.
    [edge] = short.generate([PROMPTS[0]], SamplingParams(max_tokens=100))
    assert edge.finish_reason == "length" and edge.prompt_tokens + edge.completion_tokens == 40
    assert short.check_request(long_prompt, SamplingParams()) is not None
    assert short.check_request(PROMPTS[0], SamplingParams()) is None


# ---------------------------------------------------------------------------------------------------------
# Release


def test_close_releases_the_model_and_the_closed_generator_refuses_work(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=3)
    alive = weakref.ref(model)
    with LocalGenerator(model, tokenizer, model_id="tiny", batch_size=2) as generator:
        del model  # the generator holds the only reference now
        [out] = generator.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=1.0, seed=0))
        assert out.completion_tokens == 2
        generator.prefix_logprobs([PROMPTS[1]], ["A", "B"], 2)
    assert alive() is None  # no reference left anywhere: its memory is back
    with pytest.raises(ZephyrError, match="'tiny' was closed"):
        generator.generate([PROMPTS[0]], SamplingParams(max_tokens=2))
    for use in (lambda: generator.next_token_logprobs([PROMPTS[0]]), lambda: generator.tokenizer):
        with pytest.raises(ZephyrError, match="closed"):
            use()
    generator.close()  # closing twice is fine


@pytest.mark.gpu
def test_close_gives_the_gpu_memory_back(tokenizer):
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    generator = LocalGenerator(make_tiny_llama(len(tokenizer)).to("cuda"), tokenizer)
    generator.generate(PROMPTS, SamplingParams(max_tokens=4))
    assert torch.cuda.memory_allocated() > allocated
    generator.close()
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() <= reserved  # the cache emptied: the blocks are the driver's again


# ---------------------------------------------------------------------------------------------------------
# Specs


def test_specs_pick_the_backend(tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "tiny"
    make_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generator = make_generator(str(folder), batch_size=2)
    assert isinstance(generator, LocalGenerator)
    assert generator.model_id == str(folder) and generator.batch_size == 2
    [out] = generator.generate([ask("Hi")], SamplingParams(max_tokens=2))
    assert out.completion_tokens == 2
    assert parse_spec(f"transformers:{folder}").backend == "transformers"
    assert parse_spec("asset:smollm2-135m-instruct").model == "asset:smollm2-135m-instruct"
    assert (parse_spec("vllm:org/model").backend, parse_spec("vllm:org/model").model) == ("vllm", "org/model")
    with pytest.raises(ZephyrError, match=r"unknown generation option.*temperature"):
        make_generator(str(folder), temperature=0.5)
    with pytest.raises(ZephyrError, match="unknown backend 'hf'"):
        make_generator("hf:org/model")
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # as if vllm were not installed
    with pytest.raises(ZephyrError, match=r"vllm.*extra"):
        make_generator("vllm:org/model")


def test_sampling_params_are_validated():
    assert SamplingParams(stop="\n").stop == ("\n",)
    for bad in (
        {"max_tokens": 0},
        {"top_p": 0.0},
        {"n": 0},
        {"top_logprobs": 2},
        {"temperature": -1},
        {"stop": [""]},
    ):
        with pytest.raises(ZephyrError):
            SamplingParams(**bad)


def test_vllm_outputs_become_completions():
    def lp(value, token):
        return SimpleNamespace(logprob=value, decoded_token=token)

    output = SimpleNamespace(
        prompt_token_ids=[1, 2, 3],
        outputs=[
            SimpleNamespace(index=1, text="b", token_ids=[9], logprobs=None, finish_reason="length"),
            SimpleNamespace(
                index=0,
                text="a",
                token_ids=[5, 2],  # 2 = end of turn
                logprobs=[{5: lp(-0.1, "a"), 6: lp(-2.5, "c")}, {2: lp(-0.01, "")}],
                finish_reason="stop",
            ),
        ],
    )
    params = SamplingParams(n=2, logprobs=True, top_logprobs=1)
    a, b = completions_from_output(output, params, stop_token_ids={2})
    assert (a.text, a.finish_reason, a.prompt_tokens, a.completion_tokens) == ("a", "stop", 3, 2)
    assert a.logprobs == [{"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1}]}]
    assert (b.finish_reason, b.logprobs) == ("length", None)
    aborted = SimpleNamespace(prompt_token_ids=[1], outputs=[SimpleNamespace(index=0, finish_reason="abort")])
    assert completions_from_output(aborted, SamplingParams())[0].finish_reason == "error"


def test_completion_records_round_trip():
    c = Completion("hi", "length", 3, 4, [{"token": "hi", "logprob": -1.0, "top_logprobs": []}])
    assert Completion.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        Completion.from_dict({"text": "x", "finish_reason": "maybe"})


# ---------------------------------------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="module")
def smollm():
    return LocalGenerator.from_spec("asset:smollm2-135m-instruct", batch_size=4)


@pytest.mark.slow
def test_smollm2_says_paris_and_stops_at_im_end(smollm):
    [out] = smollm.generate([ask("What is the capital of France?")], SamplingParams(max_tokens=32))
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and "<|im_end|>" not in out.text
    assert out.completion_tokens < 32


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_one_at_a_time(smollm):
    prompts = [ask("What is the capital of France?"), ask("What is 2+2?"), PROMPTS[2], PROMPTS[3]]
    params = SamplingParams(max_tokens=12)
    batched = smollm.generate(prompts, params)
    alone = [smollm.generate([p], params)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in alone]
