"""Open LLM Leaderboard v1 settings for `zephyr eval mc --preset NAME`.

Each preset is lm-evaluation-harness's task of the same name, as data: the hub dataset and splits, how a
hub row becomes a multiple-choice record (`{"id", "query", "choices", "gold"}`; the query is lm-eval's
`doc_to_text`, the choices its `doc_to_choice`), the number of few-shot examples and how they are drawn,
and the headline metric.

| preset | lm-eval task | shots | drawn | metric |
|---|---|---|---|---|
| arc | arc_challenge | 25 | random (seed 1234) from train | acc_norm |
| hellaswag | hellaswag | 10 | random (seed 1234) from train | acc_norm |
| mmlu | the 57 mmlu_* tasks | 5 | the first 5 of the subject's dev split | acc, unweighted mean of subjects |
| truthfulqa | truthfulqa_mc2 | 0 | — | mc2 |
| truthfulqa_mc1 | truthfulqa_mc1 | 0 | — | acc (= mc1) |

Offline, a preset reads records already in that form from `--data` (and `--fewshot-data`); MMLU records
carry a `subject` field. With hub access, the records are converted from the hub rows here.

`Preset.metric` is the one declaration of a preset's headline metric: `zephyr eval mc` records it as
`metric` (and its value as `score`) in results.json, and the report's comparison table shows that metric.
The Open LLM Leaderboard v1 scored a model by the first four presets and their average (`OPEN_LLM_V1`,
`open_llm_average`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zephyr.core.errors import ConfigError, ZephyrError

# lm-eval's truthfulqa_mc1 / truthfulqa_mc2 doc_to_text: six fixed QA pairs before every question.
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Hub rows -> MC records (lm-eval's doc_to_text / doc_to_choice / doc_to_target of each task)


def arc_record(row: dict, index: int) -> dict:
    labels = list(row["choices"]["label"])
    return {
        "id": row.get("id", index),
        "query": f"Question: {row['question']}\nAnswer:",
        "choices": list(row["choices"]["text"]),
        "gold": labels.index(row["answerKey"]),
    }


def hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: the bracketed WikiHow artifacts out, double spaces folded."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_record(row: dict, index: int) -> dict:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "id": row.get("ind", index),
        "query": hellaswag_clean(row["activity_label"] + ": " + context),
        "choices": [hellaswag_clean(ending) for ending in row["endings"]],
        "gold": int(row["label"]),
    }


def mmlu_record(row: dict, index: int) -> dict:
    choices = row["choices"]
    query = f"{row['question'].strip()}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:"
    return {
        "id": f"{row['subject']}/{index}",
        "subject": row["subject"],
        "query": query,
        "choices": ["A", "B", "C", "D"],
        "gold": int(row["answer"]),
    }


def mmlu_description(subject: str) -> str:
    """The text before the few-shot examples of an MMLU subject (lm-eval's per-subject `description`)."""
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def truthfulqa_query(question: str) -> str:
    return TRUTHFULQA_PREAMBLE + "\n\nQ: " + question + "\nA:"


def truthfulqa_mc2_record(row: dict, index: int) -> dict:
    targets = row["mc2_targets"]
    return {
        "id": index,
        "query": truthfulqa_query(row["question"]),
        "choices": list(targets["choices"]),
        "gold": [i for i, label in enumerate(targets["labels"]) if label == 1],
    }


def truthfulqa_mc1_record(row: dict, index: int) -> dict:
    # mc1_targets lists the single true answer first (lm-eval: doc_to_target 0).
    return {
        "id": index,
        "query": truthfulqa_query(row["question"]),
        "choices": list(row["mc1_targets"]["choices"]),
        "gold": 0,
    }


# ---------------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    name: str
    lm_eval_task: str
    num_fewshot: int
    sampler: str  # "random": lm-eval's default sampler (seed 1234); "first_n": the pool's first k
    metric: str  # the headline metric in results.json (`score`)
    hub_path: str
    hub_config: str | None
    eval_split: str
    fewshot_split: str | None
    convert: Callable[[dict, int], dict]
    by_subject: bool = False  # MMLU: one task per subject, scored as the unweighted mean over subjects


PRESETS: dict[str, Preset] = {
    "arc": Preset(
        "arc", "arc_challenge", 25, "random", "acc_norm", "allenai/ai2_arc", "ARC-Challenge", "test", "train",
        arc_record,
    ),
    "hellaswag": Preset(
        "hellaswag", "hellaswag", 10, "random", "acc_norm", "Rowan/hellaswag", None, "validation", "train",
        hellaswag_record,
    ),
    "mmlu": Preset(
        "mmlu", "mmlu", 5, "first_n", "acc", "cais/mmlu", "all", "test", "dev", mmlu_record, by_subject=True
    ),
    "truthfulqa": Preset(
        "truthfulqa", "truthfulqa_mc2", 0, "random", "mc2", "truthfulqa/truthful_qa", "multiple_choice",
        "validation", None, truthfulqa_mc2_record,
    ),
    "truthfulqa_mc1": Preset(
        "truthfulqa_mc1", "truthfulqa_mc1", 0, "random", "acc", "truthfulqa/truthful_qa", "multiple_choice",
        "validation", None, truthfulqa_mc1_record,
    ),
}  # fmt: skip


# The Open LLM Leaderboard v1 as the Zephyr paper reports it (before Winogrande, GSM8K and DROP joined in
# November 2023): these four presets, each by its own metric.
OPEN_LLM_V1 = ("arc", "hellaswag", "mmlu", "truthfulqa")


def open_llm_average(percent: Mapping[str, float | None]) -> float | None:
    """The leaderboard's average of `percent` (preset name -> its headline metric × 100): the plain mean
    of the four, unrounded, as the leaderboard computed it (`sum(results) / len(Tasks)`, each result
    `mean * 100.0`; MMLU's result is already the unweighted mean of its subjects). None unless all four are
    there (the leaderboard divided whatever it had by four: a missing task read as a score of 0)."""
    values = [percent.get(name) for name in OPEN_LLM_V1]
    if any(value is None for value in values):
        return None
    return sum(value for value in values if value is not None) / len(OPEN_LLM_V1)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (expected one of {', '.join(PRESETS)})") from None


def hub_records(preset: Preset, split: str) -> list[dict]:
    """The records of one split of a preset's hub dataset, converted. Needs the hub (or its cache)."""
    source = f"hf:{preset.hub_path}" + (f" ({preset.hub_config})" if preset.hub_config else "") + f":{split}"
    try:
        import datasets
    except ImportError:
        raise ZephyrError(f"{source}: reading hub datasets needs the `datasets` package") from None
    try:
        rows: Any = datasets.load_dataset(preset.hub_path, preset.hub_config, split=split)
    # load_dataset fails in many ways (offline, unknown name, HTTP errors); to the user each means the same.
    except Exception as exc:
        raise ZephyrError(
            f"{source}: could not load the dataset ({type(exc).__name__}: {exc}). The Hugging Face hub is not "
            f"reachable from here (or HF_DATASETS_OFFLINE is set) and the dataset is not cached. Offline, pass "
            f"the items as MC JSONL with --data FILE (and the few-shot pool with --fewshot-data FILE), in the "
            f"form `zephyr.stages.mc.presets.{preset.convert.__name__}` writes."
        ) from exc
    return [preset.convert(dict(row), index) for index, row in enumerate(rows)]
