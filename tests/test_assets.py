"""Offline assets: the fetch mechanics on a fake wheel, and the real assets from the cache.

The real assets come from `make test`'s `zephyr assets fetch ...` step (the fixtures fetch them if missing).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from zephyr.core.errors import AssetError
from zephyr.models import assets

# ---------------------------------------------------------------------------------------------------------
# Mechanics, on a wheel built in the test (no network)

PAYLOAD = b"hello asset\n"
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """A registered asset whose 'download' copies a local wheel; ZEPHYR_HOME in tmp_path."""
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/data/file.txt", PAYLOAD)
    downloads = []

    def download(requirement, dest):
        downloads.append(requirement)
        dest.mkdir(parents=True)
        return wheel

    def make(build=None, sha256=PAYLOAD_SHA256):
        info = assets.AssetInfo(
            name="fake",
            description="a test asset",
            package="fake-pkg==1.0",
            license="MIT",
            sources=(assets.SourceFile("fake_pkg/data/file.txt", sha256, "sub/file.txt"),),
            build=build,
        )
        monkeypatch.setattr(assets, "_ASSETS", (info,))
        return info

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "_download_wheel", download)
    make.downloads = downloads
    return make


def test_fetch_builds_verifies_and_is_idempotent(fake_asset, tmp_path):
    fake_asset()
    assert not assets.is_fetched("fake")
    folder = assets.fetch("fake")
    assert folder == tmp_path / "home" / "assets" / "fake"
    assert (folder / "sub" / "file.txt").read_bytes() == PAYLOAD
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["files"]["sub/file.txt"] == {"size": 12, "sha256": PAYLOAD_SHA256}
    assert assets.is_fetched("fake")
    assert assets.fetch("fake") == folder
    assert fake_asset.downloads == ["fake-pkg==1.0"]  # the second fetch downloaded nothing
    assets.fetch("fake", force=True)
    assert fake_asset.downloads == ["fake-pkg==1.0", "fake-pkg==1.0"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [".fake.lock", "fake"]  # no leftovers


def test_checksum_mismatch_refuses_the_file(fake_asset, tmp_path):
    fake_asset(sha256="0" * 64)
    with pytest.raises(AssetError, match=r"fake_pkg/data/file\.txt has sha256 [0-9a-f]{64}, expected 0000"):
        assets.fetch("fake")
    assert not (tmp_path / "home" / "assets" / "fake").exists()


def test_interrupted_build_leaves_no_folder(fake_asset, tmp_path):
    def build(src, out):
        (out / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    fake_asset(build=build)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fake")
    assert [p.name for p in (tmp_path / "home" / "assets").iterdir()] == [".fake.lock"]
    assert not assets.is_fetched("fake")


def test_damaged_folder_is_not_fetched(fake_asset):
    folder = assets.fetch(fake_asset().name)
    (folder / "sub" / "file.txt").write_bytes(b"truncated")
    assert not assets.is_fetched("fake")
    with pytest.raises(AssetError, match="is not fetched"):
        assets.verify("fake")
    assets.fetch("fake")
    assert (folder / "sub" / "file.txt").read_bytes() == PAYLOAD
    assets.verify("fake")


def test_stale_temporary_folders_are_removed(fake_asset, tmp_path):
    fake_asset()
    stale = tmp_path / "home" / "assets" / ".tmp-fake-killed"
    stale.mkdir(parents=True)
    assets.fetch("fake")
    assert not stale.exists()


def test_unreachable_registry_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(AssetError, match=r"could not download zephyr-no-such-pkg==0\.0\.1 .*registry"):
        assets._download_wheel("zephyr-no-such-pkg==0.0.1", tmp_path / "dl")


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(AssetError) as info:
        assets.fetch("gpt-5")
    message = str(info.value)
    assert "unknown asset 'gpt-5'" in message
    known = ("smollm2-135m-instruct", "mistral-7b-tokenizer", "mt-bench", "alpaca-eval-templates")
    for name in (*known, "ultrafeedback-templates"):
        assert name in message


def test_home_follows_zephyr_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    assert assets.asset_dir("mt-bench") == tmp_path / "assets" / "mt-bench"
    monkeypatch.delenv("ZEPHYR_HOME")
    assert assets.home() == Path.home() / ".cache" / "zephyr"


# ---------------------------------------------------------------------------------------------------------
# The real assets (from the cache)


def test_second_fetch_builds_nothing_and_returns_the_same_folder(smollm_dir, monkeypatch):
    def no_build(info, staging):
        raise AssertionError(f"{info.name} was downloaded and built again")

    monkeypatch.setattr(assets, "_build", no_build)
    again = assets.fetch("smollm2-135m-instruct")
    assert again == smollm_dir
    assert assets.is_fetched("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Plain transformers calls on the folder: it is a standard checkpoint, nothing zephyr-specific.
    return AutoModelForCausalLM.from_pretrained(smollm_dir).eval(), AutoTokenizer.from_pretrained(smollm_dir)


def test_smollm_folder_is_a_standard_safetensors_checkpoint(smollm_dir, smollm):
    model, tokenizer = smollm
    files = sorted(p.name for p in smollm_dir.iterdir())
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".gguf")) for name in files)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # 134.5M with tied embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in json.loads((smollm_dir / "config.json").read_text())
    assert tokenizer.eos_token == "<|im_end|>"


def test_smollm_generation_config_stops_at_im_end(smollm):
    model, tokenizer = smollm
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == im_end


@pytest.mark.slow
def test_smollm_answers_paris(smollm):
    import torch

    model, tokenizer = smollm
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer
    assert answer.endswith("<|im_end|>")  # stopped at the end of its turn


def test_mistral_tokenizer_matches_sentencepiece(mistral_tokenizer_dir):
    import sentencepiece
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_dir / "tokenizer.model"))
    assert tok("Hello world")["input_ids"] == [1, 22557, 1526]  # Mistral's ids: <s> ▁Hello ▁world
    assert (tok.bos_token, tok.eos_token, tok.unk_token, len(tok)) == ("<s>", "</s>", "<unk>", 32000)
    texts = [
        "naïve café, 日本語 and an emoji 🤖",
        "def f(x):\n\treturn x**2  # square\n    indented",  # runs of spaces: score-ranked merges
        "Zephyr-7B-β scored 7.34 on MT-Bench.",
    ]
    mt_bench = assets.fetch("mt-bench") / "question.jsonl"
    texts += [turn for line in mt_bench.read_text().splitlines() for turn in json.loads(line)["turns"]]
    # (Text that starts with a space is the known exception: no extra dummy-prefix piece.)
    mismatches = [t for t in texts if tok(t, add_special_tokens=False)["input_ids"] != sp.encode(t)]
    assert mismatches == []
    assert "<|assistant|>" in tok.chat_template


def test_mistral_tokenizer_checksums(mistral_tokenizer_dir):
    assets.verify("mistral-7b-tokenizer")
    digest = hashlib.sha256((mistral_tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert digest == "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def test_mt_bench_has_80_two_turn_questions():
    folder = assets.fetch("mt-bench")
    questions = [json.loads(line) for line in (folder / "question.jsonl").read_text().splitlines()]
    assert len(questions) == 80
    assert [q["question_id"] for q in questions] == list(range(81, 161))
    assert all(len(q["turns"]) == 2 for q in questions)
    assert {q["category"] for q in questions} == {
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
    }  # fmt: skip
    judges = [json.loads(line)["name"] for line in (folder / "judge_prompts.jsonl").read_text().splitlines()]
    assert "single-v1" in judges and "single-math-v1-multi-turn" in judges
    assert (folder / "reference_answer" / "gpt-4.jsonl").is_file()


def test_alpaca_eval_templates():
    folder = assets.fetch("alpaca-eval-templates")
    assert "{instruction}" in (folder / "alpaca_eval_gpt4" / "alpaca_eval.txt").read_text()
    assert (folder / "alpaca_eval_gpt4_turbo_fn" / "configs.yaml").is_file()


def test_ultrafeedback_templates():
    # distilabel's UltraFeedback task: a Jinja2 rubric per aspect and the module holding the system prompt
    folder = assets.fetch("ultrafeedback-templates")
    files = sorted(p.name for p in folder.iterdir() if p.name != assets.MANIFEST)
    assert files == [
        "helpfulness.jinja2",
        "honesty.jinja2",
        "instruction-following.jinja2",
        "truthfulness.jinja2",
        "ultrafeedback.py",
    ]
    for aspect in ("helpfulness", "honesty", "instruction-following", "truthfulness"):
        text = (folder / f"{aspect}.jinja2").read_text()
        assert "Instruction: {{ instruction }}" in text and "<text {{ loop.index }}> {{ generation }}" in text
    assert "_system_prompt: str = PrivateAttr(" in (folder / "ultrafeedback.py").read_text()
    assets.verify("ultrafeedback-templates")
