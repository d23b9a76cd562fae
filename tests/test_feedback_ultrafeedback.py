"""UltraFeedback's protocol: the judge preset (texts from the asset, answer format, parser, retries) and
raw `openbmb/UltraFeedback` records imported and binarized by `zephyr feedback` without generators.

The scripted judge answers in UltraFeedback's format: it reads the texts the prompt shows (`<text k> ...`)
and rates each by a quality marker `q=N` in it, so a rating that comes back on the right completion proves
the shuffle was undone. Raw records are hand-made in the exact upstream schema (Rating strings, "N/A",
Type lists, a missing aspect).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import jinja2
import pytest

from test_judge import ScriptedJudge
from zephyr import io
from zephyr.cli import main
from zephyr.core.config import FeedbackConfig, load_recipe
from zephyr.core.errors import ConfigError, DataError
from zephyr.data.schema import Problem, validate_pair, validate_rated
from zephyr.judge.rating import Rating
from zephyr.models import assets
from zephyr.stages.feedback import ultrafeedback
from zephyr.stages.feedback.judge import Judge, JudgeItem
from zephyr.stages.feedback.run import read_prompts, run_feedback
from zephyr.stages.feedback.ultrafeedback import Annotation, FormatError, parse_answer, system_prompt_of

# ---------------------------------------------------------------------------------------------------------
# The texts


@pytest.fixture(scope="module")
def templates() -> ultrafeedback.Templates:
    return ultrafeedback.load_templates(assets.fetch(ultrafeedback.ASSET))


def test_system_prompt_is_read_from_the_source_never_run():
    source = (
        'raise SystemExit("this module must not run")\n'
        "class UltraFeedback(Task):\n"
        '    aspect: str = "overall-rating"\n'
        "    _system_prompt: str = PrivateAttr(\n"
        '        default=(\n            "Judge {no_texts} texts.\\n"\n            "Be fair."\n        )\n'
        "    )\n"
    )
    assert system_prompt_of(source) == "Judge {no_texts} texts.\nBe fair."
    with pytest.raises(ConfigError, match="no string default of _system_prompt"):
        system_prompt_of("class T:\n    _template: str = 'x'\n")


def test_messages_render_as_distilabel_renders_them(templates):
    messages = ultrafeedback.build_messages(templates, "honesty", "What is 2+2?", ["4", "five"])
    system, user = messages[0]["content"], messages[1]["content"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert system == templates.system.format(no_texts=2)
    assert "and 2 text outputs" in system and "The 2 texts given are independent" in system
    # distilabel's format_input: jinja2.Template(source).render(instruction=..., generations=...)
    distilabel = jinja2.Template(templates.rubrics["honesty"])
    assert user == distilabel.render(instruction="What is 2+2?", generations=["4", "five"])
    assert user.endswith("Instruction: What is 2+2?\n\nTexts:\n<text 1> 4\n<text 2> five\n\n### Output\n")
    assert "#### Output for Text 2\nRating: [Rating]\nRationale: [Rationale]" in user
    assert "Text 3" not in user
    typed = ultrafeedback.build_messages(templates, "truthfulness", "Q", ["a", "b", "c"])[1]["content"]
    assert "#### Output for Text 3\nType: [List of types]\nRationale: [Rationale]\nRating: [Rating]" in typed


def test_unknown_aspect_names_the_rubrics(tmp_path):
    with pytest.raises(ConfigError, match="no rubric for aspect 'harmlessness'"):
        ultrafeedback.load_templates(tmp_path, ["harmlessness"])
    with pytest.raises(ConfigError, match=r"honesty\.jinja2: cannot read"):
        ultrafeedback.load_templates(tmp_path, ["honesty"])


# ---------------------------------------------------------------------------------------------------------
# Parsing, as UltraFeedback's `process`


def test_plain_answers_with_not_applicable():
    answer = (
        "#### Output for Text 1\nRating: 4\nRationale: Correct and confident.\n\n"
        "#### Output for Text 2\nRating: N/A\nRationale: Creative writing.\n\n"
        "#### Output for Text 3\nRating: 2 (Confident with significant mistakes)\nRationale: Wrong,\nsure."
    )
    assert parse_answer(answer, 3, "honesty") == [
        Annotation(Rating(4.0), "Correct and confident."),
        Annotation(Rating(None, ultrafeedback.NOT_APPLICABLE), "Creative writing."),
        Annotation(Rating(2.0), "Wrong,\nsure."),
    ]


def test_typed_answers():
    answer = (
        "#### Output for Text 1\nType: 1, 3\nRationale: Two errors.\nRating: 3\nRationale: Partial.\n\n"
        "#### Output for Text 2\nType: None\nRationale: No errors.\nRating: 5\nRationale: Free of them."
    )
    assert parse_answer(answer, 2, "truthfulness") == [
        Annotation(Rating(3.0), "Partial.", ("1", "3")),
        Annotation(Rating(5.0), "Free of them.", ()),
    ]


@pytest.mark.parametrize(
    ("answer", "aspect", "why"),
    [
        # a preamble is one more blank-line section than there are texts
        ("Here you go:\n\nRating: 4\nRationale: a\n\nRating: 3\nRationale: b", "honesty", "3 blank-line"),
        ("Rating: 4\nRationale: a", "honesty", "1 blank-line"),
        ("Rating: 4\nRationale: a\n\nRating: 3", "honesty", "text 2: no Rating/Rationale"),
        ("Rating: high\nRationale: a\n\nRating: 3\nRationale: b", "honesty", "'high' is not a number"),
        ("Rating: 7\nRationale: a\n\nRating: 3\nRationale: b", "honesty", "7 is outside 1-5"),
        # "N/A" is a rating only on instruction-following and honesty
        (
            "Type: None\nRationale: a\nRating: N/A\nRationale: b\n\nType: 1\nRationale: c\nRating: 2\nRationale: d",
            "helpfulness",
            "text 1: rating 'N/A' is not a number",
        ),
        ("Rating: 4\nRationale: a\n\nRating: 3\nRationale: b", "truthfulness", "text 1: no Type/"),
    ],
)
def test_format_errors(answer, aspect, why):
    with pytest.raises(FormatError, match=re.escape(why)):
        parse_answer(answer, 2, aspect)


# ---------------------------------------------------------------------------------------------------------
# The preset in the judge

_TEXTS = re.compile(r"^<text (\d+)> (.*)$", re.M)


def uf_answer(messages, rating_of, types_of=lambda q: "1") -> str:
    """An answer in UltraFeedback's format for the texts the annotation part of the prompt shows."""
    user = messages[-1]["content"]
    shown = [text for _, text in _TEXTS.findall(user.split("## Annotation")[1])]
    aspect = re.match(r"# (\w[\w /]*?) ", user).group(1)
    typed = aspect in ("Informativeness", "Truthfulness")
    blocks = []
    for k, text in enumerate(shown, start=1):
        q = int(re.search(r"q=(\d+)", text).group(1))
        head = f"#### Output for Text {k}\n" + (f"Type: {types_of(q)}\nRationale: types\n" if typed else "")
        blocks.append(f"{head}Rating: {rating_of(q, aspect)}\nRationale: about {text.split()[0]}")
    return "\n\n".join(blocks)


