"""`zephyr cache`: what the cache folder holds, and pruning what has not been used.

The cache (`$ZEPHYR_CACHE`, default `$ZEPHYR_HOME/cache`) holds what zephyr can rebuild from a run's inputs:
tokenized data (`tokenized/KIND-FINGERPRINT/`, `zephyr.training.dataset`) and reference log-probs
(`ref_logps/FINGERPRINT.jsonl`, `zephyr.stages.dpo.reference`). A changed input makes a new item and never
removes the old one, so at the paper's scale (1.3 GiB per dSFT entry) a few changed recipes fill a disk:
`zephyr cache list` shows each item with its size and time of last use (a reuse touches it), and
`zephyr cache prune` removes those unused for a number of days, the least recently used beyond a size, or all.

Removing is safe while runs go on: a tokenized entry is removed only under its lock, taken without waiting
(a process building it or checking it before use holds the lock: the entry is kept and said to be in use),
and a process that already uses an entry has its arrays mapped, which Linux keeps readable after removal.
A reference table is read whole; one removed before its reading is recomputed. Lock files stay: removing
one another process has open would let two processes build the same entry at once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr import io
from zephyr.models import assets
from zephyr.training import dataset

DAY = 86400.0
UNFINISHED = "unfinished build"
REFERENCE = "reference log-probs"


@dataclass(frozen=True)
class Item:
    """One removable thing of the cache: a tokenized entry (kind: its data kind), a build's temporary folder
    (`UNFINISHED`), or a reference table (`REFERENCE`)."""

    path: Path
    kind: str
    nbytes: int
    last_used: float  # seconds since the epoch
    detail: str = ""  # what it holds and was made from

    @property
    def locked(self) -> bool:
        """Removed under the lock of a tokenized entry (its own, or the one it was being built for)."""
        return self.kind != REFERENCE


def items(root: Path) -> list[Item]:
    """Every item of the cache folder `root`, the least recently used first."""
    found = [*_tokenized(root / assets.TOKENIZED_CACHE), *_references(root / assets.REFERENCE_CACHE)]
    return sorted(found, key=_age_order)


def _tokenized(folder: Path) -> Iterator[Item]:
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if not path.is_dir():
            continue  # lock files and the data fingerprint memo
        try:
            used = path.stat().st_mtime
            if path.name.startswith(dataset.TMP_PREFIX):
                owner = dataset.owner_of(path).name
                yield Item(path, UNFINISHED, _folder_bytes(path), used, f"for {owner}")
            else:
                kind, meta = _meta(path)
                yield Item(path, kind, _folder_bytes(path), used, _describe(meta))
        except FileNotFoundError:  # removed by another process (a build's end, another prune) meanwhile
            continue


def _references(folder: Path) -> Iterator[Item]:
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile
            continue
        yield Item(path, REFERENCE, stat.st_size, stat.st_mtime)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _meta(entry: Path) -> tuple[str, dict[str, Any]]:
    """An entry's kind and meta.json (its name's kind and {} when meta.json is missing or unreadable)."""
    try:
        meta = json.loads((entry / dataset.META_FILE).read_text(encoding="utf-8"))
        return str(meta.get("kind") or entry.name.rsplit("-", 1)[0]), meta
    except (OSError, ValueError):
        return entry.name.rsplit("-", 1)[0], {}


def _describe(meta: dict[str, Any]) -> str:
    """Tokens and the data files an entry was made from (the key's `[path, fingerprint]` pairs)."""
    if not meta:
        return "damaged: no readable meta.json (rebuilt on next use)"
    tokens = meta.get("stats", {}).get("tokens")
    paths = [str(value[0]) for value in _pairs(meta.get("key", {}))]
    text = f"{tokens:,} tokens" if isinstance(tokens, int) else ""
    return "; ".join(part for part in (text, ", ".join(paths)) if part)


def _pairs(value: Any) -> Iterator[list[Any]]:
    """`[path, fingerprint]` lists anywhere in a key: how a key names its data sources."""
    if isinstance(value, dict):
        for inner in value.values():
            yield from _pairs(inner)
    elif isinstance(value, list):
        if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], str) and ":" in value[1]:
            yield value
        else:
            for inner in value:
                yield from _pairs(inner)


