"""`tailwise lineage check`: prove that the store holds what its manifests say.

For each artifact: its manifest is a manifest, names its own digest and still matches its
checksum (an edit shows); its content re-hashes to the digests it records; its input digests
exist. Each cache entry must point at existing artifacts. A problem is reported against the
artifact it breaks, with the file it is in, and the walk goes on: a broken upstream manifest
does not hide the rest.

Streamed: content is hashed in chunks, each manifest is read when its artifact is checked and
each finding is handed on as it is made, so memory does not grow with artifact sizes or with
the number of manifests (beyond the store's listing of digests).
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from steps.core.errors import ObjectMissing, StoreError
from steps.core.store import (
    ArtifactStore,
    Manifest,
    manifest_key,
    object_key,
    tree_digest,
)

OK, MISSING, DIFFERS, INCONSISTENT = "ok", "missing", "content differs", "manifest inconsistent"
CACHE_ENTRY = "cache entry"
# Objects shared by several artifacts (a tokenizer file in every pruned model) are hashed once
# while they stay among this many most recently hashed.
REMEMBERED_OBJECTS = 10_000


@dataclass(frozen=True)
class Finding:
    """What was found about one artifact (or cache entry), and in which file."""

    status: str
    digest: str
    file: str
    detail: str = ""
    about: str = "artifact"  # or "cache entry"

    @property
    def ok(self) -> bool:
        return self.status == OK

    def line(self) -> str:
        text = f"{self.status:<21} {self.digest[:12]}  {self.file}"
        return f"{text}: {self.detail}" if self.detail else text

    def to_json(self) -> dict[str, str]:
        return {"status": self.status, "about": self.about, "digest": self.digest,
                "file": self.file, "detail": self.detail}


@dataclass
class Loaded:
    """A manifest as read for checking: the manifest, or why it could not be used."""

    digest: str
    manifest: Manifest | None
    problem: Finding | None


def load(store: ArtifactStore, digest: str) -> Loaded:
    """Read a manifest without trusting it: a missing, unparsable or foreign one is a finding."""
    key = manifest_key(digest)
    try:
        raw = store.backend.get_bytes(key)
    except ObjectMissing:
        return Loaded(digest, None, Finding(MISSING, digest, key, "no manifest"))
    try:
        manifest = store.parse_manifest(digest, raw)
    except StoreError as exc:
        return Loaded(digest, None, Finding(INCONSISTENT, digest, key,
                                            str(exc).split(" is corrupt: ", 1)[-1]))
    if manifest.digest != digest:
        return Loaded(digest, None, Finding(INCONSISTENT, digest, key,
                                            f"it names artifact {manifest.digest[:12]!r}"))
    if manifest.checksum is not None and manifest.checksum != manifest.computed_checksum():
        return Loaded(digest, manifest, Finding(INCONSISTENT, digest, key,
                                                "edited after it was written (its checksum "
                                                "no longer matches its fields)"))
    return Loaded(digest, manifest, None)


def inputs_of(loaded: Loaded) -> list[str]:
    made = loaded.manifest.produced_by if loaded.manifest else None
    return sorted(set(made.inputs.values())) if made else []


def walk_upstream(store: ArtifactStore, root: str) -> list[Loaded]:
    """The root and every artifact up its chain, each manifest read once."""
    seen: dict[str, Loaded] = {}
    queue = deque([root])
    while queue:
        digest = queue.popleft()
        if digest not in seen:
            seen[digest] = load(store, digest)
            queue.extend(d for d in inputs_of(seen[digest]) if d not in seen)
    return list(seen.values())


def downstream_digests(store: ArtifactStore, root: str) -> list[str]:
    """The root and everything built from it: one pass over the store's manifests that keeps
    only who consumes what (digests), not the manifests."""
    consumers: dict[str, list[str]] = {}
    for digest in store.digests():
        for parent in inputs_of(load(store, digest)):
            consumers.setdefault(parent, []).append(digest)
    found, queue = [root], deque([root])
    seen = {root}
    while queue:
        for product in consumers.get(queue.popleft(), []):
            if product not in seen:
                seen.add(product)
                found.append(product)
                queue.append(product)
    return found


@dataclass
class Scope:
    """What a check covers: its artifacts (each manifest read as it is checked) and cache
    entries (None: the entries that made the artifacts checked)."""

    count: int
    artifacts: Iterable[Loaded]
    cache: list[str] | None


class Checker:
    """Re-hashes content against manifests; each stored object is hashed once per check."""

    def __init__(self, store: ArtifactStore,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.on_bytes = on_bytes
        # object digest -> what it hashes to (None: gone), most recent last
        self.hashed: OrderedDict[str, str | None] = OrderedDict()

    def object_hash(self, digest: str) -> str | None:
        if digest in self.hashed:
            self.hashed.move_to_end(digest)
            return self.hashed[digest]
        try:
            actual = self.store.object_sha256(digest, self.on_bytes)
        except ObjectMissing:
            actual = None
        self.hashed[digest] = actual
        if len(self.hashed) > REMEMBERED_OBJECTS:
            self.hashed.popitem(last=False)
        return actual

    def artifact(self, loaded: Loaded) -> list[Finding]:
        """Every problem of one artifact, or one `ok`."""
        findings = [loaded.problem] if loaded.problem else []
        manifest = loaded.manifest
        if manifest is not None:
            findings += self._content(manifest) + self._inputs(manifest)
        return findings or [Finding(OK, loaded.digest, manifest.name or "-", _summary(manifest))]

    def _content(self, m: Manifest) -> list[Finding]:
        if m.files is None:
            return self._object(m.digest, m.digest, object_key(m.digest), m.name)
        findings = []
        if tree_digest(m.files) != m.digest or sum(f.size for f in m.files) != m.size:
            findings.append(Finding(INCONSISTENT, m.digest, manifest_key(m.digest),
                                    "its file listing does not hash to its digest"))
        for entry in m.files:
            findings += self._object(m.digest, entry.sha256, entry.path, object_key(entry.sha256))
        return findings

    def _object(self, artifact: str, digest: str, file: str, note: str | None) -> list[Finding]:
        actual = self.object_hash(digest)
        where = f"{file} ({note})" if note else file
        if actual is None:
            return [Finding(MISSING, artifact, where, "the stored bytes are gone")]
        if actual != digest:
            return [Finding(DIFFERS, artifact, where,
                            f"hashes to {actual[:12]}, the manifest says {digest[:12]}")]
        return []

    def _inputs(self, m: Manifest) -> list[Finding]:
        made = m.produced_by
        if made is None:
            return []
        return [Finding(MISSING, m.digest, manifest_key(digest),
                        f"its input {name!r} is not in the store")
                for name, digest in sorted(made.inputs.items())
                if not self.store.backend.exists(manifest_key(digest))]

    def cache_entry(self, key: str) -> list[Finding]:
        """A cache entry must name outputs that exist (else a hit would hand out nothing)."""
        where = f"cache/{key}.json"
        try:
            entry = json.loads(self.store.backend.get_bytes(where))
            outputs = dict(entry["outputs"])
        except (ValueError, KeyError, TypeError) as exc:
            return [Finding(INCONSISTENT, key, where, f"not a cache entry ({type(exc).__name__})",
                            CACHE_ENTRY)]
        missing = [f"{name} {digest[:12]}" for name, digest in sorted(outputs.items())
                   if not isinstance(digest, str)
                   or not self.store.backend.exists(manifest_key(digest))]
        if missing:
            return [Finding(MISSING, key, where, f"points at no artifact: {', '.join(missing)}",
                            CACHE_ENTRY)]
        return [Finding(OK, key, where, f"cache entry of step {entry.get('step', '?')}",
                        CACHE_ENTRY)]


def _summary(m: Manifest) -> str:
    files = f", {len(m.files)} files" if m.files is not None else ""
    return f"{m.kind}, {m.size} bytes{files}"


def cache_keys(store: ArtifactStore) -> list[str]:
    return [key.rsplit("/", 1)[-1].removesuffix(".json") for key in store.backend.list("cache")]


def scope(store: ArtifactStore, ref: str | None, downstream: bool = False) -> Scope:
    """REF and its chain (up, or down with `downstream`), or every artifact and cache entry
    of the store (ref None)."""
    if ref is None:
        return _lazy(store, list(store.digests()), cache_keys(store))
    root = store.resolve(ref)
    if downstream:
        return _lazy(store, downstream_digests(store, root), None)
    chain = walk_upstream(store, root)  # a chain is short: its manifests are read once
    return Scope(len(chain), chain, None)


def _lazy(store: ArtifactStore, digests: list[str], cache: list[str] | None) -> Scope:
    return Scope(len(digests), (load(store, d) for d in digests), cache)


def check(store: ArtifactStore, what: Scope,
          on_bytes: Callable[[int], None] | None = None,
          on_artifact: Callable[[Loaded], None] | None = None) -> Iterator[Finding]:
    """Findings for each artifact as it is checked, then for each cache entry.

    `on_artifact` is told of each artifact before its content is re-hashed and `on_bytes`
    of each chunk hashed (a progress bar)."""
    checker = Checker(store, on_bytes)
    made_by: set[str] = set()
    for item in what.artifacts:
        if on_artifact is not None:
            on_artifact(item)
        yield from checker.artifact(item)
        made = item.manifest.produced_by if item.manifest else None
        if what.cache is None and made is not None and made.cache_key:
            made_by.add(made.cache_key)
    cache = what.cache if what.cache is not None else sorted(
        k for k in made_by if store.backend.exists(f"cache/{k}.json"))
    for key in cache:
        yield from checker.cache_entry(key)