def uf_judge_config(*overrides: str):
    base = ["feedback.judge.preset=ultrafeedback", "feedback.judge.model.model=scripted"]
    return load_recipe(None, [*base, *overrides]).feedback.judge


ITEM = JudgeItem(
    "k1", [{"role": "user", "content": "Name a fruit."}], ["apple q=2", "banana q=4", "cherry q=5"]
)


def test_preset_rates_every_aspect_in_its_own_call(tmp_path, templates):
    cfg = uf_judge_config("feedback.judge.aspects=[instruction_following, honesty]")
    na_on_five = ScriptedJudge(
        lambda m, p: uf_answer(m, lambda q, a: "N/A" if a == "Honesty" and q == 5 else q)
    )
    judge = Judge(cfg, na_on_five, seed=3, audit_path=tmp_path / "audit.jsonl")
    (result,) = judge.rate([ITEM])
    assert result.ratings == [
        {"instruction_following": 2.0, "honesty": 2.0},
        {"instruction_following": 4.0, "honesty": 4.0},
        {"instruction_following": 5.0, "honesty": None},
    ]
    assert result.reasons[2] == {"instruction_following": None, "honesty": ultrafeedback.NOT_APPLICABLE}
    assert result.rationales[1] == {"instruction_following": "about banana", "honesty": "about banana"}
    # UltraFeedback's sampling, one call per aspect, its system prompt for three texts
    (batch, params), *_ = na_on_five.calls
    assert len(na_on_five.calls) == 1 and len(batch) == 2  # one batch: a call per aspect
    assert (params.temperature, params.top_p, params.max_tokens) == (0.0, 0.6, 500)
    system = batch[0][0]
    assert system == {"role": "system", "content": templates.system.format(no_texts=3)}
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["aspect"], a["attempt"]) for a in audit] == [("instruction_following", 0), ("honesty", 0)]
    shown = [
        re.findall(r"<text \d> (\w+)", a["messages"][1]["content"].split("## Annotation")[1]) for a in audit
    ]
    assert sorted(shown[0]) == ["apple", "banana", "cherry"]  # every text in one call, in a seeded order
    assert [ITEM.completions[i].split()[0] for i in audit[0]["order"]] == shown[0]


