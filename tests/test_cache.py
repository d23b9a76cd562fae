"""`zephyr cache`: every item of the cache folder listed with its size and time of last use; pruning removes
what was unused for some days (or all), never an entry another process holds, and a process that maps an
entry reads it after its removal."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_dataset import counting_build
from zephyr import cache
from zephyr.cli import main
from zephyr.core.errors import ConfigError
from zephyr.training import dataset

DAY = 86400


def toy_entry(root: Path, n: int, calls: list[int] | None = None, values=(1, 2, 3)) -> dataset.Entry:
    """An entry of kind `toy` whose key names a data file, as the sft and pairs keys do."""
    key = {"n": n, "train_data": [f"/data/set{n}.jsonl", "sha256:ab"], "limit": None}
    build = counting_build([] if calls is None else calls, values)
    return dataset.load_or_build("toy", key, build, cache_dir=root / "tokenized")


def age(path: Path, days: float, now: float) -> None:
    os.utime(path, (now - days * DAY, now - days * DAY))


@dataclass
class Filled:
    root: Path
    now: float
    old: Path
    recent: Path
    leftover: Path
    table: Path


@pytest.fixture
def filled(tmp_path) -> Filled:
    """A cache with two entries (used 10 and 1 days ago), a killed build's leftover (3 days) and a reference
    table (5 days), and the time they are measured from."""
    root, now = tmp_path / "cache", time.time()
    old, recent = toy_entry(root, 1), toy_entry(root, 2, values=(4, 5))
    leftover = root / "tokenized" / f".tmp-{recent.folder.name}-4242"
    leftover.mkdir()
    (leftover / "values.bin").write_bytes(b"\0" * 8)
    table = root / "ref_logps" / "0123abcd.jsonl"
    table.parent.mkdir()
    table.write_text('{"prompt_id": "p"}\n')
    for path, days in ((old.folder, 10), (recent.folder, 1), (leftover, 3), (table, 5)):
        age(path, days, now)
    return Filled(root, now, old.folder, recent.folder, leftover, table)


def test_items_are_listed_oldest_first_with_their_sizes_and_what_they_were_made_from(filled):
    found = cache.items(filled.root)
    assert [i.path for i in found] == [filled.old, filled.table, filled.leftover, filled.recent]
    assert [i.kind for i in found] == ["toy", cache.REFERENCE, cache.UNFINISHED, "toy"]
    # an entry: its arrays, meta.json and seal; 3 int32 values are 12 bytes
    assert (
        found[0].nbytes == sum(p.stat().st_size for p in filled.old.iterdir())
        and (filled.old / "values.bin").stat().st_size == 12
    )
    assert found[1].nbytes == len('{"prompt_id": "p"}\n') and found[2].nbytes == 8
    assert found[0].detail == "3 tokens; /data/set1.jsonl"
    assert found[2].detail == f"for {filled.recent.name}"
    assert found[0].last_used == pytest.approx(filled.now - 10 * DAY, abs=1e-3)
    lines = cache.list_lines(filled.root, found, filled.now)
    assert lines[0].startswith(f"{filled.root}: 4 items, ")
    assert (
        "(10 days ago)" in lines[1]
        and "tokenized/" + filled.old.name in lines[1]
        and "/data/set1.jsonl" in lines[1]
    )


def test_a_reuse_is_a_use(filled):
    toy_entry(filled.root, 1)  # reused: no build
    assert filled.old.stat().st_mtime > filled.now - 60


def test_select_keeps_what_was_used_within_the_days(filled):
    found = cache.items(filled.root)
    assert [i.path for i in cache.select(found, unused_days=4, now=filled.now)] == [filled.old, filled.table]
    assert [i.path for i in cache.select(found, unused_days=2, now=filled.now)] == [
        filled.old,
        filled.table,
        filled.leftover,
    ]
    assert cache.select(found, unused_days=30, now=filled.now) == []
    assert cache.select(found, unused_days=None, now=filled.now) == found


def test_select_by_size_takes_the_least_recently_used_until_the_rest_fits(filled):
    found = cache.items(filled.root)  # old, table (19 B), leftover (8 B), recent
    sizes = [i.nbytes for i in found]
    total = sum(sizes)
    assert cache.select(found, now=filled.now, max_bytes=total) == []
    assert cache.select(found, now=filled.now, max_bytes=total - 1) == found[:1]
    assert cache.select(found, now=filled.now, max_bytes=sizes[3]) == found[:3]
    assert cache.select(found, now=filled.now, max_bytes=0) == found
    # with days: the stale ones first (old, table), then the oldest others while over the size
    both = cache.select(found, now=filled.now, unused_days=4, max_bytes=sizes[3] + sizes[2])
    assert both == found[:2]
    assert cache.select(found, now=filled.now, unused_days=4, max_bytes=sizes[3]) == found[:3]


def test_prune_removes_the_chosen_items_and_a_removed_entry_is_rebuilt_on_next_use(filled):
    chosen = cache.select(cache.items(filled.root), unused_days=4, now=filled.now)
    size = chosen[0].nbytes
    lines = cache.prune_lines(filled.root, chosen, dry_run=False)
    assert lines == [
        f"removed tokenized/{filled.old.name} ({size} B)",
        "removed ref_logps/0123abcd.jsonl (19 B)",
        f"freed {size + 19} B in 2 items",
    ]
    assert (
        not filled.old.exists()
        and not filled.table.exists()
        and filled.recent.exists()
        and filled.leftover.exists()
    )
    assert not list(filled.old.parent.glob(f".tmp-{filled.old.name}-*"))  # removed whole, not left renamed
    calls: list[int] = []
    assert toy_entry(filled.root, 1, calls).array("values").tolist() == [1, 2, 3] and calls == [1]


def test_a_dry_run_removes_nothing(filled):
    found = cache.items(filled.root)
    lines = cache.prune_lines(filled.root, found, dry_run=True)
    assert [x.split(" (")[0] for x in lines[:-1]] == [
        f"would remove {i.path.relative_to(filled.root)}" for i in found
    ]
    assert lines[-1].startswith("would free ") and lines[-1].endswith(" in 4 items")
    assert all(p.exists() for p in (filled.old, filled.recent, filled.leftover, filled.table))


def test_an_entry_whose_lock_is_held_is_kept(filled):
    # another process checking the entry before use (a shared lock), or building it (the builder's lock
    # also covers its temporary folder)
    with dataset._locked(dataset.lock_file(filled.recent), exclusive=False):
        lines = cache.prune_lines(filled.root, cache.items(filled.root), dry_run=False)
    assert f"kept tokenized/{filled.recent.name}: in use by another process" in lines
    assert f"kept tokenized/{filled.leftover.name}: in use by another process" in lines
    assert lines[-1].endswith(" in 2 items; 2 kept")
    assert filled.recent.exists() and filled.leftover.exists() and not filled.old.exists()
    cache.prune_lines(filled.root, cache.items(filled.root), dry_run=False)  # released: removed
    assert cache.items(filled.root) == []


def test_an_item_that_cannot_be_removed_is_named_and_the_others_go(filled, monkeypatch):
    real_unlink = Path.unlink

    def refuse(path, missing_ok=False):
        if path == filled.table:
            raise PermissionError(13, "Permission denied")
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    lines = cache.prune_lines(filled.root, cache.items(filled.root), dry_run=False)
    assert "kept ref_logps/0123abcd.jsonl: cannot remove it (Permission denied)" in lines
    assert lines[-1].endswith(" in 3 items; 1 kept")
    assert [i.path for i in cache.items(filled.root)] == [filled.table]


def test_an_item_removed_while_listing_is_left_out(filled, monkeypatch):
    real = cache._folder_bytes

    def vanished(folder):
        if folder == filled.old:  # another process pruned it between the listing of names and its sizes
            raise FileNotFoundError(2, "No such file or directory", str(folder))
        return real(folder)

    monkeypatch.setattr(cache, "_folder_bytes", vanished)
    assert [i.path for i in cache.items(filled.root)] == [filled.table, filled.leftover, filled.recent]


def test_a_process_that_maps_an_entry_reads_it_after_its_removal(tmp_path):
    entry = toy_entry(tmp_path, 1, values=range(1000))
    [item] = cache.items(tmp_path)
    assert cache.remove(item) and not entry.folder.exists()
    assert entry.array("values").tolist() == list(range(1000))


def test_the_command_lists_and_prunes_the_cache_of_zephyr_cache(filled, monkeypatch, capsys):
    monkeypatch.setenv("ZEPHYR_CACHE", str(filled.root))
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{filled.root}: 4 items") and len(out) == 5
    assert main(["cache", "prune", "--unused-days", "4", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" in 2 items") and filled.old.exists()
    assert main(["cache", "prune", "--unused-days", "4"]) == 0
    assert not filled.old.exists() and not filled.table.exists() and filled.recent.exists()
    assert main(["cache", "prune", "--max-gib", "0"]) == 0  # nothing may stay
    assert cache.items(filled.root) == []
    assert main(["cache", "prune"]) == ConfigError.exit_code
    assert "give --unused-days DAYS and/or --max-gib GIB, or --all" in capsys.readouterr().err
    assert main(["cache", "prune", "--all", "--max-gib", "1"]) == ConfigError.exit_code
    assert main(["cache", "prune", "--unused-days", "-1"]) == ConfigError.exit_code
    assert "--unused-days must be 0 or more, got -1.0" in capsys.readouterr().err


def test_an_empty_or_missing_cache_lists_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "none"))
    assert main(["cache", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / 'none'}: 0 items, 0 B"]
    assert main(["cache", "prune", "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == ["freed 0 B in 0 items"]


def test_a_damaged_entry_is_listed_as_such(tmp_path):
    entry = toy_entry(tmp_path, 1)
    (entry.folder / dataset.META_FILE).unlink()
    [item] = cache.items(tmp_path)
    assert (item.kind, item.detail) == ("toy", "damaged: no readable meta.json (rebuilt on next use)")


def test_the_cache_is_zephyr_cache_else_in_zephyr_home(tmp_path, monkeypatch):
    from zephyr.models import assets
    from zephyr.stages.dpo import reference

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ZEPHYR_CACHE")
    assert dataset.default_cache_dir() == tmp_path / "home" / "cache" / "tokenized"
    assert reference.default_cache_dir() == tmp_path / "home" / "cache" / "ref_logps"
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "elsewhere"))
    assert assets.cache_home() == tmp_path / "elsewhere"
    assert dataset.default_cache_dir() == tmp_path / "elsewhere" / "tokenized"
