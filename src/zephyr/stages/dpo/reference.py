"""Reference log-probs for DPO: `precomputed` (one pass before training, cached on disk), `online` (a
frozen model evaluated every step) or `none` (reference-free losses).

Precomputed. Before the first step, one no-grad pass of the reference over the train and eval pairs, in
large batches and under the run's autocast, so that at step 0 the policy's log-probs equal the reference's
but for the last bits (the pass groups pairs into other rows than the training step) and the loss is ln 2
(to 1e-6 in fp32). The reference is `ref_model` when set, else the initial policy;
with LoRA, the policy with its adapters disabled. Results are cached as
`$ZEPHYR_HOME/cache/ref_logps/<fingerprint>.jsonl` (the `zephyr logps` format, one file per split) and
reused by later epochs, resumed runs and other runs. The fingerprint hashes everything the numbers depend
on: the reference weights (sha256 of their safetensors files; of the state dict when there are no files),
the pairs' token ids (so the data, the chat template and the truncation lengths), the template text, the
lengths, the precision and the device type. A cache file that does not match its pairs is recomputed.

Online. The reference model is loaded from its spec (`ref_model`, else the policy's `model`) rather than
copied from the live policy, so it is the initial model even when a run resumes; with LoRA the policy runs
with adapters disabled instead, and no second model is held.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zephyr import io
from zephyr.core.errors import ZephyrError
from zephyr.training import logps as logps_mod
from zephyr.training.logps import LogpsTable, PairBatch
from zephyr.training.losses import PairLogps
from zephyr.training.pairs import TokenizedPair, token_parts

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached numbers' meaning changes
WEIGHTS_MEMO = "weights_sha256.json"  # in the cache folder: sha256 of weight files by path, size and mtime


# ---------------------------------------------------------------------------------------------------------
# Fingerprints (pure but for reading weight files)


def weights_fingerprint(folder: str | Path, memo_path: Path | None = None) -> str | None:
    """sha256 over the names and contents of a model folder's safetensors files; None when it has none.

    Hashing a 7B checkpoint reads 14 GB, so each file's sha256 is remembered in `memo_path` under its path,
    size and modification time, and read again only when one of them changes (`io.file_sha256`).
    """
    path = Path(folder)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{io.file_sha256(file, memo_path)}\0".encode())
    return digest.hexdigest()


def state_dict_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter and buffer names, dtypes, shapes and bytes (a model without weight files)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 over every pair's prompt_id and token ids (each part's length, then its ids as int32), in
    order; read from a `PairSet`'s arrays directly."""
    digest = hashlib.sha256()
    for prompt_id, *parts in token_parts(pairs):
        digest.update(prompt_id.encode() + b"\0")
        for ids in parts:
            digest.update(len(ids).to_bytes(8, "little") + np.asarray(ids, dtype="<i4").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything a reference log-prob depends on besides the pairs themselves."""

    weights: str  # weights fingerprint
    template: str  # the chat template's text
    max_length: int | None
    max_prompt_length: int | None
    precision: str  # the run's autocast: "no" | "bf16"
    device_type: str  # "cpu" | "cuda": kernels differ in the last bits
    prefix_sharing: bool = False  # other kernels and row shapes: the same numbers to float rounding
    # sha256 of the model's config.json: its numbers (rope, norm eps, softcapping, tied embeddings) change the
    # log-probs of the same weights
    config: str = ""

    def fingerprint(self, pairs: Sequence[TokenizedPair]) -> str:
        head: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "weights": self.weights,
            "template": hashlib.sha256(self.template.encode()).hexdigest(),
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "precision": self.precision,
            "device_type": self.device_type,
            "pairs": pairs_fingerprint(pairs),
        }
        if self.prefix_sharing:  # only when set, so that caches written without sharing keep their names
            head["prefix_sharing"] = True
        if self.config:
            head["config"] = self.config
        return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> Path:
    from zephyr.models import assets

    return assets.cache_home() / assets.REFERENCE_CACHE


def read_cache(path: Path, pairs: Sequence[TokenizedPair]) -> LogpsTable | None:
    """The cached table for `pairs`, or None when missing or not matching them (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        table = LogpsTable.from_rows(rows)
        found = [(r["prompt_id"], r["chosen_tokens"], r["rejected_tokens"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: unreadable reference cache (%s); recomputing", path, exc)
        return None
    expected = [(pid, len(chosen), len(rejected)) for pid, _, chosen, rejected in token_parts(pairs)]
    finite = bool(torch.isfinite(table.chosen).all() and torch.isfinite(table.rejected).all())
    if found != expected or not finite:
        logger.warning("%s: reference cache does not match its pairs; recomputing", path)
        return None
    with contextlib.suppress(OSError):  # its time of last use, for `zephyr cache prune`
        os.utime(path)
    return table


def write_cache(path: Path, table: LogpsTable, pairs: Sequence[TokenizedPair]) -> None:
    io.write_jsonl(path, table.rows([prompt_id for prompt_id, *_ in token_parts(pairs)]))


# ---------------------------------------------------------------------------------------------------------
# Passes


def sharded_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    batch_size: int,
    accelerator: Accelerator,
    prefix_sharing: bool = False,
) -> LogpsTable:
    """`compute_logps` with the pairs dealt round-robin to the processes and the results gathered.

    Every process runs the same number of batches (short shards repeat a pair), because sharded models
    (FSDP, ZeRO-3) gather weights collectively in every forward.
    """
    world = accelerator.num_processes
    device, autocast = accelerator.device, accelerator.autocast
    run = {"batch_size": batch_size, "device": device, "autocast": autocast, "prefix_sharing": prefix_sharing}
    if world == 1 or not pairs:
        return logps_mod.compute_logps(model, pairs, **run)
    from accelerate.utils import gather_object

    mine = list(range(accelerator.process_index, len(pairs), world))
    per_process = math.ceil(len(pairs) / world)
    mine += [mine[-1] if mine else 0] * (per_process - len(mine))
    table = logps_mod.compute_logps(model, _Picked(pairs, mine), **run)
    rows = [
        (
            i,
            float(table.chosen[k]),
            float(table.rejected[k]),
            int(table.chosen_tokens[k]),
            int(table.rejected_tokens[k]),
        )
        for k, i in enumerate(mine)
    ]
    by_index = {row[0]: row[1:] for row in gather_object(rows)}
    ordered = [by_index[i] for i in range(len(pairs))]
    return LogpsTable(
        torch.tensor([r[0] for r in ordered], dtype=torch.float64),
        torch.tensor([r[1] for r in ordered], dtype=torch.float64),
        torch.tensor([r[2] for r in ordered], dtype=torch.long),
        torch.tensor([r[3] for r in ordered], dtype=torch.long),
    )


class _Picked(Sequence[TokenizedPair]):
    """Some of a sequence's pairs, read when used (a shard of a memory-mapped set stays unread)."""

    def __init__(self, pairs: Sequence[TokenizedPair], indices: list[int]):
        self.pairs, self.indices = pairs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.pairs[k] for k in self.indices[i]]
        return self.pairs[self.indices[i]]


def adapters_disabled(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """A peft model with its adapters off (= the base model, the LoRA run's reference); else no-op."""
    from zephyr.scoring.forward import unwrap_model

    inner = unwrap_model(model)
    if not hasattr(inner, "peft_config"):
        return contextlib.nullcontext()
    disable = getattr(inner, "disable_adapter", None)
    if not callable(disable):  # adapters we cannot switch off would silently become part of the reference
        raise ZephyrError(f"{type(inner).__name__} has adapters that cannot be disabled; set dpo.ref_model")
    return disable()


def is_peft_model(model: torch.nn.Module) -> bool:
    from zephyr.scoring.forward import unwrap_model

    return hasattr(unwrap_model(model), "peft_config")


@dataclass
class PrecomputeResult:
    tables: dict[str, LogpsTable]
    status: dict[str, str]  # split -> "cached" | "computed"
    files: dict[str, Path]  # split -> cache file


def precompute(
    splits: Mapping[str, Sequence[TokenizedPair]],
    *,
    key: CacheKey,
    cache_dir: Path,
    reference_model: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]],
    accelerator: Accelerator,
    batch_size: int,
    prefix_sharing: bool = False,
) -> PrecomputeResult:
    """Reference tables for every split: read from the cache, or computed with the model that
    `reference_model()` yields (entered only when some split is missing) and written to the cache."""
    files = {name: cache_dir / f"{key.fingerprint(pairs)}.jsonl" for name, pairs in splits.items()}
    tables: dict[str, LogpsTable] = {}
    status: dict[str, str] = {}
    for name, pairs in splits.items():
        cached = read_cache(files[name], pairs)
        if cached is not None:
            tables[name], status[name] = cached, "cached"
    missing = [name for name in splits if name not in tables]
    if missing:
        with reference_model() as model:
            for name in missing:
                tables[name] = sharded_logps(
                    model,
                    splits[name],
                    batch_size=batch_size,
                    accelerator=accelerator,
                    prefix_sharing=prefix_sharing,
                )
                status[name] = "computed"
                if accelerator.is_main_process:
                    write_cache(files[name], tables[name], splits[name])
        accelerator.wait_for_everyone()
    for name in splits:
        logger.info(
            "reference log-probs (%s, %d pairs): %s %s", name, len(splits[name]), status[name], files[name]
        )
    return PrecomputeResult(tables, status, files)


# ---------------------------------------------------------------------------------------------------------
# What the DPO step asks of a reference


@dataclass
class Reference:
    """The reference log-probs of the DPO step, by `mode`: "precomputed" (`tables` per split, read by (split,
    index) when a micro-batch is collated), "online" (`model`, frozen, run without grad on every
    micro-batch; None: the policy with its LoRA adapters disabled) or "none" (reference-free losses).
    Not `ready` until `DPOTask.prepare` made it so: using it before is a programming error, said clearly."""

    mode: str
    tables: Mapping[str, LogpsTable] | None = None
    model: torch.nn.Module | None = None
    ready: bool = False

    def __post_init__(self) -> None:
        if self.model is not None:
            self.model.eval().requires_grad_(False)

    def select(self, split_indices: Sequence[tuple[str, int]]) -> PairLogps | None:
        """The precomputed log-probs of a micro-batch's pairs (CPU), for the collator; None in other modes."""
        self._check_ready()
        if self.tables is None:
            return None
        rows = [self.tables[split].select([index]) for split, index in split_indices]
        return PairLogps(
            torch.cat([r.chosen for r in rows]),
            torch.cat([r.rejected for r in rows]),
            torch.cat([r.chosen_tokens for r in rows]),
            torch.cat([r.rejected_tokens for r in rows]),
        )

    def logps(self, policy_model: torch.nn.Module, batch: PairBatch) -> PairLogps | None:
        """The reference's per-pair log-probs for a micro-batch (None: reference-free)."""
        self._check_ready()
        if self.mode == "precomputed" and batch.reference is None:
            raise RuntimeError("a micro-batch without its precomputed reference: collate it with `select`")
        if self.mode != "online":
            return batch.reference
        with torch.no_grad():
            if self.model is not None:
                return logps_mod.pair_logps(self.model, batch)
            with adapters_disabled(policy_model):
                return logps_mod.pair_logps(policy_model, batch)

    def _check_ready(self) -> None:
        if not self.ready:
            raise RuntimeError(
                f"reference '{self.mode}' is not prepared: call task.prepare(model, accelerator) first"
            )


def ensure_cache_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZephyrError(f"reference cache folder {path}: {exc.strerror or exc}") from exc
    return path