def test_the_types_of_typed_aspects_are_kept_per_completion():
    cfg = uf_judge_config("feedback.judge.aspects=[helpfulness, honesty, truthfulness]")
    kinds = {2: "None", 4: "1, 3", 5: "2"}  # by the completion's q
    judge = Judge(cfg, ScriptedJudge(lambda m, p: uf_answer(m, lambda q, a: q, lambda q: kinds[q])))
    (result,) = judge.rate([ITEM])
    assert result.types == [
        {"helpfulness": [], "truthfulness": []},
        {"helpfulness": ["1", "3"], "truthfulness": ["1", "3"]},
        {"helpfulness": ["2"], "truthfulness": ["2"]},
    ]


def test_a_feedback_run_with_the_preset_writes_the_types_into_rated_records(tmp_path):
    from zephyr.core.config import GeneratorConfig
    from zephyr.generation import Completion

    class Writer:
        def __init__(self, q):
            self.q, self.model_id = q, f"writer-{q}"

        def generate(self, conversations, params):
            return [Completion(f"answer q={self.q}", "stop", 5, 3) for _ in conversations]

    prompts = tmp_path / "prompts.jsonl"
    io.write_jsonl(prompts, [{"prompt_id": "p1", "prompt": "Name a fruit."}])
    judge_cfg = uf_judge_config("feedback.judge.aspects=[honesty, truthfulness]")
    judge_cfg.model = GeneratorConfig(model="scripted", name="judge", temperature=0.0, top_p=0.6)
    scripted = ScriptedJudge(lambda m, p: uf_answer(m, lambda q, a: q, lambda q: "None" if q == 2 else "1"))
    writers = {"w2": Writer(2), "w4": Writer(4)}
    cfg = FeedbackConfig(
        prompts=str(prompts),
        output_dir=str(tmp_path / "out"),
        generators=[GeneratorConfig(model="scripted", name=name) for name in writers],
        completions_per_prompt=2,
        judge=judge_cfg,
        eval_fraction=0.0,
    )
    run_feedback(cfg, generator_factory=lambda g: scripted if g.name == "judge" else writers[g.name])
    [record] = io.read_records(tmp_path / "out" / "rated.jsonl", "rated").records
    types = {c["model"]: c.get("types") for c in record["completions"]}
    assert types == {"w2": {"truthfulness": []}, "w4": {"truthfulness": ["1"]}}  # honesty has no types


def test_format_errors_are_asked_again_with_a_new_seed(tmp_path):
    cfg = uf_judge_config("feedback.judge.aspects=[honesty]")
    answers = iter(["I think they are all fine.", None])

    def first_garbage(messages, params):
        text = next(answers, None)
        return text if text is not None else uf_answer(messages, lambda q, a: q)

    scripted = ScriptedJudge(first_garbage)
    judge = Judge(cfg, scripted, audit_path=tmp_path / "audit.jsonl")
    (result,) = judge.rate([ITEM])
    assert [r["honesty"] for r in result.ratings] == [2.0, 4.0, 5.0]
    assert len(scripted.calls) == 2 and scripted.calls[0][1].seed != scripted.calls[1][1].seed
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a["attempt"] for a in audit] == [0, 1]
    assert [r["reason"] for r in audit[0]["ratings"]] == [ultrafeedback.FORMAT_ERROR] * 3
    assert audit[0]["messages"] == audit[1]["messages"]


def test_a_judge_that_never_keeps_the_format_gets_ten_tries():
    scripted = ScriptedJudge(lambda m, p: "Rating: 5")
    judge = Judge(uf_judge_config("feedback.judge.aspects=[honesty]"), scripted)
    (result,) = judge.rate([ITEM])
    assert len(scripted.calls) == ultrafeedback.ATTEMPTS == 10
    assert result.ratings == [{"honesty": None}] * 3
    assert result.reasons == [{"honesty": ultrafeedback.FORMAT_ERROR}] * 3
    assert judge.usage()["parse_failures"] == {ultrafeedback.FORMAT_ERROR: 30}


