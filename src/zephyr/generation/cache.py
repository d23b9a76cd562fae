"""An on-disk cache of model responses, so that rerunning a stage sends no request twice.

One sqlite3 file (standard library): several processes may read and write it at once, and a crash never
leaves a half-written entry. The key is a hash of (model, messages, sampling parameters); the entry holds the
request body and the completions. Credentials are never part of a key or an entry.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zephyr.core.errors import ZephyrError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what determines the answer."""
    payload = {"model": model, "messages": [dict(m) for m in messages], "params": dict(params)}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseCache:
    """get/put of JSON values by key in a sqlite file (created with its folder on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Another process holding the write lock makes us wait up to 60 s, not fail.
                db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
                db.execute(_SCHEMA)
                db.commit()
            except sqlite3.Error as exc:
                raise ZephyrError(f"response cache {self.path}: {exc}") from exc
            self._db = db
        return self._db

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._connect().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, model: str, request: Mapping[str, Any], response: Any) -> None:
        with self._lock:
            db = self._connect()
            db.execute(
                "INSERT OR REPLACE INTO responses (key, model, request, response, created) VALUES (?, ?, ?, ?, ?)",
                (
                    key,
                    model,
                    json.dumps(request, ensure_ascii=False),
                    json.dumps(response, ensure_ascii=False),
                    time.time(),
                ),
            )
            db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
