"""Tokenized training data on disk: built once per machine, memory-mapped read-only by every process.

The paper's dSFT set (ultrachat_200k: 208K dialogues, ~300M tokens) takes minutes to render and tokenize, and
held as Python lists of ints it would take tens of GB in every process of a launch. So a stage tokenizes its
data once into an entry of this cache, and every process (every rank of a launch, every later run with the
same inputs) maps the entry's flat arrays; their pages are shared, not copied into each process.

    $ZEPHYR_HOME/cache/tokenized/KIND-FINGERPRINT/
        meta.json           what the entry was made from (its key), its arrays (dtype, length), statistics
        NAME.bin            one flat little-endian array per name: token ids, loss masks, item offsets, plans
        zephyr-seal.json    every other file's size and CRC-32, written last (`io.seal`)

The fingerprint hashes the key, which names everything the arrays depend on: the data's content (sha256 of a
file, remembered by path, size and modification time; a hub dataset's pinned revision), the tokenizer's whole
definition and chat template, every option that shapes the arrays (lengths, packing, loss masking, splits,
limits, the bad-record policy), and the source code of the modules that make them. A changed input makes a
new entry; an entry is never changed in place.

Building. An entry is written into a temporary folder beside its final name, sealed, and renamed into place:
a killed build leaves no entry. The processes of one machine take the entry's lock file: the first one
builds while the others wait, then each checks the seal (sizes and checksums) and maps the arrays. A damaged
entry is rebuilt, never read. Records are streamed from the source in chunks and tokenized by worker
processes, one per core; their results are appended to the array files in order, so memory holds a few
chunks whatever the size of the data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from zephyr import io
from zephyr.core.errors import DataError, ZephyrError
from zephyr.models.load import load_tokenizer

CACHE_FORMAT = 1  # the layout of an entry; the code that fills it is hashed into every key
META_FILE = "meta.json"
SOURCES_MEMO = "sources_sha256.json"  # in the cache folder: data files' sha256 by path, size and mtime
TMP_PREFIX = ".tmp-"  # an entry being built: .tmp-NAME-PID beside its final name
CHUNK_RECORDS = 512  # records per chunk sent to a worker: ~0.7M tokens of ultrachat-like dialogues

T = TypeVar("T")
R = TypeVar("R")


def default_cache_dir() -> Path:
    from zephyr.models import assets

    return assets.cache_home() / assets.TOKENIZED_CACHE


# ---------------------------------------------------------------------------------------------------------
# Fingerprints


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over everything of a tokenizer that turns text into ids: its class, the fast tokenizer's whole
    definition (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens), its special
    tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
        str(getattr(tokenizer, "split_special_tokens", False)),
        str(getattr(tokenizer, "chat_template", "") or ""),
    ]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def code_fingerprint(modules: Sequence[str]) -> str:
    """sha256 of the source files of `modules`: the code that makes an entry is one of its inputs, so a
    zephyr whose tokenization changed never reads entries its predecessor made."""
    digest = hashlib.sha256()
    for name in sorted({*modules, __name__}):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        digest.update(name.encode() + b"\0" + (Path(origin).read_bytes() if origin else b"") + b"\0")
    return digest.hexdigest()


def fingerprint(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True).encode()).hexdigest()[
        :32
    ]


# ---------------------------------------------------------------------------------------------------------
# Arrays


class ArrayWriter:
    """Flat arrays written into `NAME.bin` files of a folder, whole or appended chunk by chunk; `close`
    describes them for meta.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, Any] = {}
        self._arrays: dict[str, dict[str, Any]] = {}

    def append(self, name: str, values: npt.ArrayLike, dtype: npt.DTypeLike) -> None:
        array = np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
        described = self._arrays.setdefault(name, {"dtype": array.dtype.str, "length": 0})
        if described["dtype"] != array.dtype.str:
            raise ValueError(f"array {name}: {array.dtype.str} appended to {described['dtype']}")
        if name not in self._files:
            self._files[name] = open(self.folder / f"{name}.bin", "xb")  # noqa: SIM115 (closed by close())
        self._files[name].write(array.tobytes())
        described["length"] += len(array)

    def write(self, name: str, values: npt.ArrayLike, dtype: npt.DTypeLike) -> None:
        if name in self._arrays:
            raise ValueError(f"array {name} is written already")
        self.append(name, values, dtype)

    def close(self) -> dict[str, dict[str, Any]]:
        for f in self._files.values():
            f.close()
        self._files.clear()
        return dict(self._arrays)


