"""Content-addressed artifact store with manifests.

Layout (the same on S3 and on a local directory):

    objects/sha256/<d[:2]>/<digest>     file content, by the SHA-256 of its bytes
    manifests/<digest>.json             what an artifact is and who made it
    cache/<cache_key>.json              step cache entries: cache key -> output digests

A file artifact's digest is the SHA-256 of its bytes. A directory artifact (a model
dir) stores each file as an object and its digest is the SHA-256 of the sorted
listing "path\\tsize\\tsha256\\n". The manifest is written last: an artifact
without a manifest does not exist, so a crash mid-upload leaves nothing visible.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel, Field, ValidationError

from steps.core.backends import CHUNK, Backend, backend_from_url, check_key
from steps.core.errors import ArtifactNotFound, StoreError

MANIFEST_SCHEMA = "tailwise.manifest/1"
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
DIR_MEDIA_TYPE = "application/x-tailwise-directory"


class ProducedBy(BaseModel):
    """Who made an artifact: enough to audit it and to rebuild it."""

    step: str
    step_version: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)
    cache_key: str | None = None
    flow_run_id: str | None = None
    flow_name: str | None = None
    mlflow_run_id: str | None = None
    git_revision: str | None = None
    # Git tree id of the step's own folder (steps/<name>): changes exactly when its code does.
    code_revision: str | None = None
    container_image: str | None = None
    started_at: str | None = None
    ended_at: str | None = None


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


# ProducedBy fields added after manifests were first written: they count in the checksum only
# when set, so manifests written before them still verify.
PRODUCED_BY_LATER = ("flow_name",)


class Manifest(BaseModel):
    schema_: str = Field(MANIFEST_SCHEMA, alias="schema")
    digest: str
    kind: str
    media_type: str
    size: int
    created_at: str
    name: str | None = None
    files: list[FileEntry] | None = None
    produced_by: ProducedBy | None = None
    # Where a source artifact came from, e.g. a Hub repo, its commit and blob ids (hub.py).
    source: dict[str, Any] | None = None
    # SHA-256 of the manifest's other fields: an edited manifest no longer matches it.
    checksum: str | None = None

    model_config = {"populate_by_name": True}

    @property
    def is_dir(self) -> bool:
        return self.files is not None

    def computed_checksum(self) -> str:
        """What `checksum` must be: the SHA-256 of every other field, as canonical JSON."""
        fields = self.model_dump(mode="json", by_alias=True, exclude={"checksum"})
        made = fields.get("produced_by") or {}
        for later in PRODUCED_BY_LATER:
            if made.get(later) is None:
                made.pop(later, None)
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return f"sha256:{hashlib.sha256(canonical.encode()).hexdigest()}"

    def sealed(self) -> Manifest:
        return self.model_copy(update={"checksum": self.computed_checksum()})

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=2).encode()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(files: list[FileEntry]) -> str:
    ordered = sorted(files, key=lambda f: f.path)
    listing = "".join(f"{f.path}\t{f.size}\t{f.sha256}\n" for f in ordered)
    return hashlib.sha256(listing.encode()).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def object_key(digest: str) -> str:
    return f"objects/sha256/{digest[:2]}/{digest}"


def manifest_key(digest: str) -> str:
    return f"manifests/{digest}.json"


def digest_from_ref(ref: str) -> str:
    """The hex digest (or prefix) inside a reference: `abc123`, `sha256:abc..`, a URI."""
    # A URI is reduced to its last part below; one that climbs (`..`, `%2e%2e`) or holds
    # a backslash or NUL is a trick, not an address of this store's manifests.
    segments = re.split(r"[/\\]", ref) + re.split(r"[/\\]", unquote(ref))
    if any(part in ("..", ".") for part in segments) or any(c in ref for c in "\\\x00"):
        raise ArtifactNotFound(f"artifact reference {_shorten(ref)} is not a digest, digest "
                               "prefix or artifact URI (it holds a path trick)")
    text = ref.strip().rstrip("/")
    text = text.rsplit("/", 1)[-1]
    text = text.removesuffix(".json").removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{4,64}", text):
        raise ArtifactNotFound(f"artifact reference {_shorten(ref)} is not a digest, digest "
                               "prefix (at least 4 hex characters) or artifact URI")
    return text


def _shorten(text: str, limit: int = 80) -> str:
    """repr of a user's text, cut so that an error message stays one short line."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"


def _first_line(text: object) -> str:
    return (str(text).strip().splitlines() or [""])[0]


