"""Content-addressed results cache (sqlite): resume after a kill, reuse across runs.

Keys are sha256 of everything that determines a result (model and adapter content hashes,
quantization, merge, chat template, generation config, case content, evalkit version), so a
stale entry can never answer for a different model. Each batch is committed as it finishes.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit import __version__
from evalkit.types import stable_hash

if TYPE_CHECKING:
    from evalkit.config.suite import GenerationConfig


class Cache:
    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.hits = self.misses = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()

    @staticmethod
    def key(namespace: str, **parts: Any) -> str:
        return stable_hash({"ns": namespace, "evalkit": __version__, **parts})

    def get(self, key: str, *, count: bool = True) -> Any | None:
        """The value stored under `key`, or None. `count=False` keeps a lookup out of `hits` and
        `misses`, which count per-sample results (what a run record reports as reused)."""
        row = None
        if self._db is not None:
            with self._lock:
                row = self._db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        if count:
            self.hits += row is not None
            self.misses += row is None
        return None if row is None else json.loads(row[0])

    def put_many(self, items: dict[str, Any]) -> None:
        if self._db is None or not items:
            return
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in items.items()])
            self._db.commit()

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# ---------------------------------------------------------------- the keys, one function each
# (tests/test_cache_keys.py changes each component in turn and expects another key)

def generation_key(model: str, gen: GenerationConfig, prompt: str) -> str:
    """One greedy output: the variant's fingerprint, the generation config, the rendered prompt."""
    return Cache.key("generate", model=model, gen=gen.key(), prompt=prompt)


def loglikelihood_key(model: str, context: Sequence[int], continuation: Sequence[int]) -> str:
    """One loglikelihood request (an lm-eval canary's): the variant and the exact token ids scored."""
    return Cache.key("loglikelihood", model=model, context=list(context), continuation=list(continuation))


def drift_key(model: str, passage: Sequence[int], top_k: int) -> str:
    """One passage's next-token distributions (the drift canary's reference), kept as top-k."""
    return Cache.key("drift", model=model, passage=list(passage), top_k=top_k)


def adapter_active_key(model: str, prompts: Sequence[str], tolerance: float) -> str:
    return Cache.key("adapter_active", model=model, prompts=list(prompts), tolerance=tolerance)


def judge_key(endpoint: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """One judge completion: who answers (the endpoint's identity) and everything sent to it."""
    return Cache.key("judge", **request, endpoint=dict(endpoint))