def test_preset_config():
    cfg = uf_judge_config("feedback.judge.model.top_p=0.9")
    assert (cfg.scale, cfg.layout, cfg.mode, cfg.model.temperature, cfg.model.max_tokens) == (
        5,
        "per_aspect",
        "text",
        0.0,
        500,
    )
    assert cfg.model.top_p == 0.9  # the recipe's own value wins over the preset's
    zephyr = load_recipe(None, ["feedback.judge.model.model=scripted"]).feedback.judge
    assert (zephyr.preset, zephyr.scale, zephyr.layout, zephyr.model.top_p) == (
        "zephyr",
        10,
        "all_aspects",
        1.0,
    )
    for override, key in [
        ("scale=10", "scale"),
        ("layout=all_aspects", "layout"),
        ("mode=logprobs", "mode"),
        ("template_dir=/tmp", "template_dir"),
    ]:
        with pytest.raises(ConfigError, match=rf"feedback\.judge\.{key}: .*ultrafeedback preset"):
            uf_judge_config(f"feedback.judge.{override}")


# ---------------------------------------------------------------------------------------------------------
# Raw openbmb/UltraFeedback records

TYPED = ("truthfulness", "helpfulness")


def raw_completion(model: str, ratings: dict[str, str], overall, response: str | None = None) -> dict:
    """A completion of the upstream schema; aspects left out of `ratings` are missing annotations."""
    annotations = {}
    for aspect, rating in ratings.items():
        if aspect in TYPED:
            annotations[aspect] = {
                "Type": ["1", "2"],
                "Rationale": f"types of {model}",
                "Rating": rating,
                "Rationale For Rating": f"{aspect} rating of {model}",
            }
        else:
            annotations[aspect] = {"Rating": rating, "Rationale": f"{aspect} of {model}"}
    return {
        "model": model,
        "principle": "helpfulness",
        "custom_system_prompt": "As an AI assistant, be helpful.",
        "response": response if response is not None else f"answer of {model}",
        "annotations": annotations,
        "fine-grained_score": 0.0,
        "overall_score": overall,
        "critique": f"critique of {model}",
    }


def four(i: str, f: str, h: str, t: str) -> dict[str, str]:
    return {"instruction_following": i, "honesty": f, "truthfulness": t, "helpfulness": h}


def raw_record(instruction: str, *completions: dict) -> dict:
    return {
        "source": "sharegpt",
        "instruction": instruction,
        "models": [c["model"] for c in completions],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
        "completions": list(completions),
    }


def france() -> dict:
    # means: a (5 + 4 + 3) / 3 = 4.0 (honesty N/A); b 2.0 (helpfulness missing); c 3.0
    return raw_record(
        "What is the capital of France?",
        raw_completion("a", four("5", "N/A", "3", "4"), 7.0),
        raw_completion("b", {"instruction_following": "2", "honesty": "2", "truthfulness": "2"}, "9"),
        raw_completion("c", four("3", "3", "3", "3"), 5.0),
    )


def tied() -> dict:
    # means: x 4.0, y 4.0, z 1.0; a blank answer is left out
    return raw_record(
        "Name a colour.",
        raw_completion("x", four("4", "4", "4", "4"), 8.0),
        raw_completion("y", four("5", "3", "4", "4"), 8.0),
        raw_completion("z", four("1", "1", "1", "1"), 2.0),
        raw_completion("w", four("5", "5", "5", "5"), 10.0, response="  "),
    )


