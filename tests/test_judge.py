"""The judge layer: text and logprobs modes against scripted judges, the shuffle mapped back, failures
counted per reason (never dropped), repeats, the audit log, usage, and the generic client (MT-Bench style).

The scripted judges read the judge prompt the way a real judge would: they find the answers under
`### Output k` and rate each by a quality marker `q=N` in its text. A rating that comes back on the right
completion therefore proves the shuffle was undone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest

from zephyr.core.config import GeneratorConfig, JudgeConfig
from zephyr.core.errors import ConfigError, ZephyrError
from zephyr.generation import Completion, SamplingParams, Usage
from zephyr.generation.base import LogprobScorer
from zephyr.judge import parsing
from zephyr.judge.client import JUDGE_CALL_FAILED, JudgeClient, JudgeRequest, check_logprobs_judge
from zephyr.judge.rating import Rating
from zephyr.stages.feedback import prompts
from zephyr.stages.feedback.judge import Judge, JudgeItem, check_judge_config, judge_id, rating_offsets
from zephyr.stages.mt_bench.protocol import parse_score

ASPECTS = ["instruction_following", "helpfulness", "honesty", "truthfulness"]
LABELS = ["Instruction-following", "Helpfulness", "Honesty", "Truthfulness"]
PROMPT = [{"role": "user", "content": "Name a fruit."}]


def judge_config(**changes) -> JudgeConfig:
    base = JudgeConfig(model=GeneratorConfig(model="scripted", name="scripted-judge", temperature=0.0))
    return replace(base, **changes)


# ---------------------------------------------------------------------------------------------------------
# Scripted judges


_SHOWN = re.compile(r"### Output (\d+)\n(.*?)(?=\n\n### Output \d+\n|\n+## Your evaluation)", re.S)


def shown_outputs(messages) -> list[str]:
    """The answers a judge prompt shows, in prompt order."""
    return [text for _, text in _SHOWN.findall(messages[-1]["content"])]


def quality(text: str) -> int:
    return int(re.search(r"q=(\d+)", text).group(1))


def call_aspect(messages) -> str | None:
    """The aspect a one-aspect judge prompt asks about (None for all aspects)."""
    match = re.search(r"on one aspect only: ([\w-]+)\.", messages[-1]["content"])
    return match.group(1) if match else None


def formatted_answer(messages, rating_of) -> str:
    """A well-formed answer: per shown output a rationale naming it and its rating line(s)."""
    aspect = call_aspect(messages)
    blocks = []
    for k, text in enumerate(shown_outputs(messages), start=1):
        lines = [f"Output {k}", f"Rationale: about {text.split()[0]}."]
        if aspect is not None:
            lines.append(f"Rating: {rating_of(text, aspect)}")
        else:
            lines += [f"{label}: {rating_of(text, label)}" for label in LABELS]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


class ScriptedJudge:
    """A `Generator` whose answer is `answer(messages, params)`: a string, or a Completion as it is."""

    def __init__(self, answer, model_id="scripted"):
        self.answer = answer
        self.model_id = model_id
        self.calls: list[tuple[list, SamplingParams]] = []
        self.usage = Usage()

    def generate(self, conversations, params):
        self.calls.append((list(conversations), params))
        out = []
        for messages in conversations:
            value = self.answer(messages, params)
            completion = value if isinstance(value, Completion) else Completion(value, "stop", 100, 20)
            out.append(completion)
        self.usage.requests += len(out)
        self.usage.prompt_tokens += sum(c.prompt_tokens for c in out)
        self.usage.completion_tokens += sum(c.completion_tokens for c in out)
        return out


def items_of(qualities_by_key: dict[str, list[int]]) -> list[JudgeItem]:
    names = ["apple", "banana", "cherry", "damson", "elder"]
    return [
        JudgeItem(key, PROMPT, [f"{names[i]} q={q}" for i, q in enumerate(qualities)])
        for key, qualities in qualities_by_key.items()
    ]


# ---------------------------------------------------------------------------------------------------------
# Text mode


def test_text_mode_all_aspects_maps_ratings_and_rationales_back_through_the_shuffle():
    def rating_of(text, label):
        q = quality(text)
        return q if label != "Honesty" else 11 - q  # aspects must not be mixed up either

    fake = ScriptedJudge(lambda messages, params: formatted_answer(messages, rating_of))
    items = items_of({"p1": [2, 9, 5, 7], "p2": [4, 1, 8, 6], "p3": [10, 3, 6, 1]})
    results = Judge(judge_config(layout="all_aspects"), fake, seed=3).rate(items)

    assert len(fake.calls) == 1 and len(fake.calls[0][0]) == 3  # one batched call, one request per item
    orders = [prompts.build_judge_messages(PROMPT, i.completions, None, 10, 3, key=i.key)[1] for i in items]
    assert any(order != sorted(order) for order in orders)  # the test would notice a missing unshuffle
    for item, result in zip(items, results, strict=True):
        assert result.key == item.key
        for c, text in enumerate(item.completions):
            q = quality(text)
            assert result.ratings[c] == {
                "instruction_following": q,
                "helpfulness": q,
                "honesty": 11 - q,
                "truthfulness": q,
            }
            assert result.reasons[c] == dict.fromkeys(ASPECTS)
            assert set(result.rationales[c].values()) == {f"about {text.split()[0]}."}
        positions = {(r.completion, r.position) for r in result.readings}
        assert positions == {(order_index, p) for p, order_index in enumerate(orders[items.index(item)])}


def test_garbage_answers_give_null_ratings_with_reasons_counted_per_reason():
    answers = {
        "fine": None,  # well formed
        "chatter": "They are all lovely fruits, I cannot choose.",
        "range": "Output 1\nRating: 12\n\nOutput 2\nRating: 3",
        "scale": "Output 1\nRating: 4/5\n\nOutput 2\nRating: 7 or 8",
        "down": Completion.failed("HTTP 500: boom"),
    }

    def answer(messages, params):
        key = next(k for k in answers if f"{k} " in messages[-1]["content"])
        value = answers[key]
        return formatted_answer(messages, lambda t, a: quality(t)) if value is None else value

    fake = ScriptedJudge(answer)
    items = [JudgeItem(key, PROMPT, [f"{key} one q=6", f"{key} two q=3"]) for key in answers]
    judge = Judge(judge_config(layout="per_aspect", aspects=["helpfulness"]), fake, seed=0)
    results = {r.key: r for r in judge.rate(items)}

    assert [r["helpfulness"] for r in results["fine"].ratings] == [6, 3]
    assert [r["helpfulness"] for r in results["chatter"].ratings] == [None, None]
    assert [r["helpfulness"] for r in results["chatter"].reasons] == [parsing.NO_RATING] * 2
    # "range" and "scale": by position, mapped back to completions through the call's order
    for key, by_position in (
        ("range", [(None, parsing.OUT_OF_RANGE), (3.0, None)]),
        ("scale", [(None, parsing.WRONG_SCALE), (None, parsing.AMBIGUOUS)]),
    ):
        order = prompts.build_judge_messages(PROMPT, items[0].completions, "helpfulness", 10, 0, key=key)[1]
        got = [
            (results[key].ratings[c]["helpfulness"], results[key].reasons[c]["helpfulness"]) for c in order
        ]
        assert got == by_position
    assert [r["helpfulness"] for r in results["down"].reasons] == [JUDGE_CALL_FAILED] * 2
    usage = judge.usage()
    assert usage["calls"] == 5 and usage["failed_calls"] == 1
    assert usage["parse_failures"] == {
        parsing.NO_RATING: 2,
        parsing.OUT_OF_RANGE: 1,
        parsing.WRONG_SCALE: 1,
        parsing.AMBIGUOUS: 1,
        JUDGE_CALL_FAILED: 2,
    }
    assert usage["backend"]["requests"] == 5 and usage["backend"]["prompt_tokens"] == 400


def test_audit_log_holds_one_exact_line_per_call(tmp_path):
    raw = "Output 1\nRationale: fine.\nRating: 7\n\nOutput 2\nRationale: weak.\nRating: nope"
    fake = ScriptedJudge(lambda messages, params: raw)
    audit = tmp_path / "judge_audit.jsonl"
    config = judge_config(layout="per_aspect", aspects=["honesty", "helpfulness"], scale=10)
    judge = Judge(config, fake, seed=5, audit_path=audit)
    [result] = judge.rate([JudgeItem("k1", PROMPT, ["first answer", "second answer"])])

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == 2
    for line, aspect in zip(lines, ["honesty", "helpfulness"], strict=True):
        messages, order = prompts.build_judge_messages(
            PROMPT, ["first answer", "second answer"], aspect, 10, 5, key="k1"
        )
        assert line == {
            "judge": judge.judge_id,
            "key": "k1",
            "aspect": aspect,
            "repeat": 0,
            "order": order,
            "mode": "text",
            "messages": messages,
            "raw": raw,
            "finish_reason": "stop",
            "error": None,
            "ratings": [
                {"completion": order[0], "aspect": aspect, "position": 0, "value": 7.0, "reason": None},
                {
                    "completion": order[1],
                    "aspect": aspect,
                    "position": 1,
                    "value": None,
                    "reason": parsing.NO_RATING,
                },
            ],
            "prompt_tokens": 100,
            "completion_tokens": 20,
        }
        assert result.ratings[order[0]][aspect] == 7.0 and result.ratings[order[1]][aspect] is None
    assert judge.judge_id.startswith("scripted-judge|")


def test_repeats_use_new_orders_and_keep_the_median():
    def answer(messages, params):
        if params.seed == 2:
            return "no idea"  # the third repeat fails to parse: left out of the median, still recorded
        bump = {0: 0, 1: 4, 3: -2}[params.seed]
        return formatted_answer(messages, lambda t, a: max(1, min(10, quality(t) + bump)))

    fake = ScriptedJudge(answer)
    items = items_of({"p1": [2, 5, 8], "p2": [6, 3, 9]})
    config = judge_config(layout="per_aspect", aspects=["helpfulness"], repeats=4)
    results = Judge(config, fake, seed=0).rate(items)

    assert sorted(params.seed for _, params in fake.calls) == [0, 1, 2, 3]  # one batched call per repeat
    for item, result in zip(items, results, strict=True):
        for c, text in enumerate(item.completions):
            q = quality(text)
            values = sorted([q, min(10, q + 4), max(1, q - 2)])
            assert result.ratings[c]["helpfulness"] == values[1]  # median of the three parsed repeats
            mine = [r for r in result.readings if r.completion == c]
            assert sorted(r.repeat for r in mine) == [0, 1, 2, 3]
            assert [r.rating.reason for r in mine if r.repeat == 2] == [parsing.NO_RATING]
        positions_by_repeat = [
            [r.position for r in sorted(result.readings, key=lambda r: r.completion) if r.repeat == k]
            for k in range(4)
        ]
        assert len({tuple(p) for p in positions_by_repeat}) > 1  # repeats see other orders


def test_balanced_orders_show_every_completion_at_every_position():
    """order: balanced with 4 repeats of 4 completions: each completion is shown once at each position, so a
    judge that adds a bonus by position alone gives every completion the same bonus in the mean."""
    bonus = [0, 1, 2, 3]  # the judge rates the answer at position p (0-based) p points higher

    def answer(messages, params):
        shown = re.findall(r"q=(\d+)", messages[-1]["content"])
        return "\n".join(f"Output {p + 1}\nRating: {int(q) + bonus[p]}" for p, q in enumerate(shown))

    items = items_of({"p1": [2, 4, 6, 3]})
    config = judge_config(layout="per_aspect", aspects=["helpfulness"], repeats=4, order="balanced")
    [result] = Judge(config, ScriptedJudge(answer), seed=0).rate(items)
    for c in range(4):
        mine = sorted((r.repeat, r.position) for r in result.readings if r.completion == c)
        assert sorted(p for _, p in mine) == [0, 1, 2, 3]
        assert mine[1][1] == 3 - mine[0][1]  # the second repeat is the reverse of the first
        # median of q + 0..3 = q + 1.5: the same bonus for every completion
        assert result.ratings[c]["helpfulness"] == [2, 4, 6, 3][c] + 1.5
    shuffled = judge_config(layout="per_aspect", aspects=["helpfulness"], repeats=4)
    assert judge_id(config, check_judge_config(config)) != judge_id(shuffled, check_judge_config(shuffled))


def test_all_repeats_failing_gives_null_with_the_most_common_reason():
    answers = iter(["nothing", "Output 1\nRating: 99", "still nothing"])
    fake = ScriptedJudge(lambda messages, params: next(answers))
    config = judge_config(layout="per_aspect", aspects=["honesty"], repeats=3)
    [result] = Judge(config, fake).rate([JudgeItem("k", PROMPT, ["only answer"])])
    assert result.ratings == [{"honesty": None}]
    assert result.reasons == [{"honesty": parsing.NO_RATING}]


# ---------------------------------------------------------------------------------------------------------
# Logprobs mode


def token(text, logprob=-0.1, top=None):
    alternatives = [{"token": t, "logprob": lp} for t, lp in (top or {}).items()]
    return {"token": text, "logprob": logprob, "top_logprobs": alternatives}


def test_logprobs_mode_reads_the_rating_token_of_generated_answers(tmp_path):
    def answer(messages, params):
        assert params.logprobs and params.top_logprobs == 20
        tokens = []
        for k, text in enumerate(shown_outputs(messages), start=1):
            q = quality(text)
            dist = {str(q): math.log(0.5), str(q + 1): math.log(0.25), " the": math.log(0.25)}
            tokens += [token(f"Output {k}"), token("\n"), token("Rating"), token(":"), token(" ")]
            tokens += [token(str(q), math.log(0.5), dist), token("\n\n")]
        tokens = tokens[:-1]
        text = "".join(t["token"] for t in tokens)
        return Completion(text, "stop", 50, len(tokens), logprobs=tokens)

    fake = ScriptedJudge(answer)
    audit = tmp_path / "audit.jsonl"
    config = judge_config(mode="logprobs", scale=5, layout="per_aspect", aspects=["helpfulness"])
    items = items_of({"a": [1, 3, 2], "b": [4, 2, 1]})
    results = Judge(config, fake, audit_path=audit).rate(items)
    for item, result in zip(items, results, strict=True):
        for c, text in enumerate(item.completions):
            q = quality(text)
            assert result.ratings[c]["helpfulness"] == pytest.approx((q * 0.5 + (q + 1) * 0.25) / 0.75)
    line = json.loads(audit.read_text().splitlines()[0])
    evidence = line["ratings"][0]["evidence"]
    assert evidence["token_index"] == 5 and " the" in evidence["top_logprobs"]


def test_logprobs_mode_without_a_rating_line_is_null_not_a_guess():
    fake = ScriptedJudge(
        lambda m, p: Completion("hmm", "stop", 5, 1, logprobs=[token("hmm", -1.0, {"4": -1.0})])
    )
    config = judge_config(mode="logprobs", scale=5, layout="per_aspect", aspects=["honesty"])
    [result] = Judge(config, fake).rate([JudgeItem("k", PROMPT, ["a q=1", "b q=2"])])
    assert result.ratings == [{"honesty": None}, {"honesty": None}]
    assert result.reasons == [{"honesty": parsing.NO_RATING}] * 2


class PrefixJudge:
    """A local-style judge (a `LogprobScorer`): the next-token log-probs after a forced answer prefix, by
    the shown output's quality."""

    model_id = "prefix"

    def __init__(self, accept_candidates=True, too_long=()):
        self.accept_candidates = accept_candidates
        self.too_long = too_long
        self.probes: list[tuple[str, ...]] = []  # next_token_logprobs: the client's candidate probe
        self.calls: list[
            tuple[int, tuple, tuple]
        ] = []  # prefix_logprobs: conversations, candidates, prefixes

    def generate(self, conversations, params):  # pragma: no cover - logprobs mode never generates here
        raise AssertionError("forced-prefix judging must not generate")

    def next_token_logprobs(self, conversations, top_k=20, *, candidates=(), answer_prefix=""):
        self.probes.append(tuple(candidates))
        self._check(conversations, candidates)
        return [{"1": 0.0} for _ in conversations]

    def prefix_logprobs(self, conversations, prefixes, top_k=20, *, candidates=()):
        self.calls.append((len(conversations), tuple(candidates), tuple(prefixes)))
        self._check(conversations, candidates)
        return [[self._after(messages, prefix) for prefix in prefixes] for messages in conversations]

    def _check(self, conversations, candidates):
        if candidates and not self.accept_candidates:
            raise ZephyrError("candidate '1' is 2 tokens for this tokenizer; it must be one token")
        if any(word in c[-1]["content"] for c in conversations for word in self.too_long):
            raise ZephyrError("conversation 0: 9000 tokens exceed the context of 8192")

    @staticmethod
    def _after(messages, prefix):
        if prefix.endswith(": 1"):
            return {"0": math.log(0.5), "\n": math.log(0.5)}  # after a forced "1": 10 or 1, even odds
        position = int(re.match(r"Output (\d+)\n", prefix).group(1))
        q = quality(shown_outputs(messages)[position - 1])
        return {str(q): math.log(0.6), "9": math.log(0.4)}


