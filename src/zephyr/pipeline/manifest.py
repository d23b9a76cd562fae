"""The run folder's manifest: what each stage of `zephyr run` did, and what it was made from.

`manifest.json` holds, per stage id, a status (`running` while it works, so a killed run shows where it
stopped; `done`; `failed` with the error), the fingerprint of the stage's inputs, timings, attempts and its
output files, plus the package versions of the run. It is rewritten atomically (write, fsync, rename) at
every change of state, so a crash never leaves it half-written.

A stage's fingerprint hashes its resolved config, the fingerprints of the stages it reads from, and the
content of the local files it reads: a stage is redone exactly when one of those changed. Hub datasets
(`hf:NAME[@REVISION][:SPLIT]`) are recorded per stage with their revision: a pinned one names the exact data;
an unpinned one (`revision: null`) read whatever the hub held when the stage ran.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.core.specs import is_hub_spec, parse_hub_spec
from zephyr.io import write_text

MANIFEST = "manifest.json"
HASH_LIMIT = 256 << 20  # files up to this size are hashed by content; larger ones by size and mtime


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    status: str = "pending"  # running | done | failed | stale (a step it reads was redone after it)
    fingerprint: str = ""
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    attempts: int = 0
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    zephyr: str = ""  # the zephyr version that made the outputs (a later one keeps them; the run says so)
    inputs: dict[str, str] = field(default_factory=dict)  # digest per input part: what changed, on a redo
    # hub datasets read, by config field: {"dataset", "revision" (null: unpinned), "split"}
    datasets: dict[str, dict[str, str | None]] = field(default_factory=dict)


@dataclass
class Manifest:
    recipe: str
    run_dir: str
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    versions: dict[str, str] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        stages = {k: StageRecord(**v) for k, v in data.get("stages", {}).items()}
        return cls(**{**data, "stages": stages})


def load_manifest(run_dir: Path, recipe: str) -> Manifest:
    """The run's manifest, or a new one; an unreadable manifest is an error (never silently replaced)."""
    path = run_dir / MANIFEST
    if not path.exists():
        return Manifest(recipe=recipe, run_dir=str(run_dir))
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise ZephyrError(
            f"{path}: not a zephyr manifest ({exc}); move it away to start the run over"
        ) from None


def save_manifest(manifest: Manifest, run_dir: Path) -> None:
    manifest.updated = now()
    write_text(run_dir / MANIFEST, json.dumps(manifest.to_dict(), indent=2) + "\n")  # atomic, durable


# ---------------------------------------------------------------------------------------------------------
# Fingerprints


def path_fingerprint(path: Path) -> str:
    """Content hash of a file, or of a folder's files (names, sizes and content up to HASH_LIMIT each)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else ''}\0{stat.st_size}\0".encode())
        if stat.st_size > HASH_LIMIT:
            digest.update(str(stat.st_mtime_ns).encode())
            continue
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def input_parts(config: Any, upstream: Mapping[str, str], files: Mapping[str, str]) -> dict[str, str]:
    """A digest per part of a stage's inputs (`config`, `upstream ID`, `file FIELD`), so that a redone stage
    can say which one changed."""
    config_digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "config": config_digest[:16],
        **{f"upstream {name}": value[:16] for name, value in upstream.items()},
        **{f"file {name}": value[:16] for name, value in files.items()},
    }


def hub_datasets(config: Any) -> dict[str, dict[str, str | None]]:
    """The hub datasets a stage's config reads (`hf:` values of its top-level fields), each with the revision
    it pins (None: the hub's latest at run time) and its split."""
    values = asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config)
    found = {}
    for name, value in values.items():
        if isinstance(value, str) and is_hub_spec(value):
            spec = parse_hub_spec(value)
            found[name] = {"dataset": spec.name, "revision": spec.revision, "split": spec.split}
    return found


def redo_reason(before: Mapping[str, str], now: Mapping[str, str]) -> str:
    """Why a stage runs afresh, from its input parts then and now: `config changed, sft redone`; "" when
    nothing recorded tells (a new stage, or one recorded without parts)."""
    if not before:
        return ""
    reasons = []
    for key in sorted(before.keys() | now.keys()):
        if before.get(key) == now.get(key):
            continue
        kind, _, name = key.partition(" ")
        reasons.append(
            {"config": "config changed", "upstream": f"{name} redone"}.get(kind, f"{name} changed")
        )
    return ", ".join(reasons)


def fingerprint(kind: str, config: Any, upstream: Mapping[str, str], files: Mapping[str, str]) -> str:
    """A stage's fingerprint from its kind, its resolved config, upstream fingerprints and input files."""
    payload = {"kind": kind, "config": config, "upstream": dict(upstream), "files": dict(files)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Versions


def package_versions() -> dict[str, str]:
    """What made the run: Python, zephyr and the libraries whose behaviour shapes the numbers."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("zephyr", "torch", "transformers", "accelerate", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["device"] = _device_name()
    return versions


def _device_name() -> str:
    try:
        import torch
    except ImportError:
        return "unknown"
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"