def test_raw_record_becomes_a_rated_record():
    rated = ultrafeedback.rated_from_raw(france())
    assert validate_rated(rated) == []
    assert rated["prompt_id"] == hashlib.sha256(b"What is the capital of France?").hexdigest()
    assert (rated["prompt"], rated["source"], rated["judge"]) == (
        "What is the capital of France?",
        "sharegpt",
        ultrafeedback.IMPORTED_JUDGE,
    )
    a, b, c = rated["completions"]
    assert a["ratings"] == {
        "instruction_following": 5.0,
        "honesty": None,
        "truthfulness": 4.0,
        "helpfulness": 3.0,
    }
    assert a["mean_rating"] == 4.0 and a["rating_reasons"] == {"honesty": ultrafeedback.NOT_APPLICABLE}
    assert a["types"] == {"truthfulness": ["1", "2"], "helpfulness": ["1", "2"]}
    assert a["rationales"]["honesty"] == "honesty of a"
    assert a["rationales"]["truthfulness"] == "truthfulness rating of a"  # the rating's, not the type's
    assert (a["overall_score"], a["principle"], a["system_prompt"], a["critique"]) == (
        7.0,
        "helpfulness",
        "As an AI assistant, be helpful.",
        "critique of a",
    )
    assert b["ratings"]["helpfulness"] is None and b["rating_reasons"] == {
        "helpfulness": ultrafeedback.MISSING
    }
    assert (b["mean_rating"], b["overall_score"]) == (2.0, 9.0)  # the critique script wrote strings
    assert b["types"] == {"truthfulness": ["1", "2"]}  # its helpfulness annotation is missing
    assert c["mean_rating"] == 3.0 and "rating_reasons" not in c
    blank = ultrafeedback.rated_from_raw(tied())
    assert [c["model"] for c in blank["completions"]] == ["x", "y", "z"]
    assert blank["generation_failures"] == [{"model": "w", "error": "empty response"}]


def test_missing_annotations_in_every_upstream_shape():
    record = france()
    annotations = record["completions"][2]["annotations"]
    annotations["honesty"] = None  # a null struct field
    annotations["truthfulness"] = []  # the annotation script's list, left empty when it gave up
    annotations["instruction_following"] = [annotations["instruction_following"]]  # its list of one
    c = ultrafeedback.rated_from_raw(record)["completions"][2]
    assert c["ratings"] == {
        "instruction_following": 3.0,
        "honesty": None,
        "truthfulness": None,
        "helpfulness": 3.0,
    }
    assert c["rating_reasons"] == {"honesty": ultrafeedback.MISSING, "truthfulness": ultrafeedback.MISSING}


def test_raw_types_in_every_upstream_shape():
    record = france()
    annotations = record["completions"][2]["annotations"]
    annotations["truthfulness"]["Type"] = "1, 3"  # the answer's own line
    annotations["helpfulness"]["Type"] = "None"
    c = ultrafeedback.rated_from_raw(record)["completions"][2]
    assert c["types"] == {"truthfulness": ["1", "3"], "helpfulness": []}
    annotations["truthfulness"]["Type"] = ["None"]
    annotations["helpfulness"]["Type"] = 5  # not a shape of UltraFeedback's: left out
    c = ultrafeedback.rated_from_raw(record)["completions"][2]
    assert c["types"] == {"truthfulness": []}


def test_raw_record_problems():
    bad = france()
    bad["completions"][1]["annotations"]["honesty"]["Rating"] = "7"
    bad["completions"][2]["overall_score"] = "high"
    assert ultrafeedback.validate_raw(bad) == [
        Problem("completions[1].annotations.honesty", "Rating must be '1'..'5' or 'N/A', got 7"),
        Problem("completions[2].overall_score", "must be a number, got 'high'"),
    ]
    assert ultrafeedback.validate_raw({"completions": []}) == [Problem("instruction", "missing")]
    blank = raw_record("Q?", raw_completion("a", four("1", "1", "1", "1"), 1.0, response=""))
    assert ultrafeedback.validate_raw(blank) == [Problem("completions", "no completion has a response")]
    assert ultrafeedback.validate_raw(france()) == []


def write_raw(path: Path, *records: dict) -> Path:
    io.write_jsonl(path, records)
    return path


def pairs_of(out: Path) -> dict[str, tuple]:
    pairs = io.read_jsonl_resumable(out / "pairs.jsonl")
    assert all(validate_pair(p) == [] for p in pairs)
    return {
        p["prompt"]: (p["chosen_model"], p["rejected_model"], p["score_chosen"], p["score_rejected"])
        for p in pairs
    }


