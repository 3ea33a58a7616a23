"""Two processes store the same content at the same moment: both succeed, one artifact remains.

The writers are separate processes (as two flow runs or two Dask workers are), released
together by a multiprocessing Barrier right before `ArtifactStore.put`, on a local
directory store and on a real S3 server (moto).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest

from steps.core.store import ArtifactStore, ProducedBy, open_store

WRITERS = 2
ROUNDS = 3


def write_at_the_barrier(store_url: str, env: dict[str, str], source: str, writer: int,
                         barrier, results) -> None:
    """One writer process: open the store, wait for the others, put the file."""
    os.environ.update(env)
    store = open_store(store_url)
    made = ProducedBy(step="writer", step_version="1", params={"writer": writer})
    barrier.wait(timeout=60)
    try:
        manifest = store.put(source, "blob", produced_by=made)
        results.put((writer, manifest.model_dump_json(by_alias=True)))
    except Exception as exc:  # reported to the test, which fails on it
        results.put((writer, f"error: {type(exc).__name__}: {exc}"))


def put_concurrently(store_url: str, env: dict[str, str], source: Path) -> list[str]:
    """Run WRITERS processes that put `source` at once; their manifests (JSON), in order."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(WRITERS), context.Queue()
    writers = [context.Process(target=write_at_the_barrier,
                               args=(store_url, env, str(source), index, barrier, results))
               for index in range(WRITERS)]
    for process in writers:
        process.start()
    outcome = dict(results.get(timeout=120) for _ in writers)
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0, f"writer exited with {process.exitcode}"
    return [outcome[index] for index in range(WRITERS)]


def content(tmp_path: Path, round_: int) -> Path:
    """A 3 MB file, different in every round so each round races on a new digest."""
    path = tmp_path / f"blob-{round_}.bin"
    path.write_bytes(hashlib.sha256(str(round_).encode()).digest() * (3 * 2**20 // 32))
    return path


def check_one_artifact(store: ArtifactStore, source: Path, written: list[str],
                       tmp_path: Path) -> None:
    assert not [w for w in written if w.startswith("error")], written
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    objects = [k for k in store.backend.list("objects") if digest in k]
    manifests = [k for k in store.backend.list("manifests") if digest in k]
    assert len(objects) == 1 and len(manifests) == 1, (objects, manifests)
    stored = store.stat(digest)
    back = store.get(digest, tmp_path / f"back-{digest[:8]}")
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest == stored.digest
    assert stored.model_dump_json(by_alias=True) in written  # one writer's manifest, whole


@pytest.fixture(params=["local", "s3"])
def store_and_env(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), {}
    s3 = request.getfixturevalue("s3_moto")
    return f"s3://{s3.bucket}/concurrent-{tmp_path.name}", s3.env()


def test_two_writers_of_one_digest_both_succeed_and_leave_one_artifact(tmp_path, monkeypatch,
                                                                       store_and_env):
    store_url, env = store_and_env
    for key, value in env.items():  # this process reads the store back the same way
        monkeypatch.setenv(key, value)
    store = open_store(store_url)
    for round_ in range(ROUNDS):
        source = content(tmp_path, round_)
        check_one_artifact(store, source, put_concurrently(store_url, env, source), tmp_path)


# A real race (lost update): ArtifactStore.put checks for the manifest, then writes it
# unconditionally, so when both writers pass the check the later one overwrites the first
# one's manifest (its created_at and produced_by) and the first writer holds a manifest the
# store no longer has. Fix: a create-only manifest write (S3 put_object IfNoneMatch="*",
# os.link on a local directory) and, when it loses, return the stored manifest.
def test_every_writer_gets_the_manifest_that_stays(tmp_path, monkeypatch, store_and_env):
    """The manifest is immutable: a writer that loses the race is handed the winner's."""
    store_url, env = store_and_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = open_store(store_url)
    for round_ in range(ROUNDS):
        source = content(tmp_path, round_)
        written = put_concurrently(store_url, env, source)
        stored = store.stat(hashlib.sha256(source.read_bytes()).hexdigest())
        assert written == [stored.model_dump_json(by_alias=True)] * WRITERS, round_
