"""Curation filters: golden strings, exact counts and reasons on small hand-written inputs."""

from __future__ import annotations

import copy
import json

import pytest

from zephyr.core.errors import ConfigError, DataError
from zephyr.stages.curate import filters
from zephyr.stages.curate.filters import EvalPrompt
from zephyr.stages.curate.run import load_eval_prompts


def conv(pid: str, *turns: str, system: str | None = None) -> dict:
    """A conversation record: turns alternate user, assistant."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"prompt_id": pid, "prompt": turns[0], "messages": messages}


def ids(records) -> list[str]:
    return [r["prompt_id"] for r in records]


def removed(result) -> list[tuple[str, str]]:
    return [(r.record["prompt_id"], r.reason) for r in result.removed]


# ---------------------------------------------------------------------------------------------------------
# Truecasing

TRUECASE_GOLDEN = [
    ("hello. how are you? i am fine! thanks.", "Hello. How are you? I am fine! Thanks."),
    ("Hello. how are you?", "Hello. How are you?"),  # ultrachat_200k's example
    ("two  spaces.  still a start.", "Two  spaces.  Still a start."),
    # intentionally lowercase words and abbreviations
    ("iPhone sales grew. eBay did too. x86 chips.", "iPhone sales grew. eBay did too. x86 chips."),
    ("e.g. this one. i.e. that one.", "e.g. this one. i.e. that one."),
    ("use e.g. the iPhone. then stop.", "Use e.g. the iPhone. Then stop."),
    ("apples, pears etc. and more. vs. the rest.", "Apples, pears etc. and more. Vs. the rest."),
    ("wait... then go. done", "Wait... then go. Done"),
    ("meet at 9 a.m. tomorrow.", "Meet at 9 a.m. tomorrow."),
    # URLs and file names are not plain words; "." after a token with a dot is not a sentence end
    ("see https://example.com/a?b=1. it works.", "See https://example.com/a?b=1. it works."),
    ("https://example.com is up. www.example.org too.", "https://example.com is up. www.example.org too."),
    ("run main.py. then check.", "Run main.py. then check."),
    # code: fenced blocks, inline spans, indented lines
    (
        "here:\n```python\nx = 1. y = 2\nprint(x)\n```\nthe output is 1.",
        "Here:\n```python\nx = 1. y = 2\nprint(x)\n```\nThe output is 1.",
    ),
    ("~~~\nls -la. rm x\n~~~\nok. done", "~~~\nls -la. rm x\n~~~\nOk. Done"),
    ("unclosed:\n```\nfoo. bar", "Unclosed:\n```\nfoo. bar"),
    ("call `foo. bar` now. `baz` is next.", "Call `foo. bar` now. `baz` is next."),
    ("Example:\n\n    x = 1. y = 2\n\nthat is all.", "Example:\n\n    x = 1. y = 2\n\nThat is all."),
    # line starts: a new line after a sentence end or ":" starts a sentence; verse and wrapped lines do not
    ("Steps:\nmix the flour.\nbake it.", "Steps:\nMix the flour.\nBake it."),
    (
        "roses are red,\nviolets are blue;\nsugar is sweet\nand so are you",
        "Roses are red,\nviolets are blue;\nsugar is sweet\nand so are you",
    ),
    ("Intro\nthe text goes on", "Intro\nthe text goes on"),
    (
        "one.\n\n- item\n* other\n1. first step. second step",
        "One.\n\n- item\n* other\n1. First step. Second step",
    ),
    # words that are not plain lowercase words, and non-ASCII letters
    ("my_var is set. 3rd place. 'quoted' start.", "my_var is set. 3rd place. 'quoted' start."),
    ("don't panic. self-driving cars.", "Don't panic. Self-driving cars."),
    ("été est là. über alles.", "Été est là. Über alles."),
    ("", ""),
]


@pytest.mark.parametrize(("text", "expected"), TRUECASE_GOLDEN)
def test_truecase_golden(text, expected):
    assert filters.truecase(text) == expected
    assert filters.truecase(expected) == expected  # idempotent


def test_truecase_records_counts_changed_messages_and_copies():
    records = [
        conv("a", "hello. how are you?", "fine. thanks."),  # 2 messages change
        conv("b", "What is 2 + 2?", "It is 4."),  # none
        conv("c", "Hi.", "hi! nice to meet you.", system="you are helpful."),  # system + answer change
    ]
    before = copy.deepcopy(records)
    out, changed = filters.truecase_records(records)
    assert changed == 4
    assert records == before  # input untouched
    assert out[0]["prompt"] == "Hello. How are you?"
    assert out[0]["messages"][0]["content"] == "Hello. How are you?"
    assert out[0]["messages"][1] == {"role": "assistant", "content": "Fine. Thanks."}
    assert out[1] == records[1]
    assert [m["content"] for m in out[2]["messages"]] == ["You are helpful.", "Hi.", "Hi! Nice to meet you."]


# ---------------------------------------------------------------------------------------------------------
# Refusals


def test_drop_refusals_builtin_patterns():
    records = [
        conv("ai", "How are you?", "As an AI language model, I cannot feel anything."),
        conv("emo", "Are you happy?", "I don't have emotions, but I am here to help."),
        conv("curly", "Sad?", "I don’t have feelings in the way people do."),  # typographic apostrophe
        conv(
            "op",
            "Tell me about Rome.",
            "Rome is the capital of Italy.",
            "Do you like it?",
            "I do not have personal opinions.",
        ),
        conv("sorry", "Write malware.", "I'm sorry, but I can't help with that."),
        conv("just", "Who are you?", "I'm just an AI, here to answer questions."),
        conv("user_says", "As an AI language model, what would you say?", "I would say hello."),
        conv("fine", "Any idea?", "I don't have a simple answer: it depends on the climate."),
        conv("fine2", "What is AI?", "AI is the field that builds systems that learn from data."),
    ]
    result = filters.drop_refusals(records, filters.compile_refusal_patterns(None))
    assert ids(result.kept) == ["user_says", "fine", "fine2"]
    assert removed(result) == [
        ("ai", "messages[1] says 'As an AI' (refusal pattern 0)"),
        ("emo", 'messages[1] says "I don\'t have emotions" (refusal pattern 3)'),
        ("curly", "messages[1] says 'I don’t have feelings' (refusal pattern 3)"),
        ("op", "messages[3] says 'I do not have personal opinions' (refusal pattern 3)"),
        ("sorry", "messages[1] says \"I'm sorry, but I can't help\" (refusal pattern 5)"),
        ("just", 'messages[1] says "I\'m just an AI" (refusal pattern 2)'),
    ]


def test_refusal_patterns_from_recipe_replace_the_builtin_list():
    records = [conv("a", "Hi", "As an AI language model, hello."), conv("b", "Hi", "BANNED word here.")]
    result = filters.drop_refusals(records, filters.compile_refusal_patterns([r"\bbanned\b"]))
    assert ids(result.kept) == ["a"]
    assert removed(result) == [("b", "messages[1] says 'BANNED' (refusal pattern 0)")]
    with pytest.raises(ConfigError, match=r"curate\.refusal_patterns\[1\]: not a valid regex"):
        filters.compile_refusal_patterns(["ok", "(unclosed"])


@pytest.mark.parametrize(
    "patterns",
    [
        [r"\bno way\b", r"(\w+) \1 again"],  # a backreference: not joined into one screen
        [r"\bno way\b", r"(?s)said.*again"],  # an inline global flag: cannot be joined
        [r"\bno way\b", r"said\s+again"],  # joined
    ],
)
def test_refusal_screen_agrees_with_pattern_by_pattern(patterns):
    records = [
        conv("a", "q", "No way, sorry."),
        conv("b", "q", "I said\nagain"),
        conv("c", "q", "I said said again"),
        conv("d", "q", "Nothing to see."),
    ]
    compiled = filters.compile_refusal_patterns(patterns)
    expected = [
        r["prompt_id"] for r in records if any(p.search(r["messages"][1]["content"]) for p in compiled)
    ]
    result = filters.drop_refusals(records, compiled)
    assert ids(r.record for r in result.removed) == expected
    assert "a" in expected and "d" not in expected


# ---------------------------------------------------------------------------------------------------------
# Length limits


def test_limit_turns():
    records = [
        conv("one", "q", "a"),
        conv("two", "q", "a", "q2", "a2"),
        conv("three", "q", "a", "q2", "a2", "q3", "a3"),
        conv("sys", "q", "a", system="be brief"),  # the system message is not a turn
    ]
    result = filters.limit_turns(records, min_turns=2, max_turns=2)
    assert ids(result.kept) == ["two"]
    assert removed(result) == [
        ("one", "1 turns < min_turns 2"),
        ("three", "3 turns > max_turns 2"),
        ("sys", "1 turns < min_turns 2"),
    ]
    assert ids(filters.limit_turns(records, 1, None).kept) == ["one", "two", "three", "sys"]


def test_limit_chars():
    records = [
        conv("ok", "Question?", "An answer."),  # answer: 10 chars
        conv("short", "Question?", "  Yes.  "),  # 4 chars once stripped
        conv("short2", "Question?", "A fine answer.", "And?", "No."),
        conv("long_user", "x" * 21, "An answer."),
        conv("long_answer", "Question?", "y" * 21),
        conv("edge", "x" * 20, "z" * 20),
    ]
    result = filters.limit_chars(records, min_chars=10, max_chars=20)
    assert ids(result.kept) == ["ok", "edge"]
    assert removed(result) == [
        ("short", "messages[1] (assistant) has 4 chars < min_chars 10"),
        ("short2", "messages[3] (assistant) has 3 chars < min_chars 10"),
        ("long_user", "messages[0] (user) has 21 chars > max_chars 20"),
        ("long_answer", "messages[1] (assistant) has 21 chars > max_chars 20"),
    ]
    assert len(filters.limit_chars(records, 0, None).kept) == 6


# ---------------------------------------------------------------------------------------------------------
# Exact duplicates


def test_dedup_conversations_normalises_whitespace_and_case():
    records = [
        conv("a", "What is 2 + 2?", "It is 4."),
        conv("b", "what is  2 + 2?\n", "IT IS 4."),  # same after normalisation
        conv("c", "What is 2 + 2?", "Four."),  # same prompt, different answer: not this filter's
        conv("d", "What is 2 + 2?", "It is 4.", system="Be brief."),  # a system message makes it differ
        conv("e", "What is 2+2?", "It is 4."),  # spacing inside words is not whitespace normalisation
        conv("f", "What is 2 + 2?", "It is 4."),
    ]
    result = filters.dedup_conversations(records)
    assert ids(result.kept) == ["a", "c", "d", "e"]
    assert removed(result) == [("b", "same conversation as a"), ("f", "same conversation as a")]


def test_dedup_prompts_keeps_the_first_answer():
    records = [
        conv("a", "Name a colour.", "Blue."),
        conv("b", "name a  COLOUR.", "Red."),
        conv("c", "Name a color.", "Green."),  # spelled differently: kept
        conv("d", "Name a colour.", "Blue.", system="Answer in one word."),  # first user message is the key
    ]
    result = filters.dedup_prompts(records)
    assert ids(result.kept) == ["a", "c"]
    assert removed(result) == [("b", "same prompt as a"), ("d", "same prompt as a")]


# ---------------------------------------------------------------------------------------------------------
# Near duplicates

TWELVE = "one two three four five six seven eight nine ten eleven twelve"


def test_shingles_and_jaccard():
    assert filters.shingles("Hello, World!  how are you?") == {
        "hello world how",
        "world how are",
        "how are you",
    }
    assert filters.shingles("Hi there") == {"hi there"}  # shorter than 3 words: the whole text
    assert filters.shingles("?!") == set()
    assert len(filters.shingles(TWELVE)) == 10
    assert filters.jaccard({"a", "b", "c"}, {"b", "c", "d"}) == 0.5


@pytest.mark.parametrize(
    ("threshold", "expected"), [(0.9, (12, 10)), (0.8, (21, 6)), (0.5, (42, 3)), (1.0, (2, 64))]
)
def test_lsh_bands_reach_99_percent_recall_at_the_threshold(threshold, expected):
    bands, rows = filters.lsh_bands(threshold)
    assert (bands, rows) == expected
    assert 1 - (1 - threshold**rows) ** bands >= 0.99
    if rows < 64:  # one more row per band would fall below 99%
        assert 1 - (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) < 0.99


def test_near_duplicates_threshold_is_exact_jaccard():
    # The last word changed: 9 of the 10 shingles shared, union 11 -> Jaccard 9/11 = 0.818.
    reworded = TWELVE.replace("twelve", "dozen")
    records = [conv("a", TWELVE, "x"), conv("b", reworded.upper() + "!", "y")]
    result = filters.drop_near_duplicates(records, threshold=0.8)
    assert ids(result.kept) == ["a"]
    assert removed(result) == [("b", "near duplicate of a (Jaccard 0.818)")]
    assert ids(filters.drop_near_duplicates(records, threshold=9 / 11).kept) == ["a"]  # at the threshold
    assert ids(filters.drop_near_duplicates(records, threshold=0.82).kept) == ["a", "b"]


def test_near_duplicates_catch_a_reworded_prompt_and_keep_distinct_ones():
    garden = (
        "I am planning a small vegetable garden in my backyard that gets about six hours of direct sunlight "
        "a day, and the soil is mostly clay. Which vegetables should I plant first, and how should I prepare "
        "the soil before planting in the spring?"
    )
    reworded = garden.replace("I am planning", "I'm planning").replace("in the spring", "in spring")
    records = [
        conv("garden", garden, "Compost first."),
        conv("sea", "Write a short poem about the sea.", "..."),
        conv("moon", "Write a short poem about the moon.", "..."),  # Jaccard 4/6 with "sea"
        conv("garden2", reworded, "Peas and lettuce."),
        conv("python", "Write a short Python function that reverses a string.", "..."),
        conv("empty", "???", "..."),  # no words: left alone
        conv("empty2", "!!!", "..."),
    ]
    assert filters.jaccard(filters.shingles(garden), filters.shingles(reworded)) == pytest.approx(38 / 45)
    result = filters.drop_near_duplicates(records, threshold=0.8)
    assert ids(result.kept) == ["garden", "sea", "moon", "python", "empty", "empty2"]
    assert removed(result) == [("garden2", "near duplicate of garden (Jaccard 0.844)")]
    assert len(filters.drop_near_duplicates(records, threshold=0.9).kept) == 7


def test_near_duplicates_find_every_pair_above_the_threshold():
    # 60 distinct 20-word prompts, each followed later by a copy with its last word changed (Jaccard 17/19).
    base = [" ".join(f"w{i}_{j}" for j in range(20)) for i in range(60)]
    records = [conv(f"p{i}", t, "a") for i, t in enumerate(base)]
    records += [conv(f"q{i}", t.rsplit(" ", 1)[0] + " changed", "a") for i, t in enumerate(base)]
    result = filters.drop_near_duplicates(records, threshold=0.85)
    assert ids(result.kept) == [f"p{i}" for i in range(60)]
    assert [r.record["prompt_id"] for r in result.removed] == [f"q{i}" for i in range(60)]


# ---------------------------------------------------------------------------------------------------------
# Decontamination

MT_BENCH_81 = (
    "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
    "and must-see attractions."
)


@pytest.fixture(scope="module")
def mt_bench_index():
    prompts = load_eval_prompts(["asset:mt-bench"])
    return filters.build_ngram_index(prompts, 13)


def test_mt_bench_prompts(mt_bench_index):
    prompts = mt_bench_index.prompts
    assert len(prompts) == 160  # 80 questions x 2 turns
    assert prompts[0] == EvalPrompt("mt-bench:81/1", MT_BENCH_81)
    assert prompts[1].id == "mt-bench:81/2"
    assert mt_bench_index.sizes[0] == 7  # 19 words -> 7 13-grams
    assert (
        mt_bench_index.sizes[[p.id for p in prompts].index("mt-bench:121/2")] == 1
    )  # "Can you parallelize it?"


def test_decontaminate_catches_a_copied_mt_bench_question(mt_bench_index):
    records = [
        conv("copy", "Please " + MT_BENCH_81.lower().replace(",", "") + " Thanks!", "Aloha!"),
        conv("hawaii", "What are the best beaches to visit in Hawaii with young kids?", "Ko Olina."),
        conv("second", "Hi!", "Hello!", MT_BENCH_81, "Sure."),  # in a later user turn
        conv("answer", "Write about travel.", MT_BENCH_81),  # only user turns count
        # 6 of the 19 words changed: shares 1 of the 7 13-grams (14%)
        conv(
            "partial",
            "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting the food, "
            "the people and the music.",
            "...",
        ),
    ]
    result, hits = filters.decontaminate(records, mt_bench_index, threshold=0.5)
    assert ids(result.kept) == ["hawaii", "answer", "partial"]
    assert removed(result) == [
        ("copy", "contains 100% of the n-grams of mt-bench:81/1 (hits: mt-bench:81/1)"),
        ("second", "contains 100% of the n-grams of mt-bench:81/1 (hits: mt-bench:81/1)"),
    ]
    assert hits == {"mt-bench:81/1": ["copy", "second"]}
    assert filters.coverage(records[4]["messages"][0]["content"], mt_bench_index) == {0: 1 / 7}


def test_decontaminate_coverage_threshold_and_short_prompts():
    fifteen = "a b c d e f g h i j k l m n o"  # 15 words -> 3 13-grams
    prompts = [
        EvalPrompt("long", fifteen),
        EvalPrompt("short", "Prove the Pythagorean theorem."),
        EvalPrompt("none", "?"),
    ]
    index = filters.build_ngram_index(prompts, 13)
    assert index.sizes == [3, 1, 0]
    records = [
        conv("two_of_three", "x " + fifteen[:-2] + " y", "..."),  # a..n: 2 of the 3 13-grams
        conv("short_hit", "Can you prove the Pythagorean theorem for me?", "..."),
        conv("short_miss", "Prove the theorem of Pythagoras.", "..."),
        conv("clean", "What is a right triangle?", "..."),
    ]
    result, hits = filters.decontaminate(records, index, threshold=0.5)
    assert ids(result.kept) == ["short_miss", "clean"]
    assert removed(result) == [
        ("two_of_three", "contains 67% of the n-grams of long (hits: long)"),
        ("short_hit", "contains 100% of the n-grams of short (hits: short)"),
    ]
    assert hits == {"long": ["two_of_three"], "short": ["short_hit"]}
    # 2/3 < 0.7: below the threshold
    assert ids(filters.decontaminate(records, index, threshold=0.7)[0].kept) == [
        "two_of_three",
        "short_miss",
        "clean",
    ]
    # exactly at the threshold counts; coverage is per user message, never summed over messages
    assert filters.coverage("a b c d e f g h i j k l m", index) == {0: 1 / 3}
    assert ids(filters.decontaminate(records[:1], index, threshold=2 / 3)[0].kept) == []
    split = conv("split", "a b c d e f g h i j k l m", "...", "b c d e f g h i j k l m n", "...")
    assert ids(filters.decontaminate([split], index, threshold=0.5)[0].kept) == ["split"]


@pytest.mark.parametrize(
    ("record", "texts"),
    [
        ({"question_id": 1, "category": "x", "turns": ["First?", "Second?"]}, ["First?", "Second?"]),
        (conv("c", "Hi", "Hello", "Bye", "Ciao"), ["Hi", "Bye"]),
        ({"instruction": "Do it.", "dataset": "helpful_base"}, ["Do it."]),
        (
            {"id": 3, "query": "Question: 2+2?\nAnswer:", "choices": ["3", "4"], "gold": 1},
            ["Question: 2+2?\nAnswer:"],
        ),
        ({"prompt_id": "p", "prompt": "Rate this.", "chosen": [], "rejected": []}, ["Rate this."]),
    ],
)
def test_eval_texts(record, texts):
    assert filters.eval_texts(record) == texts


def test_eval_texts_rejects_unknown_records():
    with pytest.raises(DataError, match="no eval prompt"):
        filters.eval_texts({"text": "hello"})


def test_load_eval_prompts_from_files(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Write a poem."}, {"instruction": "Explain tides."}]))
    convs = tmp_path / "convs.jsonl"
    convs.write_text(json.dumps(conv("p1", "Hi there", "Hello", "And you?", "Fine")) + "\n\n")
    prompts = load_eval_prompts([str(alpaca), str(convs)])
    assert prompts == [
        EvalPrompt(f"{alpaca}:1", "Write a poem."),
        EvalPrompt(f"{alpaca}:2", "Explain tides."),
        EvalPrompt(f"{convs}:p1/1", "Hi there"),
        EvalPrompt(f"{convs}:p1/2", "And you?"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"text": "no"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no eval prompt"):
        load_eval_prompts([str(bad)])
    with pytest.raises(ConfigError, match=r"curate\.decontaminate\[1\]: unknown eval asset 'alpaca'"):
        load_eval_prompts(["asset:mt-bench", "asset:alpaca"])
    with pytest.raises(ConfigError, match=r"curate\.decontaminate\[0\]: .*missing\.jsonl: no such file"):
        load_eval_prompts([str(tmp_path / "missing.jsonl")])