def test_one_command_imports_and_binarizes_the_raw_corpus(tmp_path, capsys):
    raw = write_raw(tmp_path / "uf.jsonl", france(), tied())
    out = tmp_path / "out"
    recipe = Path(__file__).parents[1] / "recipes" / "zephyr-7b-beta" / "feedback.yaml"
    argv = ["feedback", str(recipe), f"feedback.prompts={raw}", f"feedback.output_dir={out}"]
    argv += ["feedback.eval_fraction=0", "feedback.rejected=lowest"]
    assert main([*argv, "feedback.tie_break=first"]) == 0
    assert "imported 2 raw UltraFeedback records" in capsys.readouterr().out
    rated = io.read_jsonl_resumable(out / "rated.jsonl")
    assert rated == [ultrafeedback.rated_from_raw(france()), ultrafeedback.rated_from_raw(tied())]
    # by the mean (the paper's rule); the tie x = y at 4.0 is kept and x, the first, chosen
    assert pairs_of(out) == {
        "What is the capital of France?": ("a", "b", 4.0, 2.0),
        "Name a colour.": ("x", "z", 4.0, 1.0),
    }
    stats = json.loads((out / "feedback_stats.json").read_text())
    assert stats["binarization"]["kept"] == 2 and stats["this_run"] == {"imported": 2}
    # a's honesty N/A, b's helpfulness missing (france); the blank answer is a generation failure, not a rating
    assert stats["unrated"] == {
        "helpfulness": {ultrafeedback.MISSING: 1},
        "honesty": {ultrafeedback.NOT_APPLICABLE: 1},
    }
    markdown = (out / "feedback_stats.md").read_text()
    assert (
        "| honesty | not applicable | 1 |" in markdown
        and "| helpfulness | missing annotation | 1 |" in markdown
    )
    # by the critique's overall_score (ultrafeedback_binarized), ties dropped
    assert main([*argv, "feedback.score=overall", "feedback.drop_ties=true"]) == 0
    assert pairs_of(out) == {"What is the capital of France?": ("b", "c", 9.0, 5.0)}


def test_import_refuses_bad_records_and_other_judges(tmp_path):
    bad = france()
    bad["completions"][0]["annotations"]["truthfulness"]["Rating"] = "five"
    raw = write_raw(tmp_path / "uf.jsonl", tied(), bad)
    cfg = FeedbackConfig(prompts=str(raw), output_dir=str(tmp_path / "out"), on_bad_record="error")
    with pytest.raises(
        DataError, match=r"uf\.jsonl:2: completions\[0\]\.annotations\.truthfulness: Rating must be"
    ):
        run_feedback(cfg)
    skipped = run_feedback(FeedbackConfig(prompts=str(raw), output_dir=str(tmp_path / "out")))
    assert (skipped.prompts, skipped.pairs) == (1, 1)
    io.write_jsonl(tmp_path / "out" / "rated.jsonl", [{"prompt_id": "p", "judge": "some-judge|abc"}])
    with pytest.raises(ConfigError, match=re.escape("rated by judge 'some-judge|abc'")):
        run_feedback(FeedbackConfig(prompts=str(raw), output_dir=str(tmp_path / "out")))
    prompts = tmp_path / "prompts.jsonl"
    io.write_jsonl(prompts, [{"prompt_id": "p1", "prompt": "Hi"}])
    with pytest.raises(ConfigError, match=r"pool of generators is empty.*not raw UltraFeedback records"):
        run_feedback(FeedbackConfig(prompts=str(prompts), output_dir=str(tmp_path / "other")))
    with pytest.raises(ConfigError, match=r"feedback\.score: 'overall'"):
        load_recipe(None, ["feedback.score=overall", "feedback.generators=[{model: m1}, {model: m2}]"])


def test_raw_records_are_prompts_for_new_completions(tmp_path):
    raw = write_raw(tmp_path / "uf.jsonl", france(), tied())
    prompts = read_prompts(str(raw))
    assert [(p.prompt_id, p.prompt, p.messages) for p in prompts] == [
        (
            hashlib.sha256(text.encode()).hexdigest(),
            text,
            [{"role": "user", "content": text}],
        )
        for text in ("What is the capital of France?", "Name a colour.")
    ]


def test_the_paper_recipe_rates_with_ultrafeedbacks_preset():
    root = Path(__file__).parents[1]
    recipe = load_recipe(root / "recipes" / "zephyr-7b-beta" / "feedback.yaml")
    cfg = recipe.feedback
    judge = cfg.judge
    assert (judge.preset, judge.scale, judge.layout, judge.model.model) == (
        "ultrafeedback",
        5,
        "per_aspect",
        "openai:gpt-4@https://api.openai.com/v1",
    )
    assert (judge.model.temperature, judge.model.top_p, judge.model.max_tokens) == (0.0, 0.6, 500)
    assert (cfg.generators, cfg.score, cfg.rejected, cfg.drop_ties) == ([], "mean", "random", False)
