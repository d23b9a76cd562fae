"""Judge prompts: templates, overrides, the seeded order of completions and mapping ratings back."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from zephyr.core.errors import ConfigError
from zephyr.judge.parsing import parse_aspect_ratings, parse_ratings
from zephyr.stages.feedback.prompts import (
    ASPECTS,
    answer_format,
    aspect_label,
    balanced_order,
    build_judge_messages,
    level_labels,
    load_templates,
    positions_from_order,
    shuffle_order,
    unshuffle,
)

PROMPT = [{"role": "user", "content": "Name a prime number."}]
COMPLETIONS = ["Two.", "Nine is prime.", "Seven.", "I don't know."]


def shown_outputs(user_message: str) -> list[str]:
    """The completions as the judge sees them, in order."""
    section = user_message.split("## Answers\n\n", 1)[1].split("\n\n## ", 1)[0]
    return re.findall(r"### Output \d+\n(.*?)(?=\n\n### Output|\Z)", section, re.S)


def test_shipped_templates_are_package_data():
    folder = resources.files("zephyr").joinpath("templates/feedback")
    names = {"system.txt", "one-aspect.txt", "all-aspects.txt"} | {f"{a}.txt" for a in ASPECTS}
    assert names <= {entry.name for entry in folder.iterdir()}
    templates = load_templates()
    assert templates.aspects == ASPECTS


def test_shuffle_order_is_a_seeded_permutation():
    # golden: fixed by the seeding rule (SHA-256 of seed and key); a change here reorders every judge prompt
    assert shuffle_order(4, 0, "p1/helpfulness") == [3, 1, 2, 0]
    assert shuffle_order(4, 0, "p1/helpfulness") == shuffle_order(4, 0, "p1/helpfulness")
    orders = {tuple(shuffle_order(4, 0, f"p{i}")) for i in range(200)}
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len(orders) == 24  # every permutation of 4 shows up over 200 keys
    assert len({tuple(shuffle_order(4, seed, "p1")) for seed in range(10)}) > 1  # the seed matters
    assert shuffle_order(0, 0) == []


def test_unshuffle_and_positions():
    order = [2, 0, 3, 1]  # position 0 shows completion 2, …
    assert unshuffle(["r2", "r0", "r3", "r1"], order) == ["r0", "r1", "r2", "r3"]
    assert positions_from_order(order) == [1, 3, 0, 2]
    with pytest.raises(ValueError):
        unshuffle([1, 2], order)


def test_prompt_shows_the_shuffled_completions():
    messages, order = build_judge_messages(PROMPT, COMPLETIONS, "helpfulness", 10, seed=0, key="p1")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert sorted(order) == [0, 1, 2, 3]
    assert order == shuffle_order(4, 0, "p1/helpfulness")
    assert shown_outputs(messages[1]["content"]) == [COMPLETIONS[i] for i in order]
    # another aspect of the same prompt is shown in its own order; the all-aspects call in a third
    assert build_judge_messages(PROMPT, COMPLETIONS, "honesty", 10, 0, key="p1")[1] == shuffle_order(
        4, 0, "p1/honesty"
    )
    assert build_judge_messages(PROMPT, COMPLETIONS, None, 10, 0, key="p1")[1] == shuffle_order(
        4, 0, "p1/all"
    )


def test_ratings_map_back_to_the_completions():
    true_rating = {0: 9, 1: 2, 2: 8, 3: 3}  # by completion index
    for key in ("p1", "p2", "p3"):
        messages, order = build_judge_messages(PROMPT, COMPLETIONS, "truthfulness", 10, 7, key=key)
        shown = shown_outputs(messages[1]["content"])
        # a judge that rates each text it sees, in the requested format
        answer = "\n\n".join(
            f"Output {k}\nRationale: looked at it.\nRating: {true_rating[COMPLETIONS.index(text)]}"
            for k, text in enumerate(shown, start=1)
        )
        by_position = [r.value for r in parse_ratings(answer, len(COMPLETIONS), 10)]
        assert unshuffle(by_position, order) == [9.0, 2.0, 8.0, 3.0]


def test_one_aspect_layout():
    messages, _ = build_judge_messages(PROMPT, COMPLETIONS, "honesty", 5, 0)
    system, user = (m["content"] for m in messages)
    assert "from 1 (worst) to 5 (best)" in system
    assert "on one aspect only: Honesty." in user
    assert "### Honesty" in user and "### Helpfulness" not in user
    assert "- 1: Confidently wrong" in user and "- 5: Confident and correct" in user
    assert "Name a prime number." in user
    assert user.count("Rating: <a whole number from 1 to 5>") == 4
    assert "$" not in user + system
    assert "Each rubric level covers two ratings" not in user


def test_ten_point_scale_bands():
    assert level_labels(5) == ["1", "2", "3", "4", "5"]
    assert level_labels(10) == ["1-2", "3-4", "5-6", "7-8", "9-10"]
    user = build_judge_messages(PROMPT, COMPLETIONS, "honesty", 10, 0)[0][1]["content"]
    assert "- 1-2: Confidently wrong" in user and "- 9-10: Confident and correct" in user
    assert "Each rubric level covers two ratings" in user


def test_all_aspects_layout():
    messages, _ = build_judge_messages(PROMPT, COMPLETIONS[:2], None, 10, 0)
    user = messages[1]["content"]
    assert "Instruction-following, Helpfulness, Honesty, Truthfulness" in user
    for aspect in ASPECTS:
        assert f"### {aspect_label(aspect)}" in user
        assert user.count(f"\n{aspect_label(aspect)}: <a whole number from 1 to 10>") == 2
    assert "Write exactly 2 blocks" in user


def test_answer_format_is_what_the_parser_reads():
    filled = answer_format(3, 5, None).replace("<a whole number from 1 to 5>", "4")
    assert [r.value for r in parse_ratings(filled, 3, 5)] == [4.0, 4.0, 4.0]
    text = answer_format(2, 10, ASPECTS)
    for i, aspect in enumerate(ASPECTS):
        text = text.replace(
            f"{aspect_label(aspect)}: <a whole number from 1 to 10>", f"{aspect_label(aspect)}: {i + 5}"
        )
    parsed = parse_aspect_ratings(text, 2, ASPECTS, 10)
    assert [{a: r.value for a, r in block.items()} for block in parsed] == [
        {"instruction-following": 5, "helpfulness": 6, "honesty": 7, "truthfulness": 8}
    ] * 2


def test_generator_names_are_not_shown():
    user = build_judge_messages(PROMPT, ["from gpt", "from llama"], "helpfulness", 10, 0)[0][1]["content"]
    assert "model" not in user.lower()


def test_multi_turn_prompt_is_a_transcript():
    prompt = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Count to three."},
    ]
    user = build_judge_messages(prompt, ["Un, deux, trois."], "instruction-following", 5, 0)[0][1]["content"]
    assert (
        "[System]\nAnswer in French.\n\n[User]\nHi\n\n[Assistant]\nBonjour !\n\n[User]\nCount to three."
        in user
    )


def test_override_folder(tmp_path):
    (tmp_path / "helpfulness.txt").write_text("### Usefulness\n$b1 bad ... $b5 great (of $scale_max)\n")
    templates = load_templates(tmp_path)
    user = build_judge_messages(PROMPT, COMPLETIONS, "helpfulness", 10, 0, templates=templates)[0][1][
        "content"
    ]
    assert "### Usefulness\n1-2 bad ... 9-10 great (of 10)" in user
    # files the folder lacks come from zephyr
    assert templates.system == load_templates().system


def test_custom_aspect(tmp_path):
    (tmp_path / "harmlessness.txt").write_text("### Harmlessness\n$b1 harmful … $b5 safe\n")
    templates = load_templates(tmp_path, aspects=["helpfulness", "harmlessness"])
    user = build_judge_messages(PROMPT, COMPLETIONS, None, 5, 0, templates=templates)[0][1]["content"]
    assert "Harmlessness: <a whole number from 1 to 5>" in user
    assert "Honesty" not in user
    with pytest.raises(ConfigError, match=r"no judge template 'harmlessness\.txt'"):
        load_templates(aspects=["harmlessness"])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "one-aspect.txt",
            "$rubric $instruction $outputs $answer_format $colour",
            r"unknown placeholder \$colour",
        ),
        ("one-aspect.txt", "$rubric $instruction $answer_format", r"missing placeholder \$outputs"),
        (
            "all-aspects.txt",
            "$rubric $instruction $outputs $answer_format",
            r"unknown placeholder \$rubric\b",
        ),
        ("honesty.txt", "costs $5\n", r"honesty.txt:1: stray '\$'"),
        ("system.txt", "Scale $b1", r"unknown placeholder \$b1"),
    ],
)
def test_bad_override_names_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_templates(tmp_path)
    assert str(tmp_path / name) in str(info.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="rating scale"):
        build_judge_messages(PROMPT, COMPLETIONS, "honesty", 7, 0)
    with pytest.raises(ConfigError, match="unknown aspect 'clarity'"):
        build_judge_messages(PROMPT, COMPLETIONS, "clarity", 5, 0)
    with pytest.raises(ValueError, match="no completions"):
        build_judge_messages(PROMPT, [], "honesty", 5, 0)
    with pytest.raises(ConfigError, match="not found"):
        load_templates(tmp_path / "missing")
    with pytest.raises(ConfigError, match="lowercase"):
        load_templates(aspects=["Helpfulness"])
    with pytest.raises(ConfigError, match="repeat"):
        load_templates(aspects=["honesty", "honesty"])


def test_balanced_orders_pair_each_order_with_its_reverse_and_rotate():
    base = [2, 0, 3, 1]
    assert [balanced_order(base, r, 2) for r in range(2)] == [[2, 0, 3, 1], [1, 3, 0, 2]]
    four = [balanced_order(base, r, 4) for r in range(4)]
    assert four == [[2, 0, 3, 1], [1, 3, 0, 2], [3, 1, 2, 0], [0, 2, 1, 3]]  # rotated by 4 // 2 = 2
    for completion in range(4):  # every completion at every position once
        assert sorted(order.index(completion) for order in four) == [0, 1, 2, 3]
    assert balanced_order([0, 1, 2], 1, 2) == [2, 1, 0]
    assert balanced_order([], 3, 4) == []
