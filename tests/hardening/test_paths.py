"""Keys, model paths and references that try to leave the store or the model directory.

`..`, absolute paths, backslashes, NUL bytes, percent-encoded dots and URL tricks are
refused with a TailwiseError; symlinks out of a directory artifact are refused rather than
copied into the store. Checked on a local store and on moto's S3 server.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steps.core.backends import LocalBackend, backend_from_url, check_key
from steps.core.errors import ArtifactNotFound, StoreError
from steps.core.lineage import downstream, upstream
from steps.core.store import (
    ArtifactStore,
    FileEntry,
    Manifest,
    manifest_key,
    object_key,
    tree_digest,
)
from steps.core.weights import WeightsError, list_weight_matrices

BAD_KEYS = [
    "../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "..", "", "a\\..\\b",
    "..\\x", "a\x00b", "%2e%2e/x", "a/%2E%2E/%2e%2e/x", "%2fetc/passwd", "a%00b",
    "s3://bucket/../x", "file:///etc/passwd", "C:\\windows", "c:/x", "a/..%2fx",
]
TRICK_REFS = [
    "../../../etc/passwd", "/etc/passwd", "s3://bucket/../x", "file:///etc/passwd",
    "%2e%2e/%2e%2e/abcd", "abcd\\..\\", "abcd\x00", "..", "s3://b/../manifests/" + "ab" * 32,
    "file:///store/%2e%2e/manifests/" + "ab" * 32 + ".json", "ab" * 32 + "\\",
]


@pytest.fixture(params=["local", "moto"])
def store(request, tmp_path: Path, monkeypatch) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(LocalBackend(tmp_path / "store"))
    info = request.getfixturevalue("s3_moto")
    for key, value in info.env().items():
        monkeypatch.setenv(key, value)
    store = ArtifactStore.from_url(f"s3://{info.bucket}/{uuid.uuid4().hex}")
    store.s3_info = info  # for listing the whole bucket afterwards
    return store


def all_objects(store: ArtifactStore) -> list[str]:
    """Every object the backend holds, as full paths / bucket keys (not just under the store)."""
    if isinstance(store.backend, LocalBackend):
        root = store.backend.root.parent
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    client = store.s3_info.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=store.s3_info.bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", BAD_KEYS)
def test_check_key_refuses_escapes(key: str) -> None:
    with pytest.raises(StoreError, match="artifact key"):
        check_key(key)


@pytest.mark.parametrize("key", ["manifests/ab.json", "objects/sha256/ab/abcd", "refs/a/b.json",
                                 "my model/100%.txt", "sub/tokenizer.json"])
def test_check_key_keeps_ordinary_keys(key: str) -> None:
    assert check_key(key) == key


def test_backends_refuse_bad_keys_and_write_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "payload"
    source.write_text("payload")
    digest = store.put(source, "text").digest
    before = all_objects(store)
    for key in BAD_KEYS:
        for action in (lambda k: store.backend.put_bytes(k, b"x"),
                       lambda k: store.backend.put_file(k, source),
                       lambda k: store.backend.get_bytes(k),
                       lambda k: store.backend.exists(k),
                       lambda k: store.backend.delete(k)):
            with pytest.raises(StoreError, match="artifact key"):
                action(key)
        with pytest.raises(StoreError):
            store.set_ref(key, digest)
    assert all_objects(store) == before


def test_named_refs_stay_in_refs(store: ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    digest = store.put(tmp_path / "a.txt", "text").digest
    store.set_ref("audit/nightly", digest)
    assert store.get_ref("audit/nightly") == digest
    with pytest.raises(StoreError):
        store.get_ref("../manifests/" + digest)


# --- manifests that point outside ---------------------------------------------------------


def forged_dir_manifest(store: ArtifactStore, tmp_path: Path, paths: list[str]) -> str:
    """Store one real object, then a directory manifest that files it under `paths`."""
    (tmp_path / "blob").write_text("owned")
    blob = store.put(tmp_path / "blob", "blob")
    files = [FileEntry(path=p, size=blob.size, sha256=blob.digest) for p in paths]
    digest = tree_digest(files)
    manifest = Manifest(digest=digest, kind="model", media_type="x", size=1, created_at="now",
                        files=files)
    store.backend.put_bytes(manifest_key(digest), manifest.to_json())
    return digest


@pytest.mark.parametrize("path", ["../escaped", "sub/../../escaped", "/tmp/escaped",
                                  "%2e%2e/escaped", "..\\escaped", "a\x00b"])
def test_get_refuses_manifest_paths_out_of_dest(store: ArtifactStore, tmp_path: Path,
                                                path: str) -> None:
    digest = forged_dir_manifest(store, tmp_path, ["ok.txt", path])
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(StoreError, match="artifact key"):
        store.get(digest, dest)
    assert not (tmp_path / "deep" / "escaped").exists()
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()


def test_manifest_with_a_non_hex_object_digest_is_refused(store: ArtifactStore,
                                                         tmp_path: Path) -> None:
    files = [FileEntry(path="a", size=1, sha256="../../../../etc/passwd")]
    digest = tree_digest(files)
    manifest = Manifest(digest=digest, kind="m", media_type="x", size=1, created_at="now",
                        files=files)
    store.backend.put_bytes(manifest_key(digest), manifest.to_json())
    with pytest.raises(StoreError):
        store.get(digest, tmp_path / "dest")
    assert not (tmp_path / "dest" / "a").exists()


# --- symlinks -------------------------------------------------------------------------------


def model_dir_with_link(root: Path, target: Path, name: str = "evil.json") -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / name).symlink_to(target)
    return root


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.txt", "/etc"])
def test_symlink_out_of_a_directory_artifact_is_refused(store: ArtifactStore, tmp_path: Path,
                                                        target: str) -> None:
    (tmp_path / "outside.txt").write_text("not the model's")
    model = model_dir_with_link(tmp_path / "model", Path(target))
    before = all_objects(store)
    with pytest.raises(StoreError, match="evil.json is a symlink out of it"):
        store.put(model, "model")
    assert all_objects(store) == before  # no object and no manifest


def test_symlink_inside_a_directory_artifact_is_stored_as_content(store: ArtifactStore,
                                                                  tmp_path: Path) -> None:
    model = model_dir_with_link(tmp_path / "model", Path("config.json"), "alias.json")
    manifest = store.put(model, "model")
    assert sorted(f.path for f in manifest.files) == ["alias.json", "config.json"]
    out = store.get(manifest.digest, tmp_path / "out")
    assert not (out / "alias.json").is_symlink() and (out / "alias.json").read_text() == "{}"


def test_planted_symlinks_in_a_local_store_do_not_lead_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    (store.backend.root / "objects").symlink_to(outside, target_is_directory=True)
    (store.backend.root / "manifests").mkdir()
    (store.backend.root / "manifests" / ("ab" * 32 + ".json")).symlink_to(outside / "secret")
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(StoreError, match="resolves outside the store"):
        store.put(tmp_path / "a.txt", "text")
    with pytest.raises(StoreError, match="resolves outside the store"):
        store.stat("ab" * 32)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


# --- references and store URLs ---------------------------------------------------------------


@pytest.mark.parametrize("ref", TRICK_REFS)
def test_lineage_refs_with_tricks_are_refused(store: ArtifactStore, ref: str) -> None:
    with pytest.raises(ArtifactNotFound):
        store.stat(ref)
    with pytest.raises(ArtifactNotFound):
        upstream(store, ref)
    with pytest.raises(ArtifactNotFound):
        downstream(store, ref)


def test_store_uri_with_spaces_still_resolves(tmp_path: Path) -> None:
    store = ArtifactStore(LocalBackend(tmp_path / "my store"))
    (tmp_path / "a.txt").write_text("a")
    digest = store.put(tmp_path / "a.txt", "text").digest
    assert "%20" in store.uri(digest)
    assert store.resolve(store.uri(digest)) == digest


@pytest.mark.parametrize("url", ["s3://bucket/../x", "s3://bucket/a/%2e%2e/b", "s3://../x",
                                 "s3://b\\x/y", "s3://bucket/a\\b", "file://etc/passwd",
                                 "/tmp/a\x00b", "http://example.com/store"])
def test_store_urls_with_tricks_are_refused(url: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="store URL|artifact key"):
        backend_from_url(url)
    assert list(tmp_path.iterdir()) == []  # no directory made for it


# --- model paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/outside.safetensors",
                                   "sub/../../outside.safetensors", "..\\outside.safetensors",
                                   "", "."])
def test_index_shards_out_of_the_model_dir_are_refused(tmp_path: Path, shard: str) -> None:
    torch.manual_seed(0)
    save_file({"fc.weight": torch.randn(4, 4)}, str(tmp_path / "outside.safetensors"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc.weight": shard}}))
    with pytest.raises(WeightsError, match="is not a file in"):
        list_weight_matrices(model)


def test_index_shard_in_a_subfolder_is_read(tmp_path: Path) -> None:
    (tmp_path / "model" / "shards").mkdir(parents=True)
    save_file({"fc.weight": torch.zeros(4, 4)}, str(tmp_path / "model/shards/a.safetensors"))
    (tmp_path / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc.weight": "shards/a.safetensors"}}))
    assert [i.name for i in list_weight_matrices(tmp_path / "model")] == ["fc"]


def test_a_link_deep_in_a_local_store_is_followed_only_while_it_stays_inside(tmp_path: Path):
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    (tmp_path / "a.txt").write_text("a")
    digest = store.put(tmp_path / "a.txt", "text").digest
    shard = store.local_path(digest).parent  # objects/sha256/<2 hex>
    moved = store.backend.root / "moved-shard"
    shard.rename(moved)
    shard.symlink_to(moved, target_is_directory=True)  # inside the store: followed
    assert store.backend.get_bytes(object_key(digest)) == b"a"
    outside = tmp_path / "outside"
    moved.rename(outside)
    shard.unlink()
    shard.symlink_to(outside, target_is_directory=True)  # out of the store: refused
    with pytest.raises(StoreError, match="resolves outside the store"):
        store.backend.get_bytes(object_key(digest))
