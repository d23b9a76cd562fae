"""Data files in and out: JSONL, JSON, Parquet and hub datasets, validated against `zephyr.data.schema`.

Reading checks every record and applies a bad-record policy: `error` stops at the first bad record with
`FILE:LINE: field: problem`; `skip` keeps the good records and counts the bad ones. Writing is atomic
(whole files) or durable line by line (outputs that a crashed run resumes from).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zephyr.core.errors import DataError, ZephyrError
from zephyr.core.specs import HubSpec as HubSpec  # hub data specs: one grammar, in zephyr.core.specs
from zephyr.core.specs import is_hub_spec, parse_hub_spec
from zephyr.data.schema import FORMATS, ID_FIELDS, Problem, detect_format, json_type

logger = logging.getLogger(__name__)

BadRecordPolicy = Literal["error", "skip"]
SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class BadRecord:
    """A record left out under the `skip` policy, by its first problem. `line` is 1-based (Parquet and hub
    datasets: the row number + 1)."""

    line: int
    field: str
    problem: str


@dataclass
class ReadResult:
    """The valid records of a source, the bad ones, and how many records were examined in all."""

    records: list[dict]
    bad: list[BadRecord]
    source: str
    total: int
    fmt: str = ""  # the format the records were checked against (the detected one for "auto")


# A row as read from a source: its line, the decoded value, and a problem when it could not be decoded.
_Row = tuple[int, Any, Problem | None]


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_records(
    path: str | os.PathLike,
    fmt: str,
    on_bad_record: BadRecordPolicy = "error",
    limit: int | None = None,
) -> ReadResult:
    """Read and validate the records of `path` (`.jsonl`, `.json`, `.parquet`, `hf:NAME[@REVISION][:SPLIT]`).

    `fmt` is a key of `schema.FORMATS`, or "auto" to detect it from the first record whose keys match a
    format. A repeated record id (`prompt_id`; `id` for mc) is a problem of the later record. `limit` stops
    after that many valid records. An empty source is an error under either policy.
    """
    stream = RecordStream(path, fmt, on_bad_record, limit)
    records = [record for _, record in stream]
    return ReadResult(records, stream.bad, stream.source, stream.total, stream.fmt)


class RecordStream:
    """`read_records` one record at a time, for sources too large to hold: iterating yields (line, record)
    for every valid record; afterwards `bad`, `total` and `fmt` are what `read_records` reports. Arguments
    are checked when the stream is made, records when they are read."""

    def __init__(
        self,
        path: str | os.PathLike,
        fmt: str,
        on_bad_record: BadRecordPolicy = "error",
        limit: int | None = None,
    ):
        if fmt != "auto" and fmt not in FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.source = str(path)
        self.on_bad_record = on_bad_record
        self.limit = limit
        self.bad: list[BadRecord] = []
        self.total = 0
        self._checker = _RecordChecker(None if fmt == "auto" else fmt)

    @property
    def fmt(self) -> str:
        """The format the records were checked against (the detected one for "auto")."""
        return self._checker.fmt or ""

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        kept = 0
        for line, record, decode_problem in iter_rows(self.source):
            self.total += 1
            problem = decode_problem or self._checker.check(line, record)
            if problem is None:
                yield line, record
                kept += 1
                if self.limit is not None and kept >= self.limit:
                    break
            elif self.on_bad_record == "error":
                raise DataError(f"{self.source}:{line}: {problem.field}: {problem.message}")
            else:
                self.bad.append(BadRecord(line, problem.field, problem.message))
        if self.total == 0:
            raise DataError(f"{self.source}: no records (the file is empty)")
        if self.bad:
            logger.warning(
                "%s: skipped %d of %d records: %s",
                self.source,
                len(self.bad),
                self.total,
                _count_text(self.bad),
            )


class _RecordChecker:
    """Validates records one at a time, remembering the ids seen and, for "auto", the detected format."""

    def __init__(self, fmt: str | None):
        self.fmt = fmt
        self._seen: dict[Any, int] = {}  # id -> line of its first valid record

    def check(self, line: int, record: Any) -> Problem | None:
        if self.fmt is None:
            self.fmt = detect_format(record)
            if self.fmt is None:
                return _undetected(record)
        problems = FORMATS[self.fmt](record)
        if problems:
            return problems[0]
        key = ID_FIELDS[self.fmt]
        first = self._seen.setdefault(record[key], line)
        return None if first == line else Problem(key, f"duplicate of line {first}")


def _undetected(record: Any) -> Problem:
    if not isinstance(record, dict):
        return Problem("record", f"must be an object, got {json_type(record)}")
    return Problem("record", f"its keys match no format ({', '.join(FORMATS)})")


def iter_rows(source: str) -> Iterator[_Row]:
    """(line, decoded value, decode problem or None) of every record of a source, before any schema check:
    for readers of files that are not one of the record formats (prompt lists, say)."""
    if is_hub_spec(source):
        return _iter_hub(source)
    path = Path(source)
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"{source}: unsupported file type (expected {', '.join(SUFFIXES)} or hf:NAME[@REVISION][:SPLIT])"
        )
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    readers = {".jsonl": _iter_jsonl, ".json": _iter_json_list, ".parquet": _iter_parquet}
    return readers[path.suffix](source)


def _iter_jsonl(source: str) -> Iterator[_Row]:
    """One record per line. Lines are decoded one by one so that a bad byte is reported with its line."""
    with open(source, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors write
            if raw.strip():
                yield line, *_decode_line(raw)


def _decode_line(raw: bytes) -> tuple[Any, Problem | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, Problem(
            "record", f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
        )
    try:
        # Without its line break, an error at the end of a cut line is placed on this line, not the next.
        return json.loads(text.rstrip("\r\n")), None
    except json.JSONDecodeError as exc:
        # ("Unterminated string starting at" + " at column 7": say "at" once)
        return None, Problem("record", f"invalid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}")
    except RecursionError:  # json's decoder recurses once per level: `[[[[...` exhausts the stack
        return None, Problem(
            "record", f"invalid JSON: nested too deeply (over {sys.getrecursionlimit()} levels)"
        )


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _past_space(text: str, pos: int) -> int:
    """The position after JSON whitespace from `pos` (the pattern matches everywhere, if only "")."""
    match = _JSON_SPACE.match(text, pos)
    return match.end() if match is not None else pos


def _iter_json_list(source: str) -> Iterator[_Row]:
    """A JSON array of records; each record's line is the line its value starts on.

    The file is one JSON value, so a syntax error or a bad byte breaks all of it: that is an error under
    either policy.
    """
    data = Path(source).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{source}:{line}: record: not valid UTF-8: byte 0x{data[exc.start]:02x}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{source}:{exc.lineno}: record: invalid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except RecursionError:
        raise DataError(f"{source}:1: record: invalid JSON: nested too deeply") from None
    if not isinstance(value, list):
        raise DataError(
            f"{source}:1: record: a .json file must hold a list of records, got {json_type(value)}"
        )
    # Walk the array again to learn where each element starts (json.loads keeps no positions).
    decoder = json.JSONDecoder()
    pos = _past_space(text, 0) + 1  # past "["
    line = 1 + text.count("\n", 0, pos)
    for _ in value:
        start = _past_space(text, pos)
        line += text.count("\n", pos, start)
        record, end = decoder.raw_decode(text, start)
        yield line, record, None
        line += text.count("\n", start, end)
        pos = _past_space(text, end) + 1  # past "," or "]"
        line += text.count("\n", end, pos)


def _iter_parquet(source: str) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{source}: not a readable Parquet file ({exc})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record, None


def _iter_hub(source: str) -> Iterator[_Row]:
    for row, record in enumerate(_load_hub(source), start=1):
        yield row, record, None


def _load_hub(source: str) -> Any:
    """`hf:NAME[@REVISION][:SPLIT]` (default split: train) through `datasets.load_dataset`."""
    spec = parse_hub_spec(source)
    try:
        import datasets
    except ImportError:
        raise ZephyrError(f"{source}: reading hub datasets needs the `datasets` package") from None
    pinned = {"revision": spec.revision} if spec.revision else {}
    try:
        dataset = datasets.load_dataset(spec.name, split=spec.split or "train", **pinned)
    # load_dataset fails in many ways (offline, unknown name or split, HTTP errors); each means the same to
    # the user: this source cannot be read here.
    except Exception as exc:
        raise ZephyrError(
            f"{source}: could not load the dataset ({type(exc).__name__}: {exc}); check the name, revision "
            "and split, and that the Hugging Face hub is reachable (HF_DATASETS_OFFLINE unset) or the "
            "dataset is cached"
        ) from exc
    return dataset


def source_fingerprint(source: str, memo: str | os.PathLike | None = None) -> str:
    """What identifies the content of a data source: the sha256 of a local file (remembered in `memo`, see
    `file_sha256`); a hub dataset's spec when it pins a revision, else the fingerprint `datasets` gives the
    copy it reads."""
    if is_hub_spec(source):
        if parse_hub_spec(source).revision:
            return source
        return f"{source}#{_load_hub(source)._fingerprint}"
    if not Path(source).is_file():
        raise DataError(f"{source}: no such file")
    return "sha256:" + file_sha256(source, memo)


# ---------------------------------------------------------------------------------------------------------
# Summaries


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _problem_kind(bad: BadRecord) -> tuple[str, str]:
    """What a bad record broke, with the details that vary from record to record folded away: indices in
    the field (`messages[3].role` -> `messages[*].role`; `[-1]`, the answer, is kept) and numbers in the
    problem (`duplicate of line 4` -> `duplicate of line #`), so one rule is counted once."""
    return re.sub(r"\[\d+\]", "[*]", bad.field), re.sub(r"\d+", "#", bad.problem)


def _count_text(bad: Sequence[BadRecord]) -> str:
    counts = Counter(_problem_kind(b)[0] for b in bad)
    return ", ".join(f"{field_path} {n}" for field_path, n in counts.most_common())


def summarize(result: ReadResult, path: str | os.PathLike, fmt: str) -> str:
    """A report of a read: `FILE: N records ok (FORMAT), K skipped`, then, when records were skipped, a
    table of the problems: count, field and the first example's problem and line."""
    shown_fmt = result.fmt or fmt
    lines = [f"{path}: {_plural(len(result.records), 'record')} ok ({shown_fmt}), {len(result.bad)} skipped"]
    if not result.bad:
        return lines[0]
    first: dict[tuple[str, str], BadRecord] = {}
    for bad in result.bad:
        first.setdefault(_problem_kind(bad), bad)
    counts = Counter(_problem_kind(b) for b in result.bad)
    width = max(len(field_kind) for field_kind, _ in counts)
    lines.append(f"  {'count':>5}  {'field':<{width}}  problem (first seen)")
    for kind, n in counts.most_common():
        example = first[kind]
        lines.append(f"  {n:>5}  {kind[0]:<{width}}  {example.problem} (line {example.line})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Writing


# Write failures the user fixes on the machine (space, quota, permissions), not bugs: they stop a run with a
# ZephyrError; the outputs written so far stay complete and a rerun resumes from them.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
DEFAULT_MIN_FREE_BYTES = 1 << 30


def storage_error(path: str | os.PathLike, exc: OSError) -> ZephyrError | None:
    """The user-facing error for a failed write of `path` (disk full, quota, read-only, permission), or
    None when `exc` is another kind of OSError (a bug, to be raised as it is)."""
    if exc.errno not in _STORAGE_ERRNOS:
        return None
    reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "it is not writable"
    return ZephyrError(f"{path}: cannot write: {reason} ({exc.strerror or exc})")


def bytes_text(n: float) -> str:
    """A size for people: 512 B, 1.5 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_output_dir(path: str | os.PathLike, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> Path:
    """Make sure a stage can write its outputs under `path` before it starts working; return the folder.

    Creates the folder, writes and removes a probe file in it, and checks that the file system holds at
    least `min_free_bytes` free. Raises ZephyrError naming the folder when it cannot be created or written,
    or when less space is free.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZephyrError(f"output folder {folder}: cannot create it ({exc.strerror or exc})") from None
    probe = folder / f".zephyr-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        with open(probe, "xb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ZephyrError(f"output folder {folder}: not writable ({exc.strerror or exc})") from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise ZephyrError(
            f"output folder {folder}: only {bytes_text(free)} free on its disk, at least "
            f"{bytes_text(min_free_bytes)} needed; free some space or choose another folder"
        )
    return folder


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry is data too (POSIX only)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder` (before it is renamed into place: a crash after the
    rename must not leave a complete-looking folder of empty or partial files)."""
    root = Path(folder)
    for parent, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(parent) / name)
        _fsync_dir(Path(parent))


def follow_umask(root: str | os.PathLike) -> None:
    """Give the files under `root` the permissions the umask grants (0644 under 022): libraries that write
    through mkstemp (safetensors by way of transformers and accelerate) leave them owner-only, 0600, which
    others on a shared machine cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def rename_into_place(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename `tmp` over `target` and make the rename durable."""
    os.replace(tmp, target)
    _fsync_dir(Path(target).parent)


@contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in the same folder as `path`; on success it is synced and renamed over `path`, so
    readers see the old file or the new one, never a part. On failure it is removed; a full disk or an
    unwritable folder becomes a ZephyrError naming `path`."""
    target = Path(path)
    # A temp file of our own naming (not mkstemp) keeps the usual permissions (umask), not 0600.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (error := storage_error(target, exc)) is not None:
            raise error from exc
        raise
    _fsync_dir(target.parent)


def _json_line(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Write records as JSON Lines, atomically."""
    with _atomic_target(path) as tmp, tmp.open("x", encoding="utf-8") as f:
        for record in records:
            f.write(_json_line(record))


def write_json(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Write records as one JSON array (one record per line), atomically."""
    with _atomic_target(path) as tmp, tmp.open("x", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")


def write_parquet(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write records as a Parquet table (columns inferred from the records), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(list(records))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: these records cannot be stored as Parquet ({exc})") from None
    with _atomic_target(path) as tmp:
        pq.write_table(table, tmp)


def write_records(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write records in the format named by the suffix of `path` (.jsonl, .json, .parquet)."""
    writers = {".jsonl": write_jsonl, ".json": write_json, ".parquet": write_parquet}
    suffix = Path(path).suffix
    if suffix not in writers:
        raise DataError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
    writers[suffix](path, records)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a results.json, a report) atomically."""
    with _atomic_target(path) as tmp, tmp.open("x", encoding="utf-8") as f:
        f.write(text)


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one record and make it durable before returning (outputs that a crashed run resumes from).

    A full disk stops with a ZephyrError; a line it cut short is repaired by `read_jsonl_resumable`.
    """
    line = _json_line(record)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if (error := storage_error(path, exc)) is not None:
            raise error from exc
        raise


def read_jsonl_resumable(path: str | os.PathLike) -> list[Any]:
    """The records of a JSONL file written by `append_jsonl`, after repairing a crash.

    A crash can leave the last line without its newline. When that fragment is a complete JSON object it is
    kept and the newline is added; otherwise it is dropped and the file truncated to the last complete line
    (a warning says how many bytes). Any other broken line is a DataError. A missing file has no records.
    """
    target = Path(path)
    if not target.exists():
        return []
    data = target.read_bytes()
    cut = data.rfind(b"\n") + 1  # start of an unterminated last line (0: the whole file)
    tail = data[cut:]
    if tail.strip():
        record, problem = _decode_line(tail)
        if problem is None and isinstance(record, dict):
            with target.open("ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            data += b"\n"
        else:
            with target.open("r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            logger.warning("%s: dropped %d bytes of a truncated last line", target, len(tail))
            data = data[:cut]
    return _decode_lines(target, data)


def _decode_lines(path: Path, data: bytes) -> list[Any]:
    records = []
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            record, problem = _decode_line(raw)
            if problem is not None:
                raise DataError(f"{path}:{line}: {problem.field}: {problem.message}")
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------
# Splits


def _unit_hash(value: Any, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, value): the same on every machine and Python run."""
    digest = hashlib.sha256(f"{seed}\x00{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def train_eval_split(
    records: Sequence[dict], eval_fraction: float, seed: int, key: str = "prompt_id"
) -> tuple[list[dict], list[dict]]:
    """Split records into (train, eval), each in input order, by hashing `record[key]` with `seed`.

    A record's side depends only on its key and the seed, never on the order or number of the other records,
    so a held-out set stays held out when data is added, and records that share a key stay together. With
    `eval_fraction` > 0 and at least two distinct keys, neither side is left empty: if hashing would, the
    key with the lowest (or highest) hash moves over.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    missing = [i for i, r in enumerate(records) if key not in r]
    if missing:
        raise DataError(f"train_eval_split: record {missing[0]} has no {key!r} field")
    held_keys = eval_keys([r[key] for r in records], eval_fraction, seed)
    train = [r for r in records if r[key] not in held_keys]
    held_out = [r for r in records if r[key] in held_keys]
    return train, held_out


def eval_keys(keys: Iterable[Any], eval_fraction: float, seed: int) -> set[Any]:
    """The keys that `train_eval_split` holds out (for callers that keep keys, not records)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    units = {k: _unit_hash(k, seed) for k in keys}
    held = {k for k, u in units.items() if u < eval_fraction}
    if eval_fraction > 0 and len(units) >= 2:
        if not held:
            held = {min(units, key=units.__getitem__)}
        elif len(held) == len(units):
            held.discard(max(units, key=units.__getitem__))
    return held


# ---------------------------------------------------------------------------------------------------------
# Sealed folders and file fingerprints

SEAL_FILE = "zephyr-seal.json"  # in a sealed folder: every other file's size and CRC-32
_CHUNK = 1 << 24


def file_crc32(path: str | os.PathLike) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits (damage detection: 6 GB/s, where sha256 runs 1.6)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _sealed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL_FILE)


def seal(folder: str | os.PathLike) -> None:
    """Record the size and CRC-32 of every file under `folder` in its seal file (written last, atomically):
    what `seal_problem` checks before the folder is used again."""
    root = Path(folder)
    files = {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "crc32": file_crc32(p)}
        for p in _sealed_files(root)
    }
    write_text(root / SEAL_FILE, json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True) + "\n")


def is_sealed(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SEAL_FILE).is_file()


def seal_problem(folder: str | os.PathLike, *, checksums: bool = True) -> str | None:
    """Why a sealed folder cannot be trusted, naming the first damaged file; None when every file has its
    sealed size (and, with `checksums`, its CRC-32). A folder without a seal is a problem too."""
    root = Path(folder)
    try:
        files = json.loads((root / SEAL_FILE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"{root / SEAL_FILE}: missing (the folder was never completed)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{root / SEAL_FILE}: unreadable ({exc})"
    for name, sealed in sorted(files.items()):
        path = root / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != sealed["bytes"]:
            return f"{path}: {size} bytes, sealed with {sealed['bytes']}"
        if checksums and (crc := file_crc32(path)) != sealed["crc32"]:
            return f"{path}: its bytes changed since it was sealed (CRC-32 {crc}, sealed {sealed['crc32']})"
    return None


def file_sha256(path: str | os.PathLike, memo: str | os.PathLike | None = None) -> str:
    """sha256 of a file's bytes. With `memo` (a JSON file), the digest is remembered there under the file's
    path, size and modification time and read again only when one of them changes: hashing the same
    gigabytes at every start would cost seconds."""
    file = Path(path)
    stat = file.stat()
    key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
    remembered = _read_memo(memo)
    entry = remembered.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    if memo is not None:
        remembered[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
        _write_memo(Path(memo), remembered)
    return digest.hexdigest()


def _read_memo(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    try:
        memo = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(path: Path, memo: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # readers see the old memo or the new one, never a part