def test_logprobs_mode_with_forced_prefixes_scores_every_slot():
    fake = PrefixJudge()
    config = judge_config(mode="logprobs", scale=5, layout="all_aspects", aspects=["helpfulness", "honesty"])
    items = items_of({"a": [1, 3, 2], "b": [2, 4, 5], "c": [5, 1, 3]})
    assert prompts.shuffle_order(3, 0, "a/all") != [0, 1, 2]  # the mapping back is exercised
    results = Judge(config, fake).rate(items)
    for item, result in zip(items, results, strict=True):
        for c, text in enumerate(item.completions):
            q = quality(text)
            # "9" is not a rating on 1-5: the q mass alone remains
            assert result.ratings[c] == {"helpfulness": q, "honesty": q}
    digits = ("1", "2", "3", "4", "5")
    assert fake.probes == [digits]  # the tokenizer is asked once whether the digits are single tokens
    # one call per item: its prompt once, every slot's forced prefix after it
    prefixes = tuple(f"Output {k}\n{label}: " for k in (1, 2, 3) for label in ("Helpfulness", "Honesty"))
    assert fake.calls == [(1, digits, prefixes)] * 3


def test_forced_prefixes_on_the_1_to_10_scale_tell_10_from_1():
    fake = PrefixJudge()
    config = judge_config(mode="logprobs", scale=10, layout="per_aspect", aspects=["honesty"])
    assert prompts.shuffle_order(2, 0, "c/honesty") == [1, 0]  # the mapping back is exercised
    [result] = Judge(config, fake).rate([JudgeItem("c", PROMPT, ["a q=1", "b q=7"])])
    # q=1: "1" has .6 (half of it continues with "0": 10), "9" .4 -> .3*1 + .3*10 + .4*9 = 6.9
    assert result.ratings[0]["honesty"] == pytest.approx(6.9)
    # q=7: .6*7 + .4*9 = 7.8 (no "1" mass to split)
    assert result.ratings[1]["honesty"] == pytest.approx(7.8)
    [(_, _, prefixes)] = fake.calls
    assert prefixes == (
        "Output 1\nRating: ",
        "Output 1\nRating: 1",
        "Output 2\nRating: ",
        "Output 2\nRating: 1",
    )


