"""The spec grammars (`zephyr.core.specs`), one parser per kind, and the readers that use them."""

from __future__ import annotations

import sys
import types

import pytest

from zephyr.core.errors import ZephyrError
from zephyr.core.specs import ModelSpec, parse_model_spec, parse_stage_ref


@pytest.mark.parametrize(
    ("spec", "parsed", "written_path"),
    [
        ("org/name", ModelSpec("transformers", "org/name", location="org/name"), None),  # a hub id
        ("./ckpt", ModelSpec("transformers", "./ckpt", location="./ckpt"), "./ckpt"),
        # a folder an earlier command may write (dpo.yaml's model: runs/.../sft/final), or a hub id
        ("runs/x/sft/final", ModelSpec("transformers", "runs/x/sft/final", location="runs/x/sft/final"), None),
        ("gpt2", ModelSpec("transformers", "gpt2", location="gpt2"), None),
        (
            "transformers:gpt2",
            ModelSpec("transformers", "transformers:gpt2", location="gpt2", explicit=True),
            None,
        ),
        ("asset:smollm2", ModelSpec("transformers", "asset:smollm2", asset="smollm2"), None),
        ("openai:gpt-4@https://h.example/v1/", ModelSpec("openai", "gpt-4", base_url="https://h.example/v1"), None),
        ("openai:gpt-4o", ModelSpec("openai", "gpt-4o", base_url="https://api.openai.com/v1"), None),
        ("vllm:./m", ModelSpec("vllm", "./m", location="./m"), "./m"),
        ("vllm:org/m", ModelSpec("vllm", "org/m", location="org/m"), None),
    ],
)  # fmt: skip
def test_model_specs_by_hand(spec, parsed, written_path):
    assert parse_model_spec(spec) == parsed
    assert parse_model_spec(spec).written_path == written_path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:org/m", "unknown backend 'hf'"),
        ("transformers:", "names no model"),
        ("asset:", "names no asset"),
        ("openai:a@b@c", "expected openai:MODEL@BASE_URL"),
        ("", "must be a non-empty string"),
    ],
)
def test_malformed_model_specs_are_errors_naming_them(spec, message):
    with pytest.raises(ZephyrError, match=message):
        parse_model_spec(spec)


def test_stage_references():
    assert parse_stage_ref("stage:curate") == ("curate", None)
    assert parse_stage_ref("stage:feedback:test") == ("feedback", "test")


def test_alpaca_eval_hub_sources_read_the_pinned_revision(monkeypatch):
    """Its instructions and length-control data are hub data specs: a revision reaches the hub client."""
    from zephyr.stages.alpaca_eval import run as alpaca

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *args, **kwargs: (
        calls.append((args, kwargs)) or [{"instruction": "Hi", "output": "Hello"}]
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    [item] = alpaca.read_instructions("hf:tatsu-lab/alpaca_eval@c0ffee:eval")
    assert item.instruction == "Hi"
    assert calls == [(("tatsu-lab/alpaca_eval", "alpaca_eval"), {"split": "eval", "revision": "c0ffee"})]

    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kwargs: asked.append(kwargs) or "x.csv")
    assert alpaca._lc_file("hf:tatsu-lab/alpaca_eval@c0ffee") == "x.csv"
    assert asked == [
        {
            "repo_id": "tatsu-lab/alpaca_eval",
            "filename": "df_gamed.csv",
            "repo_type": "dataset",
            "revision": "c0ffee",
        }
    ]
