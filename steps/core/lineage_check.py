"""`tailwise lineage check`: prove that the store holds what its manifests say.

For each artifact: its manifest is a manifest, names its own digest and still matches its
checksum (an edit shows); its content re-hashes to the digests it records (streamed, so
memory stays flat whatever the size); its input digests exist. Each cache entry must point
at existing artifacts. A problem is reported against the artifact it breaks, with the
file it is in, and the walk goes on: a broken upstream manifest does not hide the rest.
"""

from __future__ import annotations

import json
from collections import deque
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


@dataclass(frozen=True)
class Finding:
    """What was found about one artifact (or cache entry), and in which file."""

    status: str
    digest: str
    file: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def line(self) -> str:
        text = f"{self.status:<21} {self.digest[:12]}  {self.file}"
        return f"{text}: {self.detail}" if self.detail else text

    def to_json(self) -> dict[str, str]:
        return {"status": self.status, "digest": self.digest, "file": self.file,
                "detail": self.detail}


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


def walk_downstream(store: ArtifactStore, root: str) -> list[Loaded]:
    """The root and everything built from it (every manifest of the store is read)."""
    everything = {d: load(store, d) for d in store.digests()}
    consumers: dict[str, list[str]] = {}
    for loaded in everything.values():
        for digest in inputs_of(loaded):
            consumers.setdefault(digest, []).append(loaded.digest)
    found, queue = {root: everything.get(root) or load(store, root)}, deque([root])
    while queue:
        for product in consumers.get(queue.popleft(), []):
            if product not in found:
                found[product] = everything[product]
                queue.append(product)
    return list(found.values())


class Checker:
    """Re-hashes content against manifests; each stored object is hashed once per check."""

    def __init__(self, store: ArtifactStore,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.on_bytes = on_bytes
        self.hashed: dict[str, str | None] = {}  # object digest -> what it hashes to (None: gone)

    def object_hash(self, digest: str) -> str | None:
        if digest not in self.hashed:
            try:
                self.hashed[digest] = self.store.object_sha256(digest, self.on_bytes)
            except ObjectMissing:
                self.hashed[digest] = None
        return self.hashed[digest]

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
            return [Finding(INCONSISTENT, key, where, f"not a cache entry ({type(exc).__name__})")]
        missing = [f"{name} {digest[:12]}" for name, digest in sorted(outputs.items())
                   if not isinstance(digest, str)
                   or not self.store.backend.exists(manifest_key(digest))]
        if missing:
            return [Finding(MISSING, key, where, f"points at no artifact: {', '.join(missing)}")]
        return [Finding(OK, key, where, f"cache entry of step {entry.get('step', '?')}")]


def _summary(m: Manifest) -> str:
    files = f", {len(m.files)} files" if m.files is not None else ""
    return f"{m.kind}, {m.size} bytes{files}"


def cache_keys(store: ArtifactStore) -> list[str]:
    return [key.rsplit("/", 1)[-1].removesuffix(".json") for key in store.backend.list("cache")]


def targets(store: ArtifactStore, ref: str | None, downstream: bool = False) -> list[Loaded]:
    """What a check covers: REF and its chain (up, or down), or every artifact (ref None)."""
    if ref is None:
        return [load(store, digest) for digest in store.digests()]
    root = store.resolve(ref)
    return walk_downstream(store, root) if downstream else walk_upstream(store, root)


def check(store: ArtifactStore, loaded: Iterable[Loaded], cache: Iterable[str],
          on_bytes: Callable[[int], None] | None = None) -> Iterator[Finding]:
    """Findings for each artifact, then for each cache entry."""
    checker = Checker(store, on_bytes)
    for item in loaded:
        yield from checker.artifact(item)
    for key in cache:
        yield from checker.cache_entry(key)


def cache_keys_of(loaded: Iterable[Loaded], store: ArtifactStore) -> list[str]:
    """The cache entries that made these artifacts, where they are still in the store."""
    keys = {item.manifest.produced_by.cache_key for item in loaded
            if item.manifest and item.manifest.produced_by and item.manifest.produced_by.cache_key}
    return sorted(k for k in keys if store.backend.exists(f"cache/{k}.json"))
