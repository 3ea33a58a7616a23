"""The artifact store, against a local directory, moto's S3 server and nanio."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from steps.core.backends import LocalBackend, S3Backend
from steps.core.errors import ArtifactNotFound, StoreError
from steps.core.store import ArtifactStore, Manifest, ProducedBy, manifest_key, tree_digest

BACKENDS = ["local", "moto", "nanio"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path, monkeypatch) -> ArtifactStore:
    """A fresh, empty store on each backend (S3 ones under a unique prefix)."""
    if request.param == "local":
        return ArtifactStore(LocalBackend(tmp_path / "store"))
    info = request.getfixturevalue(f"s3_{request.param}")
    for key, value in info.env().items():
        monkeypatch.setenv(key, value)
    return ArtifactStore.from_url(f"s3://{info.bucket}/{uuid.uuid4().hex}")


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    import numpy as np

    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def model_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"layers": 2}))
    write_random(root / "model.safetensors", 300_000, seed=1)
    (root / "sub" / "tokenizer.json").write_text("{}")
    return root


def test_file_roundtrip_is_content_addressed(store, tmp_path):
    source = write_random(tmp_path / "blob.bin", 1_000_000)
    manifest = store.put(source, "blob")
    assert manifest.digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest.size == 1_000_000 and manifest.kind == "blob" and manifest.files is None
    out = store.get(manifest.digest[:10], tmp_path / "out" / "blob.bin")
    assert out.read_bytes() == source.read_bytes()
    assert store.exists(manifest.digest) and store.stat(store.uri(manifest.digest)) == manifest


def test_directory_is_one_artifact(store, tmp_path):
    source = model_dir(tmp_path / "model")
    manifest = store.put(source, "model")
    assert [f.path for f in manifest.files] == ["config.json", "model.safetensors",
                                                "sub/tokenizer.json"]
    assert manifest.digest == tree_digest(manifest.files)
    out = store.get(manifest.digest, tmp_path / "copy")
    for name in ("config.json", "model.safetensors", "sub/tokenizer.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


def test_same_content_is_stored_once_and_keeps_first_manifest(store, tmp_path):
    first = write_random(tmp_path / "a.bin", 1000)
    second = tmp_path / "b.bin"
    second.write_bytes(first.read_bytes())
    made = ProducedBy(step="maker", step_version="1", params={"x": 1})
    m1 = store.put(first, "blob", produced_by=made)
    m2 = store.put(second, "blob")
    assert m1 == m2 and m2.produced_by == made
    assert len(list(store.digests())) == 1


def test_list_and_kind_filter(store, tmp_path):
    store.put(write_random(tmp_path / "a.bin", 10, seed=1), "blob")
    store.put(model_dir(tmp_path / "m"), "model")
    assert {m.kind for m in store.list()} == {"blob", "model"}
    assert [m.kind for m in store.list("model")] == ["model"]


def test_s3_listing_asks_for_a_page_only_when_the_last_is_used(s3_moto, monkeypatch):
    for key, value in s3_moto.env().items():
        monkeypatch.setenv(key, value)
    backend = S3Backend(s3_moto.bucket, uuid.uuid4().hex)
    backend.list_page_size = 2
    keys = [f"manifests/{i:02d}.json" for i in range(5)]
    for key in keys:
        backend.put_bytes(key, b"{}")
    requests = []
    backend.client.meta.events.register("before-call.s3.ListObjectsV2",
                                        lambda **kwargs: requests.append(1))
    listing = backend.list("manifests")
    assert next(listing) == keys[0] and len(requests) == 1
    assert [keys[0], *listing] == keys and len(requests) == 3


def test_manifests_written_before_flow_name_still_verify(tmp_path):
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    made = ProducedBy(step="maker", step_version="1", flow_run_id=str(uuid.uuid4()))
    manifest = store.put(write_random(tmp_path / "a.bin", 10), "blob", produced_by=made)
    # What the code wrote before ProducedBy had flow_name: no such key, checksummed without it.
    old = json.loads(manifest.to_json())
    del old["checksum"], old["produced_by"]["flow_name"]
    canonical = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    old["checksum"] = f"sha256:{hashlib.sha256(canonical).hexdigest()}"
    read = Manifest.model_validate(old)
    assert read.checksum == read.computed_checksum() == manifest.checksum
    named = ProducedBy(**{**made.model_dump(), "flow_name": "alpha_prune"})
    renamed = store.put(write_random(tmp_path / "b.bin", 10, seed=2), "blob", produced_by=named)
    edited = renamed.model_copy(update={"produced_by": made})
    assert edited.checksum != edited.computed_checksum()  # a set flow_name is covered


def test_unknown_and_ambiguous_refs(store, tmp_path):
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        store.stat("0" * 64)
    with pytest.raises(ArtifactNotFound, match="not a digest"):
        store.stat("../etc/passwd")
    with pytest.raises(ArtifactNotFound, match="not a digest"):
        store.stat("ab")  # a prefix needs 4 hex digits
    real = store.put(write_random(tmp_path / "a.bin", 10), "blob")
    for twin in ("abcd" + "0" * 60, "abcd" + "1" * 60):
        store.backend.put_bytes(manifest_key(twin), real.model_copy(update={"digest": twin})
                                .to_json())
    with pytest.raises(ArtifactNotFound, match="ambiguous"):
        store.stat("abcd")
    assert store.resolve("abcd0") == "abcd" + "0" * 60
    assert store.resolve(real.digest[:12]) == real.digest


@pytest.mark.parametrize("key", ["../x", "/abs/key", "a/../../b", "a//b", "a\\b", "c:/x", ""])
def test_keys_that_escape_the_store_are_refused(tmp_path, key):
    backend = LocalBackend(tmp_path / "store")
    with pytest.raises(StoreError):
        backend.put_bytes(key, b"x")


def test_symlink_out_of_the_store_is_refused(tmp_path):
    backend = LocalBackend(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "store" / "objects").mkdir()
    (tmp_path / "store" / "objects" / "evil").symlink_to(outside)
    with pytest.raises(StoreError, match="outside the store"):
        backend.put_bytes("objects/evil/file", b"x")
    assert not any(outside.iterdir())


def test_manifest_with_escaping_file_path_is_refused(tmp_path):
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    manifest = store.put(model_dir(tmp_path / "m"), "model")
    hostile = json.loads(manifest.to_json())
    hostile["files"][0]["path"] = "../../escaped.txt"
    store.backend.put_bytes(manifest_key(manifest.digest), json.dumps(hostile).encode())
    with pytest.raises(StoreError, match="escapes the store"):
        store.get(manifest.digest, tmp_path / "dest" / "inner")
    assert not (tmp_path / "escaped.txt").exists()


def test_corrupt_object_is_detected(tmp_path):
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    manifest = store.put(write_random(tmp_path / "a.bin", 100), "blob")
    store.local_path(manifest.digest).write_bytes(b"tampered")
    with pytest.raises(StoreError, match="corrupt"):
        store.get(manifest.digest, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_missing_bucket_names_endpoint_and_bucket(s3_moto, monkeypatch):
    for key, value in s3_moto.env().items():
        monkeypatch.setenv(key, value)
    store = ArtifactStore(S3Backend("no-such-bucket"))
    with pytest.raises(StoreError, match=r"no-such-bucket.*does not exist") as err:
        store.put(Path(__file__), "text")
    assert s3_moto.endpoint_url in str(err.value)


def test_wrong_credentials_are_reported(s3_nanio, monkeypatch):
    for key, value in s3_nanio.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    store = ArtifactStore(S3Backend(s3_nanio.bucket))
    with pytest.raises(StoreError, match="refused the credentials"):
        store.put(Path(__file__), "text")


def test_server_down_is_reported(monkeypatch):
    from tailwise_dev.services import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("TAILWISE_S3_MAX_ATTEMPTS", "2")
    with pytest.raises(StoreError, match=r"cannot reach the S3 endpoint .* is the server running"):
        ArtifactStore(S3Backend("bucket")).put(Path(__file__), "text")


# The child uploads a file big enough for a multipart upload and stops (blocks) once the
# first part is through, so the parent can kill it at a known point: mid-upload.
KILLED_UPLOAD = """
import sys, threading
from steps.core.store import ArtifactStore
store = ArtifactStore.from_url(sys.argv[1])
client = store.backend.client
real_upload = client.upload_file
def upload_and_hang(*args, **kwargs):
    # Parts go up on several threads: count under a lock and announce only once.
    sent, lock, announced, hang = [0], threading.Lock(), threading.Event(), threading.Event()
    def progress(n):
        with lock:
            sent[0] += n
            first = sent[0] >= 16 * 1024 * 1024 and not announced.is_set()
            if first:
                announced.set()
                print("uploading", flush=True)
        if announced.is_set():
            hang.wait()
    return real_upload(*args, Callback=progress, **kwargs)
client.upload_file = upload_and_hang
store.put(sys.argv[2], "blob")
print("finished", flush=True)
"""


def test_killed_upload_leaves_nothing_visible_and_rerun_completes(s3_moto, tmp_path,
                                                                   monkeypatch):
    source = write_random(tmp_path / "big.bin", 80 * 1024 * 1024, seed=7)
    url = f"s3://{s3_moto.bucket}/{uuid.uuid4().hex}"
    env = os.environ | s3_moto.env()
    child = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, url, str(source)], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "uploading"
    child.send_signal(signal.SIGKILL)
    child.wait()

    for key, value in s3_moto.env().items():
        monkeypatch.setenv(key, value)
    store = ArtifactStore.from_url(url)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert not store.exists(digest)
    assert list(store.digests()) == []
    assert list(store.backend.list("objects")) == []  # an unfinished multipart is invisible

    manifest = store.put(source, "blob")
    assert manifest.digest == digest
    assert store.get(digest, tmp_path / "back.bin").read_bytes() == source.read_bytes()