def test_forced_prefixes_fall_back_to_top_k_and_isolate_a_failing_conversation():
    fake = PrefixJudge(accept_candidates=False, too_long=("huge",))
    config = judge_config(mode="logprobs", scale=5, layout="per_aspect", aspects=["honesty"])
    items = [JudgeItem("x", PROMPT, ["a q=2", "b q=4"]), JudgeItem("long", PROMPT, ["huge q=3", "c q=1"])]
    judge = Judge(config, fake)
    ok, long = judge.rate(items)
    assert [r["honesty"] for r in ok.ratings] == [2, 4]
    assert long.ratings == [{"honesty": None}] * 2 and long.reasons == [{"honesty": JUDGE_CALL_FAILED}] * 2
    assert all(candidates == () for _, candidates, _ in fake.calls)
    assert judge.usage()["failed_calls"] == 1


def test_the_log_prob_capability_is_the_declared_protocol():
    """Forcing an answer start is a `LogprobScorer`'s: the transformers backend is one, the HTTP and vLLM
    backends are not; a generator with only half of it is not one, and is not asked for forced prefixes."""
    from zephyr.generation.local import LocalGenerator
    from zephyr.generation.remote import RemoteGenerator
    from zephyr.generation.vllm_backend import VLLMGenerator

    assert issubclass(LocalGenerator, LogprobScorer) and isinstance(PrefixJudge(), LogprobScorer)
    assert not issubclass(RemoteGenerator, LogprobScorer) and not issubclass(VLLMGenerator, LogprobScorer)

    class HalfScorer(ScriptedJudge):
        def next_token_logprobs(self, conversations, top_k=20, *, candidates=(), answer_prefix=""):
            raise AssertionError("not a LogprobScorer: must not be asked")

    tokens = [token("Rating"), token(":"), token(" "), token("4", 0.0)]
    half = HalfScorer(lambda m, p: Completion("Rating: 4", "stop", 5, 4, logprobs=tokens))
    with pytest.raises(ConfigError, match=r"judge_mode logprobs: the judge 'half'"):
        check_logprobs_judge(half, "half")
    config = judge_config(mode="logprobs", scale=5, layout="per_aspect", aspects=["honesty"])
    [result] = Judge(config, half).rate([JudgeItem("k", PROMPT, ["only q=4"])])
    assert result.ratings == [{"honesty": 4.0}]  # read from the generated answer's log-probs instead
    check_logprobs_judge(PrefixJudge(), "prefix")  # a scorer passes


