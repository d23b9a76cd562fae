"""Chat rendering: templates byte for byte, BOS handling, assistant-only masks, the strict prefix check.

Expected texts and masked spans are written by hand from the template definitions (REFERENCE.md for
Zephyr, SmolLM2's own template for ChatML).
"""

from __future__ import annotations

import pytest

from zephyr.core.errors import DataError
from zephyr.data import chat
from zephyr.data.chat import TemplateError, render_conversation, render_prompt_answer
from zephyr.models.load import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "question1"},
    {"role": "assistant", "content": "answer1"},
    {"role": "user", "content": "question2"},
    {"role": "assistant", "content": "answer2"},
]

ZEPHYR_TEXT = (
    "<|system|>\nYou are terse.</s>\n"
    "<|user|>\nquestion1</s>\n"
    "<|assistant|>\nanswer1</s>\n"
    "<|user|>\nquestion2</s>\n"
    "<|assistant|>\nanswer2</s>\n"
)


@pytest.fixture(scope="module")
def zephyr_tok(mistral_tokenizer_dir):
    return load_tokenizer(str(mistral_tokenizer_dir))


@pytest.fixture(scope="module")
def smol_tok(smollm_dir):
    return load_tokenizer(str(smollm_dir))  # "auto": SmolLM2's own ChatML template


def trained_runs(tokenizer, rendered) -> list[str]:
    """The decoded text of every maximal run of trained tokens."""
    runs, current = [], []
    for token_id, trained in zip(rendered.input_ids, rendered.loss_mask, strict=True):
        if trained:
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# ---------------------------------------------------------------------------------------------------------
# Zephyr template on Mistral's tokenizer


def test_zephyr_template_text_is_byte_exact(zephyr_tok):
    assert zephyr_tok.apply_chat_template(CONVERSATION, tokenize=False) == ZEPHYR_TEXT
    prompt = zephyr_tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nYou are terse.</s>\n<|user|>\nquestion1</s>\n<|assistant|>\n"


def test_zephyr_ids_start_with_exactly_one_bos(zephyr_tok):
    rendered = render_conversation(zephyr_tok, CONVERSATION)
    assert rendered.input_ids[0] == 1
    assert rendered.input_ids.count(1) == 1
    assert len(rendered.input_ids) == len(rendered.loss_mask)


def test_zephyr_mask_covers_answers_and_their_eos(zephyr_tok):
    rendered = render_conversation(zephyr_tok, CONVERSATION)
    assert trained_runs(zephyr_tok, rendered) == ["answer1</s>", "answer2</s>"]
    trained = [t for t, m in zip(rendered.input_ids, rendered.loss_mask, strict=True) if m]
    # Mistral's pieces: "answer" "1" "</s>" and "answer" "2" "</s>".
    assert zephyr_tok.convert_ids_to_tokens(trained) == ["answer", "1", "</s>", "answer", "2", "</s>"]
    # The newline after the last </s> is template glue, not trained.
    assert zephyr_tok.convert_ids_to_tokens(rendered.input_ids[-2:]) == ["</s>", "<0x0A>"]
    assert rendered.loss_mask[-2:] == [1, 0]
    assert rendered.num_trained == 6


def test_zephyr_ids_equal_one_tokenization_of_the_text(zephyr_tok):
    rendered = render_conversation(zephyr_tok, CONVERSATION)
    assert rendered.input_ids == zephyr_tok(ZEPHYR_TEXT)["input_ids"]


def test_conversation_without_system_message(zephyr_tok):
    rendered = render_conversation(zephyr_tok, CONVERSATION[1:3])
    assert (
        zephyr_tok.decode(rendered.input_ids) == "<s> <|user|>\nquestion1</s>\n<|assistant|>\nanswer1</s>\n"
    )
    assert trained_runs(zephyr_tok, rendered) == ["answer1</s>"]


# ---------------------------------------------------------------------------------------------------------
# ChatML on SmolLM2's tokenizer


def test_smollm_auto_template_keeps_its_default_system_prompt(smol_tok):
    text = smol_tok.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nquestion1<|im_end|>\n"
        "<|im_start|>assistant\nanswer1<|im_end|>\n"
    )


def test_chatml_text_mask_and_no_bos(smollm_dir):
    tok = load_tokenizer(str(smollm_dir), chat_template="chatml")
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nquestion1<|im_end|>\n"
        "<|im_start|>assistant\nanswer1<|im_end|>\n"
        "<|im_start|>user\nquestion2<|im_end|>\n"
        "<|im_start|>assistant\nanswer2<|im_end|>\n"
    )
    rendered = render_conversation(tok, CONVERSATION)
    # SmolLM2 adds no BOS: the text's own <|im_start|> (id 1, the bos token) opens it, once.
    assert rendered.input_ids[:2] == [1, tok.convert_tokens_to_ids("system")]
    assert rendered.input_ids.count(1) == 5  # one <|im_start|> per message
    assert trained_runs(tok, rendered) == ["answer1<|im_end|>", "answer2<|im_end|>"]
    assert tok.convert_ids_to_tokens(rendered.input_ids[-2:]) == ["<|im_end|>", "Ċ"]
    assert rendered.loss_mask[-2:] == [1, 0]