class ArtifactStore:
    """put/get/exists/stat/list of immutable, content-addressed artifacts."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    def from_url(cls, url: str) -> ArtifactStore:
        return cls(backend_from_url(url))

    @property
    def url(self) -> str:
        return self.backend.url

    def uri(self, digest: str) -> str:
        return f"{self.url}/{manifest_key(digest)}"

    # -- writing ---------------------------------------------------------------

    def put(self, path: Path | str, kind: str, *, media_type: str | None = None,
            produced_by: ProducedBy | None = None, source: dict[str, Any] | None = None,
            links_into: Path | None = None) -> Manifest:
        """Store a file or a directory; return its manifest (existing one if already stored).

        source: where a source artifact came from, recorded in its manifest.
        links_into: a folder that a directory's symlinks may also point into (a Hub cache
            repo's blobs); other links out of the directory are refused.
        """
        path = Path(path)
        if path.is_dir():
            files, sources = self._scan_dir(path, links_into)
            digest, size = tree_digest(files), sum(f.size for f in files)
            media_type = media_type or DIR_MEDIA_TYPE
        elif path.is_file():
            digest, size = sha256_file(path), path.stat().st_size
            files, sources = None, {digest: path}
            media_type = media_type or mimetypes.guess_type(path.name)[0] or \
                "application/octet-stream"
        else:
            raise StoreError(f"cannot store {path}: no such file or directory")
        existing = self._read_manifest(digest)
        if existing is not None:
            return existing
        for object_digest, file_path in sources.items():
            if not self.backend.exists(object_key(object_digest)):
                self.backend.put_file(object_key(object_digest), file_path)
        manifest = Manifest(digest=digest, kind=kind, media_type=media_type, size=size,
                            created_at=now(), name=path.name, files=files,
                            produced_by=produced_by, source=source).sealed()
        # Two writers of one digest race here: the first manifest stays, and both get it.
        self.backend.put_bytes_if_absent(manifest_key(digest), manifest.to_json())
        return self._read_manifest(digest) or manifest

    @staticmethod
    def _scan_dir(root: Path, links_into: Path | None = None
                  ) -> tuple[list[FileEntry], dict[str, Path]]:
        files, sources = [], {}
        inside = [root.resolve()] + ([links_into.resolve()] if links_into else [])
        for path in sorted(root.rglob("*")):
            # A link out of the directory (to /etc/passwd, to another model) would copy a
            # file the artifact does not own into the store: refuse it. Links that stay
            # inside are stored as the content they point at.
            if path.is_symlink() and not any(path.resolve().is_relative_to(i) for i in inside):
                raise StoreError(f"cannot store directory {root}: {path.relative_to(root)} is "
                                 f"a symlink out of it (to {os.readlink(path)}); copy the file "
                                 "in instead (cp -L)")
            if not path.is_file():
                continue
            relative = path.relative_to(root).as_posix()
            digest = sha256_file(path)
            files.append(FileEntry(path=check_key(relative), size=path.stat().st_size,
                                   sha256=digest))
            sources[digest] = path
        if not files:
            raise StoreError(f"cannot store directory {root}: it holds no files")
        return files, sources

    # -- reading ---------------------------------------------------------------

    def _read_manifest(self, digest: str) -> Manifest | None:
        if not self.backend.exists(manifest_key(digest)):
            return None
        manifest = self.parse_manifest(digest, self.backend.get_bytes(manifest_key(digest)))
        # A manifest filed under one digest that names another would hand out other bytes.
        if manifest.digest != digest:
            raise StoreError(f"manifest of {digest[:12]} in {self.url} is corrupt: it describes "
                             f"artifact {_first_line(manifest.digest)[:12]!r}")
        return manifest

    def parse_manifest(self, digest: str, raw: bytes) -> Manifest:
        """The manifest filed under `digest`, from its bytes; StoreError when it is not one."""
        try:
            return Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(f"manifest of {digest[:12]} in {self.url} is corrupt: "
                             f"{_first_line(exc.errors()[0]['msg'])}") from exc

    def _read_json(self, key: str) -> Any:
        """A small JSON document of the store (ref, cache entry); StoreError when unreadable."""
        try:
            return json.loads(self.backend.get_bytes(key))
        except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
            raise StoreError(f"{key} in {self.url} is corrupt: not JSON") from exc

    def resolve(self, ref: str) -> str:
        """Full digest for a digest, unique prefix or URI; ArtifactNotFound otherwise."""
        wanted = digest_from_ref(ref)
        if DIGEST_RE.fullmatch(wanted):
            if self.backend.exists(manifest_key(wanted)):
                return wanted
            raise ArtifactNotFound(f"no artifact {wanted[:12]}... in {self.url}")
        matches = [d for d in self.digests() if d.startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ArtifactNotFound(f"no artifact matches {ref!r} in {self.url}")
        raise ArtifactNotFound(f"{ref!r} is ambiguous in {self.url}: "
                               f"{', '.join(m[:12] for m in matches[:5])}")

    def stat(self, ref: str) -> Manifest:
        manifest = self._read_manifest(self.resolve(ref))
        if manifest is None:  # deleted between resolve and read
            raise ArtifactNotFound(f"no artifact {ref!r} in {self.url}")
        return manifest

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
        except ArtifactNotFound:
            return False

    def digests(self) -> Iterator[str]:
        for key in self.backend.list("manifests"):
            name = key.rsplit("/", 1)[-1].removesuffix(".json")
            if DIGEST_RE.fullmatch(name):
                yield name

    def require_artifacts(self) -> None:
        """StoreError unless the store holds at least one manifest (a wrong --store, say)."""
        if next(self.digests(), None) is None:
            raise StoreError(f"store {self.url} holds no manifests (no artifacts): is --store / "
                             "TAILWISE_STORE the right one?")

    def list(self, kind: str | None = None) -> list[Manifest]:
        manifests = (self._read_manifest(d) for d in self.digests())
        return [m for m in manifests if m is not None and (kind is None or m.kind == kind)]

    def get(self, ref: str, dest: Path | str) -> Path:
        """Download an artifact to `dest` (a file path, or a directory for dir artifacts)."""
        manifest = self.stat(ref)
        dest = Path(dest)
        if manifest.files is None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._fetch_object(manifest.digest, dest)
            return dest
        for entry in manifest.files:
            target = dest / check_key(entry.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fetch_object(entry.sha256, target)
        return dest

    def object_sha256(self, digest: str, on_bytes: Callable[[int], None] | None = None) -> str:
        """Re-hash a stored object from its bytes, streamed (ObjectMissing if it is gone)."""
        hasher = hashlib.sha256()
        for chunk in self.backend.iter_chunks(object_key(digest)):
            hasher.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        return hasher.hexdigest()

    def _fetch_object(self, digest: str, dest: Path) -> None:
        actual = self.backend.get_file(object_key(digest), dest)
        if actual != digest:
            dest.unlink(missing_ok=True)
            raise StoreError(f"object {digest[:12]} in {self.url} is corrupt "
                             f"(content hashes to {actual[:12]})")

    def local_path(self, digest: str) -> Path | None:
        """The object file itself when the store is a local directory (no copy needed)."""
        root = getattr(self.backend, "root", None)
        return None if root is None else root / object_key(digest)

    # -- named refs --------------------------------------------------------------

    def set_ref(self, name: str, digest: str) -> None:
        """Point a mutable name (e.g. `audit/nightly`) at an artifact, like a git branch."""
        entry = {"digest": self.resolve(digest), "updated_at": now()}
        self.backend.put_bytes(f"refs/{check_key(name)}.json", json.dumps(entry).encode())

    def get_ref(self, name: str) -> str | None:
        """The digest a ref points at, if the ref and its artifact exist."""
        key = f"refs/{check_key(name)}.json"
        if not self.backend.exists(key):
            return None
        entry = self._read_json(key)
        digest = entry.get("digest") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise StoreError(f"{key} in {self.url} is corrupt: no artifact digest")
        return digest if self.backend.exists(manifest_key(digest)) else None

    # -- step cache ------------------------------------------------------------

    def cache_put(self, cache_key: str, entry: dict[str, Any]) -> None:
        self.backend.put_bytes(f"cache/{cache_key}.json", json.dumps(entry, indent=2).encode())

    def cache_get(self, cache_key: str) -> dict[str, Any] | None:
        """The cache entry if every output it names still exists, else None."""
        key = f"cache/{cache_key}.json"
        if not self.backend.exists(key):
            return None
        try:
            entry = self._read_json(key)
        except StoreError:
            return None  # a corrupt entry is a miss: the step runs again and rewrites it
        outputs = entry.get("outputs") if isinstance(entry, dict) else None
        if not isinstance(outputs, dict) or not all(
                isinstance(d, str) and DIGEST_RE.fullmatch(d) for d in outputs.values()):
            return None
        if all(self.backend.exists(manifest_key(d)) for d in outputs.values()):
            return entry
        return None

    def cache_entries(self) -> list[tuple[str, dict[str, Any]]]:
        entries = []
        for key in self.backend.list("cache"):
            cache_key = key.rsplit("/", 1)[-1].removesuffix(".json")
            entries.append((cache_key, self._read_json(key)))
        return entries

    def cache_delete(self, cache_key: str) -> None:
        self.backend.delete(f"cache/{cache_key}.json")


def default_store_url() -> str:
    return os.environ.get("TAILWISE_STORE", str(Path(".tailwise") / "store"))


def open_store(url: str | None = None) -> ArtifactStore:
    """The store named by `url`, else by $TAILWISE_STORE, else `.tailwise/store`."""
    return ArtifactStore.from_url(url or default_store_url())