# ---------------------------------------------------------------------------------------------------------
# Pure helpers, ids, configs, the generic client


def test_rating_offsets_find_the_number_of_each_rating_line():
    text = "Output 1\nRationale: a 5 star.\nHelpfulness: 4\nHonesty: **[2]**\n\nOutput 2\nHelpfulness rating: 9\n"
    offsets = rating_offsets(text, 2, ["Helpfulness", "Honesty"])
    assert {k: text[v] for k, v in offsets.items()} == {
        (0, "Helpfulness"): "4",
        (0, "Honesty"): "2",
        (1, "Helpfulness"): "9",
    }
    assert rating_offsets("Rating: 3", 1, ["Rating"]) == {(0, "Rating"): 8}


def test_judge_id_pins_model_templates_and_settings(tmp_path):
    base = judge_config()
    templates = check_judge_config(base)
    from zephyr.stages.feedback.judge import judge_id

    same = judge_id(base, templates)
    assert same == judge_id(judge_config(), check_judge_config(judge_config()))
    assert same.startswith("scripted-judge|")
    assert judge_id(replace(base, scale=5), templates) != same
    (tmp_path / "honesty.txt").write_text("Honesty, judged strictly: $b1 bad, $b5 good.\n")
    custom = replace(base, template_dir=str(tmp_path))
    assert judge_id(custom, check_judge_config(custom)) != same


