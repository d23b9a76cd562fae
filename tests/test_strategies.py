"""The pure parts of dSFT data generation: seed records, prompts, refined-instruction parsing, turn draws."""

from __future__ import annotations

import pytest

from zephyr.stages.generate.strategies import (
    MAX_INSTRUCTION_CHARS,
    SIMULATOR_KICKOFF,
    Seed,
    check_seed,
    clean_user_turn,
    compose_prompt,
    dialogue_id,
    draw_turns,
    order_key,
    parse_refined_instruction,
    refine_request,
    sampling_seed,
    seed_from_record,
    user_simulator_system_prompt,
    user_simulator_view,
)

# ---------------------------------------------------------------------------------------------------------
# Seeds


def problems(record):
    return [(p.field, p.message) for p in check_seed(record)]


def test_valid_seeds_have_no_problems():
    assert problems({"id": "w1", "sector": "world", "text": "Why is the sky blue?"}) == []
    assert (
        problems({"id": "m1", "sector": "material", "text": "Summarise this.", "material": "A text."}) == []
    )


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ([1, 2], [("record", "must be an object, got array")]),
        ({"sector": "world", "text": "Q?"}, [("id", "missing")]),
        ({"id": "a", "sector": "world", "text": "  "}, [("text", "is empty")]),
        ({"id": 3, "sector": "world", "text": "Q?"}, [("id", "must be a string, got integer")]),
        (
            {"id": "a", "sector": "science", "text": "Q?"},
            [("sector", "unknown sector 'science' (expected world, writing, material)")],
        ),
        (
            {"id": "a", "sector": "material", "text": "Summarise."},
            [("material", "sector 'material' needs a non-empty string (missing)")],
        ),
        (
            {"id": "a", "sector": "world", "text": "Q?", "material": "x"},
            [("material", "only used by sector 'material' (sector is 'world')")],
        ),
        (
            {"id": "a", "sector": "material", "text": "Summarise.", "materials": "x"},
            [
                ("materials", "unknown key (expected id, sector, text, material)"),
                ("material", "sector 'material' needs a non-empty string (missing)"),
            ],
        ),
    ],
)
def test_seed_problems_name_the_field(record, expected):
    got = problems(record)
    assert [f for f, _ in got] == [f for f, _ in expected]
    for (_, message), (_, want) in zip(got, expected, strict=True):
        assert message.startswith(want)


def test_seed_from_record_strips_text():
    seed = seed_from_record(
        {"id": " m1 ", "sector": "material", "text": " Summarise. ", "material": "\nA.\n"}
    )
    assert seed == Seed("m1", "material", "Summarise.", "A.")


def test_dialogue_id_hashes_content_and_strategy_not_the_seed_id():
    a = Seed("a", "world", "Why is the sky blue?")
    renamed = Seed("b", "world", "Why is the sky blue?")
    assert dialogue_id(a, "ultrachat") == dialogue_id(renamed, "ultrachat")
    assert dialogue_id(a, "ultrachat") != dialogue_id(a, "self_instruct")
    assert dialogue_id(a, "ultrachat") != dialogue_id(
        Seed("a", "writing", "Why is the sky blue?"), "ultrachat"
    )
    pid = dialogue_id(a, "ultrachat")
    assert len(pid) == 64 and int(pid, 16) >= 0
    # Pinned: prompt_ids of existing outputs must not change between versions (resume relies on them).
    assert pid == dialogue_id(Seed("z", "world", "Why is the sky blue?", None), "ultrachat")
    # sha256 of {"material":null,"sector":"world","strategy":"ultrachat","text":"Why is the sky blue?"}
    assert pid == "4df5c2d7d90ffd480374b7953f38df2ffff321427bdd0519e863875929ba556f"


def test_compose_prompt_puts_the_material_after_the_instruction():
    assert compose_prompt("Why?", None) == "Why?"
    assert (
        compose_prompt("Summarise this.", "Line one.\nLine two.") == "Summarise this.\n\nLine one.\nLine two."
    )


# ---------------------------------------------------------------------------------------------------------
# Keyed draws


def test_turn_draws_are_fixed_by_seed_and_prompt_id():
    ids = [f"p{i}" for i in range(300)]
    first = [draw_turns(p, 42, 3, 7) for p in ids]
    again = [draw_turns(p, 42, 3, 7) for p in reversed(ids)][::-1]
    assert first == again  # independent of the order of the calls
    assert set(first) == {3, 4, 5, 6, 7}  # uniform over the whole range
    assert max(first.count(k) for k in range(3, 8)) < 90  # 60 expected each
    assert [draw_turns(p, 43, 3, 7) for p in ids] != first  # the seed matters
    assert {draw_turns(p, 42, 4, 4) for p in ids} == {4}


