"""Model specs, tokenizer loading with chat templates, end-of-turn detection, generation settings."""

from __future__ import annotations

import functools

import pytest

from zephyr.core.errors import ZephyrError
from zephyr.data import chat
from zephyr.data.chat import end_of_turn
from zephyr.models import assets
from zephyr.models.generation_config import configure_generation
from zephyr.models.load import (
    load_model,
    load_tokenizer,
    resolve_model_path,
)


@functools.cache
def cached_tokenizer(path: str, chat_template: str = "auto"):
    """load_tokenizer, once per (folder, template): loading SmolLM2's tokenizer takes about a second."""
    return load_tokenizer(path, chat_template=chat_template)


# ---------------------------------------------------------------------------------------------------------
# resolve_model_path


def test_resolve_asset_spec(mistral_tokenizer_dir):
    assert resolve_model_path("asset:mistral-7b-tokenizer") == str(mistral_tokenizer_dir)


def test_resolve_local_paths(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(f"transformers:{tmp_path}") == str(tmp_path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("transformers:HuggingFaceH4/zephyr-7b-beta", "HuggingFaceH4/zephyr-7b-beta"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("transformers:gpt2", "gpt2"),  # a single-name hub id only with the explicit prefix
    ],
)
def test_resolve_hub_ids(spec, expected):
    assert resolve_model_path(spec) == expected


@pytest.mark.parametrize(
    "spec", ["openai:gpt-4o@https://api.openai.com/v1", "vllm:HuggingFaceH4/zephyr-7b-beta"]
)
def test_backend_specs_are_not_local_models(spec):
    with pytest.raises(ZephyrError, match="generation backend spec, not a local model"):
        resolve_model_path(spec)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("./no-such-checkpoint", "'no-such-checkpoint'"),
        ("/no/such/dir", "'/no/such/dir'"),
        ("checkpoint-typo", "'checkpoint-typo'"),  # bare single names are local folders, not hub ids
        ("transformers:runs/x/", "'runs/x'"),
    ],
)
def test_missing_local_path_is_named(spec, named):
    with pytest.raises(ZephyrError, match="no such folder") as info:
        resolve_model_path(spec)
    assert named in str(info.value)


def test_unknown_asset_spec():
    with pytest.raises(assets.AssetError, match="unknown asset 'nope'"):
        resolve_model_path("asset:nope")


# ---------------------------------------------------------------------------------------------------------
# load_tokenizer


def test_auto_template_keeps_the_tokenizers_own(smollm_dir, mistral_tokenizer_dir):
    smol = load_tokenizer(str(smollm_dir))
    assert "SmolLM" in smol.chat_template  # SmolLM2's own ChatML, with its default system prompt
    mistral = load_tokenizer("asset:mistral-7b-tokenizer")
    assert mistral.chat_template == chat.builtin_template("zephyr")


def test_auto_template_falls_back_to_zephyr(tmp_path, mistral_tokenizer_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    tok = load_tokenizer(str(tmp_path), chat_template="auto")
    assert tok.chat_template == chat.builtin_template("zephyr")


def test_named_and_file_templates(smollm_dir, tmp_path):
    assert load_tokenizer(str(smollm_dir), chat_template="chatml").chat_template == chat.builtin_template(
        "chatml"
    )
    assert load_tokenizer(str(smollm_dir), chat_template="zephyr").chat_template == chat.builtin_template(
        "zephyr"
    )
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert load_tokenizer(str(smollm_dir), chat_template=str(path)).chat_template == path.read_text()


@pytest.mark.parametrize("choice", ["llama3", "missing.jinja"])
def test_bad_template_choice(smollm_dir, choice):
    with pytest.raises(ZephyrError, match=choice):
        load_tokenizer(str(smollm_dir), chat_template=choice)


def test_pad_token_is_an_existing_token(mistral_tokenizer_dir, smollm_dir):
    mistral = cached_tokenizer(str(mistral_tokenizer_dir))
    assert (mistral.pad_token, mistral.pad_token_id) == ("<unk>", 0)  # Mistral has none of its own
    assert len(mistral) == 32000  # nothing added
    smol = cached_tokenizer(str(smollm_dir))
    assert smol.pad_token == "<|im_end|>"  # SmolLM2's own


# ---------------------------------------------------------------------------------------------------------
# end_of_turn and configure_generation


def test_end_of_turn_of_the_builtin_templates(mistral_tokenizer_dir, smollm_dir):
    assert end_of_turn(cached_tokenizer(str(mistral_tokenizer_dir), "zephyr")) == ("</s>", 2)
    assert end_of_turn(cached_tokenizer(str(smollm_dir), "chatml")) == ("<|im_end|>", 2)
    assert end_of_turn(cached_tokenizer(str(smollm_dir))) == ("<|im_end|>", 2)
    # Zephyr's template ends turns with the eos token, whatever the tokenizer calls it.
    assert end_of_turn(cached_tokenizer(str(smollm_dir), "zephyr")) == ("<|im_end|>", 2)


def test_end_of_turn_after_whitespace(tmp_path, smollm_dir):
    path = tmp_path / "spaced.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['content'] + ' <|endoftext|>' }}{% endfor %}", encoding="utf-8"
    )
    assert end_of_turn(load_tokenizer(str(smollm_dir), chat_template=str(path))) == ("<|endoftext|>", 0)


def test_chatml_on_a_tokenizer_without_im_end_is_refused(mistral_tokenizer_dir):
    tok = cached_tokenizer(str(mistral_tokenizer_dir), "chatml")
    with pytest.raises(chat.TemplateError, match="no special token"):
        end_of_turn(tok)


def test_configure_generation_stops_at_end_of_turn(mistral_tokenizer_dir, tiny_llama_factory):
    tok = cached_tokenizer(str(mistral_tokenizer_dir))
    model = tiny_llama_factory(vocab_size=len(tok))
    model.generation_config.eos_token_id = 7  # whatever a base model came with
    config = configure_generation(model, tok)
    assert config is model.generation_config
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (2, 0, 1)


def test_configure_generation_keeps_plain_eos_when_it_differs(tmp_path, smollm_dir, tiny_llama_factory):
    path = tmp_path / "eot.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['content'] + '<|endoftext|>' }}{% endfor %}", encoding="utf-8"
    )
    tok = load_tokenizer(str(smollm_dir), chat_template=str(path))
    model = tiny_llama_factory(vocab_size=len(tok))
    config = configure_generation(model, tok)
    assert config.eos_token_id == [0, 2]  # <|endoftext|> ends the turn; <|im_end|> is the tokenizer's eos
    assert config.pad_token_id == 2


# ---------------------------------------------------------------------------------------------------------
# load_model


def test_load_model_reads_safetensors_in_the_asked_dtype(tmp_path, tiny_llama_factory):
    import torch

    tiny = tiny_llama_factory(vocab_size=64)
    tiny.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    assert load_model(f"transformers:{tmp_path}", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_model_refuses_pickled_weights(tmp_path, tiny_llama_factory):
    import torch

    tiny = tiny_llama_factory(vocab_size=64)
    tiny.config.save_pretrained(tmp_path)
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ZephyrError, match=r"no \.safetensors weights"):
        load_model(str(tmp_path))