def test_judge_config_mistakes_fail_early():
    with pytest.raises(ConfigError, match="system_prompt"):
        check_judge_config(judge_config(model=GeneratorConfig(model="x", system_prompt="Be nice.")))
    with pytest.raises(ConfigError, match="scale"):
        check_judge_config(judge_config(scale=7))
    with pytest.raises(ConfigError, match="twice"):
        check_judge_config(judge_config(aspects=["instruction_following", "instruction-following"]))


def test_the_generic_client_serves_single_answer_grading(tmp_path):
    """MT-Bench-style: one score per request with `[[x]]`, parse failures kept, usage counted apart."""
    fake = ScriptedJudge(
        lambda messages, params: "Good.\nRating: [[8]]" if "first" in messages[-1]["content"] else "?"
    )
    fake.usage.requests = 7  # someone else's earlier use of the same generator is not the judge's
    audit = tmp_path / "judgments.jsonl"
    client = JudgeClient(fake, SamplingParams(max_tokens=64), judge_id="gpt-x|abc", audit_path=audit)
    requests = [
        JudgeRequest(
            f"81/{turn}",
            [{"role": "user", "content": f"grade the {word} answer"}],
            parse=lambda a: [parse_score(a.text)],
            slots=({"question_id": 81, "turn": turn},),
            meta={"judge_prompt": "single-v1"},
        )
        for turn, word in ((1, "first"), (2, "second"))
    ]
    first, second = client.judge(requests)
    assert first.ratings == [Rating(8.0)] and second.ratings[0].value is None
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [line["ratings"] for line in lines] == [
        [{"question_id": 81, "turn": 1, "value": 8.0, "reason": None}],
        [
            {
                "question_id": 81,
                "turn": 2,
                "value": None,
                "reason": "no [[rating]] or [rating] in the judge's answer",
            }
        ],
    ]
    assert lines[0]["judge_prompt"] == "single-v1" and lines[0]["raw"] == "Good.\nRating: [[8]]"
    usage = client.usage()
    assert usage["backend"]["requests"] == 2 and usage["calls"] == 2
