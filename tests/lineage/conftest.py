"""Stores for the lineage tests: a local directory, or the moto S3 server."""

from __future__ import annotations

import uuid

import pytest
from lineage_chain import STEPS, Chain, make_chain

import flows.common
from steps.core import registry
from steps.core.store import ArtifactStore, open_store


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path, monkeypatch) -> ArtifactStore:
    """An empty store on a local directory, or on the moto S3 server under a fresh prefix."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    info = request.getfixturevalue("s3_moto")
    for key, value in info.env().items():
        monkeypatch.setenv(key, value)
    return open_store(f"s3://{info.bucket}/{uuid.uuid4().hex}")


@pytest.fixture
def chain(any_store, tmp_path) -> Chain:
    return make_chain(any_store, tmp_path)


@pytest.fixture
def local_chain(tmp_path) -> Chain:
    return make_chain(open_store(str(tmp_path / "store")), tmp_path)


@pytest.fixture
def toy_registry(monkeypatch):
    """The flow's steps by name: the toy steps (count replaceable, to change its code)."""
    by_name = dict(STEPS)
    monkeypatch.setattr(flows.common, "load_step", lambda name: by_name[name])
    monkeypatch.setattr(registry, "load_step", lambda name: by_name[name])
    return by_name


@pytest.fixture
def source(tmp_path) -> str:
    path = tmp_path / "in.txt"
    path.write_text("to be or not to be, that is the question\n")
    return str(path)