def test_smollm_auto_mask(smol_tok):
    rendered = render_conversation(smol_tok, CONVERSATION[1:])
    assert trained_runs(smol_tok, rendered) == ["answer1<|im_end|>", "answer2<|im_end|>"]


def test_system_and_user_only_conversation_trains_nothing(zephyr_tok):
    rendered = render_conversation(zephyr_tok, CONVERSATION[:2])
    assert rendered.num_trained == 0


def test_answer_with_spaces_and_newlines_is_trained_verbatim(smol_tok):
    answer = " two  spaces\nand a newline\n"
    rendered = render_conversation(smol_tok, [CONVERSATION[1], {"role": "assistant", "content": answer}])
    assert trained_runs(smol_tok, rendered) == [answer + "<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------
# Prompt / answer (DPO)


@pytest.mark.parametrize("tok_name", ["zephyr_tok", "smol_tok"])
def test_prompt_answer_matches_the_conversation_render(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    prompt_ids, answer_ids = render_prompt_answer(tok, CONVERSATION[:4], "answer2")
    eot, eot_id = chat.end_of_turn(tok)
    assert tok.decode(answer_ids) == "answer2" + eot
    assert answer_ids[-1] == eot_id
    full = render_conversation(tok, CONVERSATION)
    # The same tokens, minus the newline the template writes after the end-of-turn token.
    assert prompt_ids + answer_ids == full.input_ids[:-1]
    assert full.loss_mask[len(prompt_ids) : len(prompt_ids) + len(answer_ids)] == [1] * len(answer_ids)


def test_multi_turn_prompt_keeps_earlier_answers_in_the_prompt(zephyr_tok):
    prompt_ids, answer_ids = render_prompt_answer(zephyr_tok, CONVERSATION[:4], "a longer second answer.")
    assert zephyr_tok.decode(prompt_ids) == "<s> " + ZEPHYR_TEXT.split("answer2")[0]
    assert zephyr_tok.decode(answer_ids) == "a longer second answer.</s>"
    assert prompt_ids.count(1) == 1


def test_single_turn_prompt(zephyr_tok):
    prompt_ids, answer_ids = render_prompt_answer(zephyr_tok, [{"role": "user", "content": "Hi"}], "Hello!")
    assert zephyr_tok.decode(prompt_ids) == "<s> <|user|>\nHi</s>\n<|assistant|>\n"
    assert zephyr_tok.convert_ids_to_tokens(answer_ids) == ["Hello", "!", "</s>"]


# A template whose generation prompt ends in a space that the answer's first word absorbs:
# textually a prefix, but "▁" + "Paris" in the prompt vs "▁Paris" in prompt + answer.
TRAILING_SPACE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# A template whose generation prompt is not the header the assistant turn is rendered with.
MISMATCHED_HEADER_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture
def broken_template(tmp_path, mistral_tokenizer_dir):
    def load(text: str):
        path = tmp_path / "broken.jinja"
        path.write_text(text, encoding="utf-8")
        return load_tokenizer(str(mistral_tokenizer_dir), chat_template=str(path))

    return load


def test_prompt_tokens_not_a_prefix_raise(broken_template):
    tok = broken_template(TRAILING_SPACE_TEMPLATE)
    prompt = [{"role": "user", "content": "Capital of France?"}]
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True).endswith("assistant: ")
    with pytest.raises(TemplateError, match="not a prefix of the prompt \\+ answer ids"):
        render_prompt_answer(tok, prompt, "Paris")


def test_prompt_text_not_a_prefix_raises(broken_template):
    tok = broken_template(MISMATCHED_HEADER_TEMPLATE)
    prompt = [{"role": "user", "content": "Capital of France?"}]
    with pytest.raises(TemplateError, match="not a textual prefix") as info:
        render_prompt_answer(tok, prompt, "Paris")
    assert "Capital of France?" in str(info.value)  # the offending example is named
    with pytest.raises(TemplateError, match="prefix-consistent at message 1"):
        render_conversation(tok, [*prompt, {"role": "assistant", "content": "Paris"}])


def test_template_without_end_of_turn_token_raises(broken_template):
    tok = broken_template("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    with pytest.raises(TemplateError, match="no special token of the tokenizer ends the turn"):
        render_conversation(tok, CONVERSATION)


def test_template_failure_becomes_template_error(zephyr_tok):
    with pytest.raises(TemplateError, match="knows the roles"):
        render_conversation(zephyr_tok, [{"role": "tool", "content": "x"}])


def test_content_holding_the_end_of_turn_token_is_refused(zephyr_tok):
    bad = [CONVERSATION[1], {"role": "assistant", "content": "close it with </s> like this"}]
    with pytest.raises(DataError, match=r"messages\[1\]\.content contains the end-of-turn token '</s>'"):
        render_conversation(zephyr_tok, bad)
    with pytest.raises(DataError, match="messages\\[1\\]"):
        render_prompt_answer(zephyr_tok, bad[:1], bad[1]["content"])


# ---------------------------------------------------------------------------------------------------------
# show_record


def test_show_record_marks_trained_spans(zephyr_tok):
    out = chat.show_record(zephyr_tok, {"prompt_id": "p1", "messages": CONVERSATION}, color=False)
    assert "# prompt_id: p1" in out
    assert "<|assistant|>\n[[answer1</s>]]\n<|user|>" in out
    assert "[[answer2</s>]]" in out
    assert out.count("[[") == 2
    n_tokens = len(render_conversation(zephyr_tok, CONVERSATION).input_ids)
    assert out.rstrip().endswith(f"({n_tokens} tokens, 6 trained)")


def test_show_record_pairs_and_color(smol_tok):
    prompt = [{"role": "user", "content": "Say hi"}]
    record = {
        "prompt": "Say hi",
        "chosen": [*prompt, {"role": "assistant", "content": "Hi!"}],
        "rejected": [*prompt, {"role": "assistant", "content": "No."}],
    }
    out = chat.show_record(smol_tok, record, color=True)
    assert "## chosen" in out and "## rejected" in out
    assert "\x1b[32mHi!<|im_end|>\x1b[0m" in out
    assert "\x1b[32mNo.<|im_end|>\x1b[0m" in out
    assert "[[" not in out


# ---------------------------------------------------------------------------------------------------------
# Masks from character spans, and conversations in one batch


def test_span_mask_by_hand():
    import numpy as np

    # a zero-width BOS, then tokens [0,3) [3,5) a zero-width token at 5, [5,9) [9,12); the spans overlap and
    # merge into [4,10): [3,5) and [9,12) overlap it partly, the zero-width token at 5 sits inside it
    offsets = np.array([(0, 0), (0, 3), (3, 5), (5, 5), (5, 9), (9, 12)])
    assert chat.span_mask(offsets, [(5, 10), (4, 6)]).tolist() == [0, 0, 1, 1, 1, 1]
    # a zero-width token at a span's start is inside it, a token ending at its start is not
    offsets = np.array([(0, 2), (2, 2), (2, 4), (4, 6)])
    assert chat.span_mask(offsets, [(2, 3)]).tolist() == [0, 1, 1, 0]
    assert chat.span_mask(offsets, []).tolist() == [0, 0, 0, 0]


def test_span_mask_equals_the_overlap_rule_token_by_token():
    import random

    import numpy as np

    def overlaps(start, end, spans):  # the rule as render_conversation states it, one token at a time
        if start == end:
            return any(s <= start < e for s, e in spans)
        return any(start < e and end > s for s, e in spans)

    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.randint(0, 40) for _ in range(rng.randint(0, 12)))
        offsets = [(a, b) for a, b in zip([0, *cuts], [*cuts, 40], strict=True)]
        spans = [tuple(sorted((rng.randint(0, 40), rng.randint(0, 40)))) for _ in range(rng.randint(0, 4))]
        spans = [(s, e) for s, e in spans if e > s]
        expected = [int(overlaps(a, b, spans)) for a, b in offsets]
        assert chat.span_mask(np.array(offsets).reshape(-1, 2), spans).tolist() == expected, (offsets, spans)


def test_a_batch_of_conversations_encodes_as_each_alone(zephyr_tok, smol_tok):
    conversations = [
        CONVERSATION,
        CONVERSATION[1:3],
        [{"role": "user", "content": "héllo 👋 "}, {"role": "assistant", "content": " ça va\n"}],
    ]
    for tokenizer in (zephyr_tok, smol_tok):
        eot, _ = chat.end_of_turn(tokenizer)
        batch = chat.encode_conversations(
            tokenizer, [chat.assistant_spans(tokenizer, c, eot) for c in conversations]
        )
        for (ids, mask), messages in zip(batch, conversations, strict=True):
            alone = render_conversation(tokenizer, messages)
            assert (ids.tolist(), mask.tolist()) == (alone.input_ids, alone.loss_mask)
