"""Shared fixtures: offline assets and tiny random models built in process (no hub, no network)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' cache (tokenized data, reference log-probs) is their own, removed at the end: their entries
# name temporary files and would pile up in the user's cache run after run. Child processes inherit it.
_CACHE = tempfile.mkdtemp(prefix="zephyr-test-cache-")
os.environ["ZEPHYR_CACHE"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: at that size the threads of a pool only wait on each
    other, and on cores shared with other work two spinning threads make decoding tens of times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder (the `smollm2-135m-instruct` asset)."""
    from zephyr.models import assets

    return assets.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def mistral_tokenizer_dir():
    """Zephyr's tokenizer (Mistral-7B-v0.1's, with the Zephyr chat template)."""
    from zephyr.models import assets

    return assets.fetch("mistral-7b-tokenizer")


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer random Llama (GQA) small enough for CPU tests in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.float().eval()


@pytest.fixture
def tiny_llama_factory():
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir):
    """A tiny random Llama saved with the SmolLM2 tokenizer (and its chat template): a model folder that
    every stage accepts, trained or served in milliseconds."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
