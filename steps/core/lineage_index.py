"""`tailwise lineage find`: query the store's manifests through a local SQLite index.

The manifests stay the source of truth. The index is a cache of them beside the other
local caches ($TAILWISE_CACHE_DIR or .tailwise/cache, one file per store URL): each query
first lists the store's manifests, drops what vanished and reads only the manifests it has
not seen (manifests never change once written), so a warm query over 100,000 manifests
costs one listing and one SQL query. Delete the file at any time; it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from steps.core.errors import ArtifactNotFound, TailwiseError
from steps.core.lineage_diff import flat
from steps.core.store import ArtifactStore, Manifest, manifest_key

READERS = 16
STAMP_SETTLE_NS = 2_000_000_000  # file system clocks tick coarsely: trust older stamps only
SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    digest TEXT PRIMARY KEY, kind TEXT, name TEXT, size INTEGER, created_at TEXT,
    step TEXT, step_version TEXT, git_revision TEXT, code_revision TEXT, params TEXT);
CREATE TABLE IF NOT EXISTS params (digest TEXT, key TEXT, value TEXT, number REAL);
CREATE TABLE IF NOT EXISTS inputs (digest TEXT, input TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE INDEX IF NOT EXISTS artifacts_step ON artifacts (step);
CREATE INDEX IF NOT EXISTS artifacts_created ON artifacts (created_at);
CREATE INDEX IF NOT EXISTS params_value ON params (key, value);
CREATE INDEX IF NOT EXISTS params_number ON params (key, number);
CREATE INDEX IF NOT EXISTS params_digest ON params (digest);
CREATE INDEX IF NOT EXISTS inputs_input ON inputs (input);
CREATE INDEX IF NOT EXISTS inputs_digest ON inputs (digest);
"""


@dataclass(frozen=True)
class Match:
    digest: str
    kind: str
    name: str | None
    step: str | None
    params: dict[str, Any]
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "kind": self.kind, "name": self.name, "step": self.step,
                "params": self.params, "created_at": self.created_at}


@dataclass(frozen=True)
class Query:
    """What `find` filters on; every field left None matches everything."""

    step: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    kind: str | None = None
    since: str | None = None
    produced_from: str | None = None
    git: str | None = None


def index_path(store: ArtifactStore) -> Path:
    root = Path(os.environ.get("TAILWISE_CACHE_DIR", ".tailwise/cache")) / "lineage-index"
    return root / f"{hashlib.sha256(store.url.encode()).hexdigest()[:16]}.sqlite"