def offsets(lengths: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Item boundaries from item lengths: item i spans [offsets[i], offsets[i + 1])."""
    out = np.zeros(np.size(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


class Entry:
    """An entry of the cache, its arrays mapped read-only (shared pages, not private memory)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta: dict[str, Any] = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        self._mapped: dict[str, npt.NDArray[Any]] = {}
        for name in self.meta["arrays"]:  # mapped now: an entry pruned later stays readable (Linux keeps
            self.array(name)  # the files of a mapping), and mapping costs no reads

    @property
    def stats(self) -> dict[str, Any]:
        return self.meta["stats"]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    def array(self, name: str) -> npt.NDArray[Any]:
        if name not in self._mapped:
            described = self.meta["arrays"][name]
            dtype, length = np.dtype(described["dtype"]), int(described["length"])
            if length == 0:  # an empty file cannot be mapped
                self._mapped[name] = np.zeros(0, dtype=dtype)
            else:
                self._mapped[name] = np.memmap(
                    self.folder / f"{name}.bin", dtype=dtype, mode="r", shape=(length,)
                )
        return self._mapped[name]


def entry_problem(folder: Path) -> str | None:
    """Why `folder` is not a usable entry (None: it is): its seal (every file's size and CRC-32), then its
    description of its arrays."""
    problem = io.seal_problem(folder)
    if problem is not None:
        return problem
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            return f"{folder / META_FILE}: format {meta.get('format')}, expected {CACHE_FORMAT}"
        for name, described in meta["arrays"].items():
            expected = int(described["length"]) * np.dtype(described["dtype"]).itemsize
            path = folder / f"{name}.bin"
            size = path.stat().st_size if path.is_file() else 0
            if size != expected:
                return f"{path}: {size} bytes, its description says {expected}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{folder / META_FILE}: unreadable ({exc})"
    return None


# ---------------------------------------------------------------------------------------------------------
# Build once, map everywhere


def lock_file(entry: Path) -> Path:
    """The lock of an entry's folder, beside it: builders hold it exclusively, readers shared while they check."""
    return entry.with_name(f"{entry.name}.lock")


def owner_of(tmp: Path) -> Path:
    """The entry a build's temporary folder (`.tmp-NAME-PID`) is for."""
    return tmp.with_name(tmp.name.removeprefix(TMP_PREFIX).rsplit("-", 1)[0])


def try_lock(entry: Path) -> int | None:
    """The entry's lock taken exclusively without waiting: its file descriptor (closing it releases the lock),
    or None when a process holds it (building the entry, or checking it before use)."""
    fd = os.open(lock_file(entry), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[float]:
    """Hold `path`'s lock (shared, or exclusive for a builder); yields the seconds spent waiting for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        started = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield time.perf_counter() - started
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _say(text: str) -> None:
    """A line of the run's log, from the launch's first process only (every process takes the same path)."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(text, flush=True)


def _size_text(entry: Entry) -> str:
    return f"{entry.stats.get('tokens', 0):,} tokens, {io.bytes_text(entry.nbytes)}"


def _reused(kind: str, folder: Path, waited: float) -> Entry:
    entry = Entry(folder)
    with contextlib.suppress(
        OSError
    ):  # its time of last use, for `zephyr cache prune` (a read-only cache has none)
        os.utime(folder)
    by_other = f"; built by another process while this one waited {waited:.0f} s" if waited >= 1 else ""
    _say(f"{kind} data: reusing {folder} ({_size_text(entry)}{by_other})")
    return entry


def load_or_build(
    kind: str,
    key: Mapping[str, Any],
    build: Callable[[Path], dict[str, Any]],
    *,
    cache_dir: Path | None = None,
) -> Entry:
    """The entry of `kind` for `key`: reused when sealed and intact, else built by `build(folder)`, which
    writes the arrays (an `ArrayWriter` over `folder`) and returns {"arrays": ..., "stats": ...} for
    meta.json. The log says which, and the entry's size."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A worker process re-running an unguarded script's top level: it would wait forever for the lock
        # its parent holds. (multiprocessing refuses to start processes here for the same reason.)
        raise ZephyrError(
            'tokenized data requested while a worker process starts: guard the script with `if __name__ == "__main__":`'
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZephyrError(
            f"tokenized-data cache {cache_dir}: cannot create it ({exc.strerror or exc})"
        ) from exc
    folder = cache_dir / f"{kind}-{fingerprint(key)}"
    lock = lock_file(folder)
    with _locked(lock, exclusive=False) as waited:  # waits while another process builds it
        if folder.is_dir() and entry_problem(folder) is None:
            return _reused(kind, folder, waited)
    with _locked(lock, exclusive=True) as waited:
        problem = entry_problem(folder) if folder.exists() else "missing"
        if problem is None:  # built by another process between the two locks
            return _reused(kind, folder, waited)
        if folder.exists():
            print(f"{kind} data: {problem}: the entry is damaged; rebuilding it", file=sys.stderr, flush=True)
            shutil.rmtree(folder)
        return _build_entry(kind, key, build, folder)


def _build_entry(
    kind: str, key: Mapping[str, Any], build: Callable[[Path], dict[str, Any]], folder: Path
) -> Entry:
    """Build an entry in a temporary folder beside `folder`, seal it and rename it into place (the caller
    holds the entry's exclusive lock)."""
    for stale in folder.parent.glob(f"{TMP_PREFIX}{folder.name}-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    started = time.perf_counter()
    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        made = build(tmp)
        meta = {"format": CACHE_FORMAT, "kind": kind, "key": dict(key), **made}
        io.write_text(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        io.seal(tmp)
        io.follow_umask(tmp)
        io.sync_tree(tmp)
        io.rename_into_place(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and (error := io.storage_error(folder.parent, exc)) is not None:
            raise error from exc
        raise
    entry = Entry(folder)
    _say(f"{kind} data: built {folder} ({_size_text(entry)}) in {time.perf_counter() - started:.1f} s")
    _say(_held(folder.parent))
    return entry


def _held(cache_dir: Path) -> str:
    """What the cache holds after a build: entries are never removed by a run, so say how much and how to
    prune it."""
    try:
        entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)]
        size = sum(f.stat().st_size for e in entries for f in e.iterdir() if f.is_file())
    except OSError:  # an entry pruned meanwhile: the sum is only a hint
        return f"{cache_dir}: see `zephyr cache list`"
    count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
    return f"{cache_dir} holds {io.bytes_text(size)} in {count} (`zephyr cache list`, `zephyr cache prune`)"


# ---------------------------------------------------------------------------------------------------------
# Records to arrays, in parallel


@dataclass
class Chunk:
    """What a worker makes of a chunk of records: the items it kept (flat values per field, and each item's
    length per field) and, per record, whether an item was kept, the kind's flags, and problems (records
    that cannot be used: the index in the chunk and why)."""

    values: dict[str, npt.NDArray[Any]]
    lengths: dict[str, npt.NDArray[np.int64]]
    kept: npt.NDArray[np.bool_]
    flags: npt.NDArray[np.uint8]
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(next(iter(self.lengths.values())).sum()) if self.lengths else 0


@dataclass
class Records:
    """Every record's outcome, in order (`Chunk`s concatenated), and every kept item's lengths per field."""

    kept: npt.NDArray[np.bool_]
    flags: npt.NDArray[np.uint8]
    problems: dict[int, str]  # record index -> why it cannot be used
    lengths: dict[str, npt.NDArray[np.int64]]


def split_of_records(keys: Sequence[Sequence[Any]], eval_fraction: float, seed: int) -> npt.NDArray[np.int8]:
    """0 (train) or 1 (eval) for every record of one or two sources (`keys`: each source's record ids, in
    order): a second source is the eval data; with one, `io.train_eval_split`'s rule holds its records out
    by id when `eval_fraction` > 0."""
    train, *evals = keys
    held = np.zeros(len(train), dtype=np.int8)
    if not evals and eval_fraction > 0:
        held_keys = io.eval_keys(train, eval_fraction, seed)
        held = np.fromiter((k in held_keys for k in train), dtype=np.int8, count=len(train))
    return np.concatenate([held, *(np.ones(len(k), dtype=np.int8) for k in evals)])


def workers_available() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def map_chunks(
    work: Callable[[T], R],
    chunks: Iterable[T],
    *,
    initializer: Callable[..., None],
    tokenizer: Any,
    initargs: tuple[Any, ...],
    workers: int,
) -> Generator[R, None, None]:
    """`work(chunk)` for every chunk, results in order. When there is more than one chunk and more than one
    worker, in `workers` processes (started fresh, so they inherit no threads or state; each runs
    `initializer(tokenizer, *initargs)` once) with at most two chunks per worker in flight: reading further
    ahead would hold the whole data set in memory. Otherwise here, after `initializer(tokenizer, *initargs)`.
    A worker that dies (killed for memory, say) stops the map with an error rather than leaving it waiting."""
    it = iter(chunks)
    head = [c for c in (next(it, None), next(it, None)) if c is not None]
    if len(head) < 2 or workers < 2:
        initializer(tokenizer, *initargs)
        for chunk in _chain(head, it):
            yield work(chunk)
        return
    with tempfile.TemporaryDirectory(prefix="zephyr-workers-") as folder:
        # The tokenizer (megabytes) reaches the workers as a saved folder, not through the pipe that starts
        # them: a worker that dies while starting would leave its parent blocked writing into a full pipe
        # (and a pickle in a file would be a pickle to trust on load).
        tokenizer.save_pretrained(folder)
        # a tokenizer class from a model's own code was loaded with the recipe's trust_remote_code
        remote = type(tokenizer).__module__.startswith("transformers_modules")
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(initializer, folder, remote, initargs),
        )
        pending: deque[Future[R]] = deque()
        try:
            for chunk in _chain(head, it):
                pending.append(pool.submit(work, chunk))
                if len(pending) >= 2 * workers:
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Future[R]) -> R:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise ZephyrError(
            "a tokenizing worker process died (out of memory? a script that calls zephyr without an "
            '`if __name__ == "__main__":` guard?)'
        ) from exc


def _start_worker(
    initializer: Callable[..., None], tokenizer_dir: str, trust_remote_code: bool, initargs: tuple[Any, ...]
) -> None:
    # one tokenizing thread per worker process: the processes share the cores (a fast tokenizer's own thread
    # pool in every worker would oversubscribe them)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # (the saved folder holds the parent's chat template and pad token: "auto" keeps them)
    initializer(load_tokenizer(tokenizer_dir, "auto", trust_remote_code=trust_remote_code), *initargs)


def _chain(head: list[T], rest: Iterator[T]) -> Iterator[T]:
    yield from head
    yield from rest


def tokenize_records(
    rows: Iterable[Any],
    writer: ArrayWriter,
    *,
    work: Callable[[list[Any]], Chunk],
    initializer: Callable[..., None],
    tokenizer: Any,
    initargs: tuple[Any, ...],
    dtypes: Mapping[str, npt.DTypeLike],
    label: str,
    workers: int | None = None,
    chunk_records: int = CHUNK_RECORDS,
    on_problem: Callable[[int, str], None] | None = None,
) -> Records:
    """Rows (whatever `work` takes, one per record) through `work` in chunks, in parallel; every kept item's
    values appended to `writer` field by field, in record order. `on_problem(record, message)` hears of each
    record that cannot be used as soon as its chunk is done (it may raise, which stops the workers). A
    progress bar counts tokens per second (from 2 s on: a small set builds without one)."""
    from tqdm.auto import tqdm

    kept: list[npt.NDArray[np.bool_]] = []
    flags: list[npt.NDArray[np.uint8]] = []
    lengths: dict[str, list[npt.NDArray[np.int64]]] = {name: [] for name in dtypes}
    problems: dict[int, str] = {}
    done = 0
    results = map_chunks(
        work,
        chunked(rows, chunk_records),
        initializer=initializer,
        tokenizer=tokenizer,
        initargs=initargs,
        workers=workers_available() if workers is None else workers,
    )
    rank = int(os.environ.get("RANK", "0") or 0)
    with (
        contextlib.closing(results),
        tqdm(desc=label, unit="tok", unit_scale=True, delay=2, disable=rank != 0) as bar,
    ):
        for chunk in results:
            for name, dtype in dtypes.items():
                writer.append(name, chunk.values[name], dtype)
                lengths[name].append(chunk.lengths[name])
            kept.append(chunk.kept)
            flags.append(chunk.flags)
            for i, message in chunk.problems:
                problems[done + i] = message
                if on_problem is not None:
                    on_problem(done + i, message)
            done += len(chunk.kept)
            bar.update(chunk.tokens)
            bar.set_postfix(records=done, refresh=False)
    return Records(
        kept=np.concatenate(kept) if kept else np.zeros(0, dtype=bool),
        flags=np.concatenate(flags) if flags else np.zeros(0, dtype=np.uint8),
        problems=problems,
        lengths={
            name: np.concatenate(parts) if parts else np.zeros(0, np.int64) for name, parts in lengths.items()
        },
    )


@dataclass
class Source:
    """One data source read into an entry: each valid record's line and id, every record's outcome, and
    the records left out ("FILE:LINE: ..." lines: schema problems first, then the kind's)."""

    path: str
    lines: list[int] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    records: Records | None = None
    bad: list[str] = field(default_factory=list)


def read_source(
    path: str,
    fmt: str,
    writer: ArrayWriter,
    *,
    on_bad_record: io.BadRecordPolicy,
    limit: int | None,
    row: Callable[[dict[str, Any]], Any],
    work: Callable[[list[Any]], Chunk],
    initializer: Callable[..., None],
    tokenizer: Any,
    initargs: tuple[Any, ...],
    dtypes: Mapping[str, npt.DTypeLike],
    workers: int | None = None,
    chunk_records: int = CHUNK_RECORDS,
) -> Source:
    """Stream the valid records of `path` (`io.RecordStream`), `row(record)` of each through `work`
    (`tokenize_records`). A record `work` cannot use is bad: under the `error` policy the read stops at the
    first with `FILE:LINE: prompt_id ID: problem`."""
    stream = io.RecordStream(path, fmt, on_bad_record=on_bad_record, limit=limit)
    source = Source(stream.source)

    def rows() -> Iterator[Any]:
        for line, record in stream:
            source.lines.append(line)
            source.keys.append(record["prompt_id"])
            yield row(record)

    def problem(index: int, message: str) -> None:
        text = f"{stream.source}:{source.lines[index]}: prompt_id {source.keys[index]!r}: {message}"
        if on_bad_record == "error":
            raise DataError(text)
        source.bad.append(text)

    source.records = tokenize_records(
        rows(),
        writer,
        work=work,
        initializer=initializer,
        tokenizer=tokenizer,
        initargs=initargs,
        dtypes=dtypes,
        label=f"tokenizing {stream.source}",
        workers=workers,
        chunk_records=chunk_records,
        on_problem=problem,
    )
    source.bad = [f"{stream.source}:{b.line}: {b.field}: {b.problem}" for b in stream.bad] + source.bad
    return source


def concatenated(sources: Sequence[Source]) -> Records:
    """The records of several sources as one list, in order."""
    parts = [s.records for s in sources if s.records is not None]
    problems: dict[int, str] = {}
    at = 0
    for part in parts:
        problems.update({at + i: message for i, message in part.problems.items()})
        at += len(part.kept)
    return Records(
        kept=np.concatenate([p.kept for p in parts]),
        flags=np.concatenate([p.flags for p in parts]),
        problems=problems,
        lengths={name: np.concatenate([p.lengths[name] for p in parts]) for name in parts[0].lengths},
    )