def select(
    found: Sequence[Item], *, now: float, unused_days: float | None = None, max_bytes: int | None = None
) -> list[Item]:
    """The items to prune, the least recently used first: those last used more than `unused_days` ago, then
    the least recently used of the others until what stays holds at most `max_bytes`; every item when
    neither is given."""
    if unused_days is None and max_bytes is None:
        return list(found)
    ordered = sorted(found, key=_age_order)
    unused = math.inf if unused_days is None else unused_days * DAY
    chosen = [item for item in ordered if now - item.last_used > unused]
    if max_bytes is not None:
        staying = [item for item in ordered if item not in chosen]
        size = sum(item.nbytes for item in staying)
        for item in staying:
            if size <= max_bytes:
                break
            chosen.append(item)
            size -= item.nbytes
    return sorted(chosen, key=_age_order)


def _age_order(item: Item) -> tuple[float, str]:
    return item.last_used, str(item.path)


def remove(item: Item) -> bool:
    """Remove `item`; False (kept) when a process holds the lock of its tokenized entry."""
    if not item.locked:
        item.path.unlink(missing_ok=True)
        return True
    entry = dataset.owner_of(item.path) if item.kind == UNFINISHED else item.path
    fd = dataset.try_lock(entry)
    if fd is None:
        return False
    try:
        if item.kind == UNFINISHED:
            shutil.rmtree(item.path, ignore_errors=True)
        else:  # gone at once under its name (a rename), then deleted: a kill in between leaves a build's leftover
            doomed = item.path.with_name(f"{dataset.TMP_PREFIX}{item.path.name}-{os.getpid()}")
            item.path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    finally:
        os.close(fd)
    return True


# ---------------------------------------------------------------------------------------------------------
# The command's text


def when(seconds: float, now: float) -> str:
    """A time of last use as people read it: local date and time, and how long ago."""
    ago = max(0.0, now - seconds)
    if ago < 3600:
        since = f"{ago / 60:.0f} min ago"
    elif ago < 2 * DAY:
        since = f"{ago / 3600:.0f} h ago"
    else:
        since = f"{ago / DAY:.0f} days ago"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(seconds))} ({since})"


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def list_lines(root: Path, found: Sequence[Item], now: float) -> list[str]:
    lines = [f"{root}: {_items(len(found))}, {io.bytes_text(sum(i.nbytes for i in found))}"]
    for item in found:
        detail = f"  {item.detail}" if item.detail else ""
        lines.append(
            f"  {io.bytes_text(item.nbytes):>10}  {when(item.last_used, now):32}  {item.kind:20}  "
            f"{item.path.relative_to(root)}{detail}"
        )
    return lines


def prune_lines(root: Path, chosen: Sequence[Item], dry_run: bool) -> list[str]:
    """Remove `chosen` (or only say what would go, with `dry_run`); a line per item and a total."""
    lines, freed, kept = [], 0, 0
    for item in chosen:
        name = item.path.relative_to(root)
        if dry_run:
            lines.append(f"would remove {name} ({io.bytes_text(item.nbytes)})")
            freed += item.nbytes
            continue
        try:
            removed = remove(item)
        except OSError as exc:  # a read-only or shared cache: say so and go on with the others
            kept += 1
            lines.append(f"kept {name}: cannot remove it ({exc.strerror or exc})")
            continue
        if not removed:
            kept += 1
            lines.append(f"kept {name}: in use by another process")
            continue
        lines.append(f"removed {name} ({io.bytes_text(item.nbytes)})")
        freed += item.nbytes
    verb = "would free" if dry_run else "freed"
    left = f"; {kept} kept" if kept else ""
    lines.append(f"{verb} {io.bytes_text(freed)} in {_items(len(chosen) - kept)}{left}")
    return lines
