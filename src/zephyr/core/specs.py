"""The grammar of the specs a recipe or command line names models and data with: one parser per kind.

- model spec: `transformers:PATH_OR_HUB_ID`, `asset:NAME`, `openai:MODEL[@BASE_URL]`, `vllm:PATH_OR_HUB_ID`,
  or a bare path (= `transformers:`);
- hub data spec: `hf:NAME[@REVISION][:SPLIT]` (a dataset; the part after `:` is a file for sources that read
  one file of a hub repository, such as AlpacaEval's length-control data);
- stage reference: `stage:NAME[:PART]` (another stage's output in a pipeline run).

Parsing is pure (no loading, no network). Configs parse every model and data field when they are built, so a
bad spec fails with the recipe key; the adapters that load a model or read data parse it with these same
functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zephyr.core.errors import DataError, ZephyrError

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
_OPENAI = re.compile(r"^(?P<model>.+)@(?P<url>https?://\S+)$")
_PREFIX = re.compile(r"^(?P<prefix>[A-Za-z][\w-]*):(?!//)")
_KNOWN_PREFIXES = ("transformers", "asset", "openai", "vllm")
# `namespace/name` as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
# With an explicit `transformers:` prefix a legacy single-name hub id (`gpt2`) is accepted too.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    `model` is what the backend is given: for transformers the spec as written (the local loader resolves
    it), for vllm its PATH_OR_HUB_ID, for openai the remote model's name. `asset` is the asset name of
    `asset:NAME`; `location` the PATH_OR_HUB_ID of a local backend (None for assets and remote models).
    """

    backend: Literal["transformers", "openai", "vllm"]
    model: str
    base_url: str | None = None
    asset: str | None = None
    location: str | None = None
    explicit: bool = False  # written `transformers:...`: a single-name hub id (`gpt2`) is then allowed

    @property
    def may_be_hub_id(self) -> bool:
        """Whether `location` can name a hub repository when no such local folder exists."""
        path = self.location
        if path is None or path.startswith((".", "/", "~")) or path.endswith("/") or "\\" in path:
            return False
        return bool(_HUB_ID.match(path) or (self.explicit and _HUB_NAME.match(path)))

    @property
    def written_path(self) -> str | None:
        """The location when it is written as a path (`/`, `./`, `../`, `~`): a folder that must exist before
        a run starts. Other locations may be hub ids, or folders an earlier command writes."""
        path = self.location
        return path if path is not None and path.startswith(("/", "./", "../", "~")) else None


def parse_model_spec(spec: str) -> ModelSpec:
    """The backend and target a model spec names (module docstring); a malformed one is an error naming it."""
    if not isinstance(spec, str) or not spec.strip():
        raise ZephyrError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("openai:"):
        rest = spec.removeprefix("openai:")
        match = _OPENAI.match(rest)
        model, url = (match["model"], match["url"]) if match else (rest, DEFAULT_OPENAI_URL)
        if not model or ("@" in model and not match):
            raise ZephyrError(
                f"model spec {spec!r}: expected openai:MODEL@BASE_URL (BASE_URL starts with http)"
            )
        return ModelSpec("openai", model, base_url=url.rstrip("/"))
    if spec.startswith("vllm:"):
        path = spec.removeprefix("vllm:")
        if not path:
            raise ZephyrError(f"model spec {spec!r} names no model")
        asset, location = _local_target(path)
        return ModelSpec("vllm", path, asset=asset, location=location)
    prefix = _PREFIX.match(spec)
    if prefix and prefix["prefix"] not in _KNOWN_PREFIXES and not Path(spec).exists():
        raise ZephyrError(
            f"model spec {spec!r}: unknown backend {prefix['prefix']!r}; use transformers:PATH_OR_HUB_ID, "
            "asset:NAME, openai:MODEL@BASE_URL, vllm:PATH_OR_HUB_ID or a path"
        )
    explicit = spec.startswith("transformers:")
    target = spec.removeprefix("transformers:")
    if not target:
        raise ZephyrError(f"model spec {spec!r} names no model")
    asset, location = _local_target(target)
    return ModelSpec("transformers", spec, asset=asset, location=location, explicit=explicit)


def _local_target(target: str) -> tuple[str | None, str | None]:
    """(asset name, None) for `asset:NAME`, else (None, PATH_OR_HUB_ID)."""
    if target.startswith("asset:"):
        name = target.removeprefix("asset:")
        if not name:
            raise ZephyrError(f"model spec {target!r} names no asset")
        return name, None
    return None, target


@dataclass(frozen=True)
class HubSpec:
    """A hub dataset: `hf:NAME[@REVISION][:SPLIT]`. The revision (a commit, tag or branch) pins the data;
    without one the hub's latest is read, which may change between runs."""

    name: str
    revision: str | None = None
    split: str | None = None


HUB_SPEC = re.compile(r"hf:(?P<name>[^@:\s]+)(?:@(?P<revision>[^@:\s]+))?(?::(?P<split>[^@:\s]+))?")


def is_hub_spec(source: str) -> bool:
    """Whether a data source names the hub (`hf:...`) rather than a local file."""
    return source.startswith("hf:")


def parse_hub_spec(source: str) -> HubSpec:
    """`hf:NAME[@REVISION][:SPLIT]` into its parts; anything else is an error naming the source."""
    match = HUB_SPEC.fullmatch(source)
    if match is None:
        example = "hf:HuggingFaceH4/ultrachat_200k@COMMIT:train_sft"
        raise DataError(f"{source}: expected hf:NAME[@REVISION][:SPLIT], e.g. {example}")
    return HubSpec(match["name"], match["revision"], match["split"])


STAGE_REF = "stage:"  # `stage:NAME[:PART]`: another stage's output, which `zephyr run` resolves to a path


def parse_stage_ref(value: str) -> tuple[str, str | None]:
    """`stage:NAME[:PART]` into (NAME, PART or None); the pipeline checks both against the stage table."""
    name, _, part = value.removeprefix(STAGE_REF).partition(":")
    return name, part or None


def is_local(value: str) -> bool:
    """A value that may name a local file: not empty, and no scheme (`stage:`, `hf:`, `asset:`, `openai:`)."""
    return bool(value) and ":" not in value.split("/")[0]