def test_turn_draws_are_pinned():
    # The draws of an interrupted run must equal those of the run that resumes it, on any machine.
    assert [draw_turns(f"p{i}", 42, 3, 7) for i in range(8)] == [4, 4, 3, 5, 6, 6, 7, 3]
    assert sampling_seed(42, "p", "answer-0") == 1142341181


def test_turn_draw_range_is_checked():
    with pytest.raises(ValueError, match="min_turns"):
        draw_turns("p", 1, 5, 3)
    with pytest.raises(ValueError):
        draw_turns("p", 1, 0, 3)


def test_sampling_seeds_and_order_keys_are_keyed():
    assert sampling_seed(1, "p", "answer-0") == sampling_seed(1, "p", "answer-0")
    assert sampling_seed(1, "p", "answer-0") != sampling_seed(1, "p", "answer-1")
    assert sampling_seed(1, "p", "answer-0") != sampling_seed(1, "q", "answer-0")
    assert 0 <= sampling_seed(7, "p", "x") < 2**31
    assert order_key(1, "p") != order_key(2, "p")


# ---------------------------------------------------------------------------------------------------------
# self_instruct prompts and parsing


def test_refine_request_golden_text():
    [message] = refine_request("Why is the sky blue?", " Because of Rayleigh scattering. ")
    assert message["role"] == "user"
    assert message["content"] == (
        "Below is an instruction that a user gave to an AI assistant, followed by the assistant's answer.\n"
        "\n"
        "Instruction:\n"
        "Why is the sky blue?\n"
        "\n"
        "Answer:\n"
        "Because of Rayleigh scattering.\n"
        "\n"
        "Write one new instruction on the same topic that asks for something more specific or more demanding "
        "than the instruction above, so that answering it well takes more knowledge, reasoning or care. "
        "The new instruction must make sense on its own, without the text above.\n"
        "\n"
        'Reply with the new instruction only, on a line that starts with "New instruction:".'
    )


def test_refine_request_with_material_shows_it_and_asks_to_refer_to_it():
    [message] = refine_request("Summarise this.", "Answer.", material="The text.")
    assert "Instruction:\nSummarise this.\n\nThe text.\n\nAnswer:\nAnswer.\n" in message["content"]
    assert (
        'The new instruction is about the same material, which will be given again after it: refer to it as "the '
        'text" and do not copy it.'
    ) in message["content"]
    assert "must make sense on its own" not in message["content"]


PREVIOUS = "Why is the sky blue?"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # the asked-for shape
        (
            "New instruction: Explain why the sky is red at sunset.",
            "Explain why the sky is red at sunset.",
        ),
        # markdown emphasis on the marker, quotes around the instruction
        (
            '**New instruction:** "Compare Rayleigh and Mie scattering."',
            "Compare Rayleigh and Mie scattering.",
        ),
        ("**New Instruction**: Compare the two.", "Compare the two."),
        # a preamble, the marker on its own line, commentary after the instruction
        (
            "Sure! Here is a harder one.\n\nNew instruction:\nDescribe how the colour of the sky depends on\n"
            "altitude.\n\nThis is harder because it needs physics.",
            "Describe how the colour of the sky depends on\naltitude.",
        ),
        (
            "### Refined instruction\n\nList three effects of dust on sky colour.",
            "List three effects of dust on sky colour.",
        ),
        # the prompt echoed back: the qualified marker wins over the plain "Instruction:"
        (
            "Instruction:\nWhy is the sky blue?\n\nNew instruction: Why is the sky blue on Mars?",
            "Why is the sky blue on Mars?",
        ),
        # the last of several qualified markers
        ("New instruction: A.\nNew instruction: Why is Mars's sky red?", "Why is Mars's sky red?"),
        # no marker: a bare one-paragraph answer is the instruction
        (
            "Explain the physics of a blue sky to a physics student.",
            "Explain the physics of a blue sky to a physics student.",
        ),
        (
            "Here is a more specific instruction:\n\n'Why is the sky darker at high altitude?'",
            "Why is the sky darker at high altitude?",
        ),
        ("\r\nNew instruction: Why do sunsets look red?\r\n", "Why do sunsets look red?"),
        ("Please compare the sky at noon and at dusk.", "Please compare the sky at noon and at dusk."),
        ("Is the sky blue on Mars?", "Is the sky blue on Mars?"),  # a question without a marker
        # quotes inside are kept when they are not one quotation
        ('New instruction: Compare "blue" and "azure".', 'Compare "blue" and "azure".'),
    ],
)
def test_parse_refined_instruction_shapes(answer, expected):
    assert parse_refined_instruction(answer, PREVIOUS) == expected


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   \n ",
        "New instruction:",  # a marker with nothing after it
        "New instruction: why is the  sky BLUE?",  # the previous instruction again
        "Instruction:\nWhy is the sky blue?",  # only an echo
        "The answer is fine.\n\nIt covers the main points.\n\nNothing to add.",  # no marker, several paragraphs
        "New instruction: " + "x" * (MAX_INSTRUCTION_CHARS + 1),
        '""',
        # no marker, and the paragraph is an answer about the topic, not a request
        "The sky is blue because air scatters short wavelengths more than long ones.",
        "This new instruction is about the same material, which will be given again after it.",
    ],
)
def test_parse_refined_instruction_fails_cleanly(answer):
    assert parse_refined_instruction(answer, PREVIOUS) is None