class LineageIndex:
    """The index of one store's manifests."""

    def __init__(self, store: ArtifactStore, path: Path | None = None) -> None:
        self.store = store
        self.path = path or index_path(store)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(SCHEMA)

    def refresh(self) -> int:
        """Bring the index level with the store; the number of manifests now indexed."""
        stamp = self._listing_stamp()
        if stamp is not None and stamp == self._meta("listing_stamp"):
            return self.db.execute("SELECT count(*) FROM artifacts").fetchone()[0]
        listed = set(self.store.digests())
        if not listed:
            self.store.require_artifacts()
        indexed = {row[0] for row in self.db.execute("SELECT digest FROM artifacts")}
        with self.db:
            gone = [(d,) for d in indexed - listed]
            for table in ("artifacts", "params", "inputs"):
                self.db.executemany(f"DELETE FROM {table} WHERE digest = ?", gone)
            self._add(self._read(sorted(listed - indexed)))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('listing_stamp', ?)", (stamp,))
        return len(listed)

    def _listing_stamp(self) -> str | None:
        """When a local store's manifests/ folder last changed (an entry added or removed):
        while it stays the same, the listing would too. None for S3 (always listed), and
        for a change too recent to rule out another in the same clock tick."""
        root = getattr(self.store.backend, "root", None)
        if root is None:
            return None
        try:
            changed = (root / "manifests").stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if time.time_ns() - changed < STAMP_SETTLE_NS:
            return None
        return str(changed)

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _read(self, digests: list[str]) -> Iterator[Manifest]:
        # On S3 each manifest is a request: reads overlap on threads. A local disk gains
        # nothing from threads (the parsing holds the GIL anyway), and handing each read to
        # a thread and back costs more than the read itself.
        if self.store.local_path("0" * 64) is not None:
            for digest in digests:
                yield self.store.parse_manifest(digest, self._raw(digest))
            return
        with ThreadPoolExecutor(READERS) as pool:
            for digest, raw in zip(digests, pool.map(self._raw, digests), strict=True):
                yield self.store.parse_manifest(digest, raw)

    def _raw(self, digest: str) -> bytes:
        return self.store.backend.get_bytes(manifest_key(digest))

    def _add(self, manifests: Iterable[Manifest]) -> None:
        artifacts, params, inputs = [], [], []
        for m in manifests:
            made = m.produced_by
            artifacts.append((m.digest, m.kind, m.name, m.size, m.created_at,
                              made and made.step, made and made.step_version,
                              made and made.git_revision, made and made.code_revision,
                              json.dumps(made.params if made else {})))
            if made is not None:
                params += [(m.digest, key, json.dumps(value), _number(value))
                           for key, value in flat(made.params, "").items()]
                inputs += [(m.digest, digest) for digest in set(made.inputs.values())]
        self.db.executemany("INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?,?,?,?)",
                            artifacts)
        self.db.executemany("INSERT INTO params VALUES (?,?,?,?)", params)
        self.db.executemany("INSERT INTO inputs VALUES (?,?)", inputs)

    def resolve(self, prefix: str) -> str:
        """A full digest from a unique prefix, looked up in the index."""
        rows = self.db.execute("SELECT digest FROM artifacts WHERE digest >= ? AND digest < ? "
                               "LIMIT 6", (prefix, prefix + "g")).fetchall()
        if not rows:
            raise ArtifactNotFound(f"no artifact matches {prefix!r} in {self.store.url}")
        if len(rows) > 1:
            raise ArtifactNotFound(f"{prefix!r} is ambiguous in {self.store.url}: "
                                   f"{', '.join(r[0][:12] for r in rows[:5])}")
        return rows[0][0]

    def find(self, query: Query, limit: int | None = None) -> tuple[int, list[Match]]:
        """How many artifacts match, and the newest `limit` of them (all when None)."""
        where, args = ["1"], []
        if query.step:
            where.append("a.step = ?")
            args.append(query.step)
        if query.kind:
            where.append("a.kind = ?")
            args.append(query.kind)
        if query.since:
            where.append("a.created_at >= ?")
            args.append(query.since)
        if query.git:
            where.append("(a.git_revision >= ? AND a.git_revision < ? "
                         "OR a.code_revision >= ? AND a.code_revision < ?)")
            args += [query.git, query.git + "g"] * 2
        for key, value in query.params:
            number = _number(value)
            column, wanted = ("number", number) if number is not None else ("value",
                                                                            json.dumps(value))
            where.append(f"a.digest IN (SELECT digest FROM params WHERE key = ? "
                         f"AND {column} = ?)")
            args += [key, wanted]
        with_clause = ""
        if query.produced_from:
            root = self.resolve(query.produced_from)
            with_clause = ("WITH RECURSIVE down(d) AS (SELECT digest FROM inputs WHERE input = ? "
                           "UNION SELECT i.digest FROM inputs i JOIN down ON i.input = down.d) ")
            where.append("a.digest IN (SELECT d FROM down)")
            args.insert(0, root)
        sql = f"{with_clause}SELECT {{}} FROM artifacts a WHERE {' AND '.join(where)}"
        total = self.db.execute(sql.format("count(*)"), args).fetchone()[0]
        rows = self.db.execute(
            sql.format("a.digest, a.kind, a.name, a.step, a.params, a.created_at")
            + " ORDER BY a.created_at DESC, a.digest" + (f" LIMIT {int(limit)}" if limit else ""),
            args).fetchall()
        return total, [Match(d, k, n, s, json.loads(p), c) for d, k, n, s, p, c in rows]

    def close(self) -> None:
        self.db.close()


def _number(value: Any) -> float | None:
    """Numbers compare as numbers (sparsity=0.7 finds 0.70); booleans are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def since_timestamp(text: str) -> str:
    """A date or date-time as the manifests write `created_at` (UTC, ISO 8601)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise TailwiseError(f"--since {text!r} is not a date (YYYY-MM-DD) or ISO date-time") \
            from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
