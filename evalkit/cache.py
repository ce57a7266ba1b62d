"""Content-addressed results cache (sqlite): resume after a kill, reuse across runs.

Keys are sha256 of everything that determines a result (model and adapter content hashes,
quantization, merge, chat template, generation config, case content, evalkit version), so a
stale entry can never answer for a different model. Each batch is committed as it finishes.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from evalkit import __version__
from evalkit.types import stable_hash

T = TypeVar("T")


class Cache:
    def __init__(self, path: Path | None) -> None:
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


# ---------------------------------------------------------------- cache-through

Deliver = Callable[[Mapping[int, T]], None]  # computed results by index, cached as they arrive


def _as_is(value: Any) -> Any:
    return value


def _always(_value: object) -> bool:
    return True


def cached(cache: Cache, keys: Sequence[str], compute: Callable[[list[int], Deliver[T]], None], *,
           count: bool = True, decode: Callable[[Any], T] = _as_is, encode: Callable[[T], Any] = _as_is,
           keep: Callable[[T], bool] = _always) -> list[tuple[T, bool]]:
    """Each key's value, and whether it came from the cache. What is cached is read (`decode`);
    the indices of the rest go to `compute`, which hands results back through `deliver({index:
    value})` as they finish, and each delivery is cached at once (`encode`), so an interrupted run
    keeps what finished. A value `keep` refuses (a failure worth asking again) is returned but not
    cached. `count=False` keeps these lookups out of `hits` and `misses` (see `Cache.get`)."""
    found = [cache.get(k, count=count) for k in keys]
    out: list[tuple[T, bool] | None] = [None if f is None else (decode(f), True) for f in found]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        def deliver(values: Mapping[int, T]) -> None:
            cache.put_many({keys[i]: encode(v) for i, v in values.items() if keep(v)})
            for i, v in values.items():
                out[i] = (v, False)

        compute(todo, deliver)
    done = [o for o in out if o is not None]
    if len(done) != len(out):  # a compute that returned without delivering every index: a bug, not a result
        raise RuntimeError(f"{len(out) - len(done)} of {len(todo)} results to compute were never delivered")
    return done


# ---------------------------------------------------------------- the keys, one function each
# (tests/test_cache_keys.py changes each component in turn and expects another key)

def generation_key(model: str, gen: Mapping[str, Any], prompt: str) -> str:
    """One greedy output: the variant's fingerprint, the generation config's key (what changes an
    output: `GenerationConfig.key()`), the rendered prompt."""
    return Cache.key("generate", model=model, gen=dict(gen), prompt=prompt)


def loglikelihood_key(model: str, context: Sequence[int], continuation: Sequence[int]) -> str:
    """One loglikelihood request (an lm-eval canary's): the variant and the exact token ids scored."""
    return Cache.key("loglikelihood", model=model, context=list(context), continuation=list(continuation))


def drift_key(model: str, passage: Sequence[int], top_k: int) -> str:
    """One passage's next-token distributions (the drift canary's reference), kept as top-k."""
    return Cache.key("drift", model=model, passage=list(passage), top_k=top_k)


def drift_summary_key(model: str, reference: str, passage: Sequence[int], top_k: int) -> str:
    """One variant's drift on one passage (kl, top-1 agreement, perplexity ratio) from a reference
    (its content address), on the reference's top-k cells."""
    return Cache.key("drift-summary", model=model, reference=reference, passage=list(passage), top_k=top_k)


def adapter_active_key(model: str, prompts: Sequence[str], tolerance: float) -> str:
    return Cache.key("adapter_active", model=model, prompts=list(prompts), tolerance=tolerance)


def judge_key(endpoint: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """One judge completion: who answers (the endpoint's identity) and everything sent to it."""
    return Cache.key("judge", **request, endpoint=dict(endpoint))


def seed_probe_key(endpoint: Mapping[str, Any], temperature: float) -> str:
    """Whether a judge endpoint honours `seed`: per endpoint identity and sampling temperature."""
    return Cache.key("judge-seed-probe", endpoint=dict(endpoint), temperature=temperature)