def test_a_truncated_answer_must_have_finished_its_instruction():
    # Cut by the token limit: an instruction running to the end of the answer may be cut short.
    assert parse_refined_instruction("New instruction: Explain why the sky", PREVIOUS, truncated=True) is None
    assert parse_refined_instruction("Explain why the sky is", PREVIOUS, truncated=True) is None
    complete = "New instruction: Explain why sunsets are red.\n\nThis asks for more because"
    assert parse_refined_instruction(complete, PREVIOUS, truncated=True) == "Explain why sunsets are red."
    assert (
        parse_refined_instruction("New instruction: Explain why the sky", PREVIOUS) == "Explain why the sky"
    )


# ---------------------------------------------------------------------------------------------------------
# ultrachat: the user simulator


def test_user_simulator_view_swaps_roles_after_a_kickoff():
    dialogue = [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Scattering."},
        {"role": "user", "content": "What scatters?"},
        {"role": "assistant", "content": "Air molecules."},
    ]
    view = user_simulator_view(dialogue, "SYSTEM")
    assert view == [
        {"role": "system", "content": "SYSTEM"},
        {"role": "user", "content": SIMULATOR_KICKOFF},
        {"role": "assistant", "content": "Why is the sky blue?"},
        {"role": "user", "content": "Scattering."},
        {"role": "assistant", "content": "What scatters?"},
        {"role": "user", "content": "Air molecules."},
    ]
    assert dialogue[0]["role"] == "user"  # the dialogue itself is untouched


def test_user_simulator_system_prompt_golden():
    assert user_simulator_system_prompt("world") == (
        "You are a curious human user talking with an AI assistant. In this conversation your own messages "
        "appear as the assistant's turns and the AI assistant's replies appear as the user's turns. Write your "
        "next message to the AI assistant: a follow-up question, a request for more detail or for a change, or "
        "a new related request, in one or a few sentences, in the first person. Write only your message; do "
        "not answer it yourself and do not write the AI assistant's part. Ask about something the assistant's "
        "reply mentioned, or go deeper into the topic."
    )
    assert user_simulator_system_prompt("writing").endswith("a new piece in another form or style.")
    assert user_simulator_system_prompt("material", custom="Be terse.") == "Be terse."


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("What scatters the light?", "What scatters the light?"),
        ("User: What scatters the light?", "What scatters the light?"),
        ("  **User:** What scatters the light?  ", "What scatters the light?"),
        ("human: why?", "why?"),
        ('"Can you say more about that?"', "Can you say more about that?"),
        ("User: Tell me more.\nAssistant: Sure, here is more.", "Tell me more."),
        ("Tell me more.\n\n**Assistant:** Sure.", "Tell me more."),
        ("Thanks!\nAI: You're welcome.", "Thanks!"),
        ("Why do AIs say: hello?", "Why do AIs say: hello?"),  # an inline word is not a role line
        ("User:", ""),
        ("Assistant: I will answer myself.", ""),
        ("", ""),
    ],
)
def test_clean_user_turn(raw, expected):
    assert clean_user_turn(raw) == expected
