"""Models by Hub id, offline, against a Hugging Face cache laid out as huggingface_hub does
(hub/models--org--name/{blobs, snapshots/<commit>, refs/main}) from the shipped MiniLM files.

A planted pytorch_model.bin in the snapshot checks that pickles are never stored or read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.common import FlowRun, RunSettings, model_digest
from steps.core.hub import HubError, hub_offline, parse_hub_id, resolve_hub_model
from steps.core.lineage import to_text, upstream
from steps.core.pretrained import minilm_dir
from steps.core.store import open_store
from steps.core.tracking import NullTracker
from steps.spectral import analyze
from tailwise_cli.app import input_ref
from tailwise_dev.services import free_port

REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
COMMIT = hashlib.sha1(b"tailwise hub test").hexdigest()
KEPT = {"config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME with MiniLM cached at COMMIT (refs/main -> COMMIT), plus a pickle."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / COMMIT
    sources = [p for p in minilm_dir().rglob("*") if p.is_file()]
    for source in sources:
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        if not blob.exists():
            _link_or_copy(source, blob)
        link = snapshot / source.relative_to(minilm_dir())
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    torch.save({"w": torch.ones(2)}, repo / "blobs" / "pickle-blob")
    (snapshot / "pytorch_model.bin").symlink_to("../../blobs/pickle-blob")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same file system: no 90 MB copy
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture
def offline_hub(hf_home, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_parse_hub_ids():
    assert parse_hub_id("org/name") == ("org/name", "main")
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id(f"org/na.me-2@{COMMIT}") == ("org/na.me-2", COMMIT)
    for not_an_id in ("name", "a/b/c", "org/--x", "org/../x", "/abs/path", "org/x@..", "s3://b/k"):
        assert parse_hub_id(not_an_id) is None, not_an_id


@pytest.mark.parametrize("revision", ["", "@main", f"@{COMMIT}"])
def test_cached_model_resolves_offline_to_its_commit_without_pickles(offline_hub, revision):
    model = resolve_hub_model(REPO_ID + revision)
    assert model.revision == COMMIT
    assert set(model.files) == KEPT  # no pytorch_model.bin, README or sentence-transformers extras
    weights = model.files["model.safetensors"].resolve()
    assert model.source()["files"]["model.safetensors"] == weights.name  # the blob id


def test_python_analyze_takes_a_hub_id(offline_hub):
    options = {"device": "cpu", "workers": 1, "include": r"layer\.[01]\."}
    by_id, local = analyze(REPO_ID, **options), analyze(minilm_dir(), **options)
    assert by_id.num_rows == 12
    assert by_id.column("name").to_pylist() == local.column("name").to_pylist()
    np.testing.assert_array_equal(by_id["alpha"].to_numpy(), local["alpha"].to_numpy())


def test_cli_and_flows_store_the_hub_model_with_its_commit_and_file_digests(offline_hub, tmp_path):
    store = open_store(str(tmp_path / "store"))
    digest = input_ref(store, f"{REPO_ID}@main", "model")
    run = FlowRun("test", store, NullTracker(), None, None, RunSettings(), tmp_path)
    assert model_digest(run, REPO_ID) == digest  # the same weights, the same artifact

    manifest = store.stat(digest)
    assert manifest.source["hub"] == REPO_ID and manifest.source["revision"] == COMMIT
    stored = {f.path: f.sha256 for f in manifest.files}
    assert set(stored) == KEPT
    for name in KEPT:  # the stored content is the shipped file, byte for byte
        assert stored[name] == hashlib.sha256((minilm_dir() / name).read_bytes()).hexdigest()
        assert manifest.source["files"][name] == stored[name]  # blobs named by SHA-256 here
    assert f"source artifact from the Hub: {REPO_ID} at commit {COMMIT}" in to_text(
        upstream(store, digest))


def test_uncached_model_or_revision_is_a_one_line_error_offline(offline_hub):
    for missing in ("someone/not-cached", f"{REPO_ID}@v2"):
        with pytest.raises(HubError) as error:
            resolve_hub_model(missing)
        message = str(error.value)
        assert message.startswith(f"{missing}: not in the Hugging Face cache")
        assert "\n" not in message
        assert "HF_HUB_OFFLINE=0" in message


def test_a_local_path_wins_over_a_hub_id(offline_hub, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    local = tmp_path / REPO_ID
    local.mkdir(parents=True)
    save_file({"fc.weight": torch.randn(32, 16)}, local / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    store = open_store(str(tmp_path / "store"))
    manifest = store.stat(input_ref(store, REPO_ID, "model"))
    assert manifest.source is None and [f.path for f in manifest.files] == ["model.safetensors"]


def test_explicit_hf_hub_offline_0_goes_online_and_falls_back_to_the_cache(hf_home):
    """With HF_HUB_OFFLINE=0 huggingface_hub asks the Hub (here a closed local port): a cached
    model still resolves, an uncached one says the Hub cannot be reached."""
    script = (
        "from steps.core.hub import resolve_hub_model, HubError\n"
        f"print(resolve_hub_model({REPO_ID!r}).revision)\n"
        "try:\n    resolve_hub_model('someone/not-cached')\n"
        "except HubError as e:\n    print(e)\n")
    env = os.environ | {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0",
                        "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT),
                        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first == COMMIT
    assert second.startswith("someone/not-cached: the Hub cannot be reached"), second


def test_offline_flag_follows_the_environment(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for value, offline in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is offline


def test_cli_uncached_hub_id_is_one_line_exit_2(tmp_path):
    env = os.environ | {"HF_HOME": str(tmp_path / "empty"), "PYTHONPATH": str(REPO_ROOT),
                        "TAILWISE_STORE": str(tmp_path / "store")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)  # tailwise's default: offline
    done = subprocess.run([sys.executable, "-m", "tailwise_cli", "spectral", "someone/not-cached"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: someone/not-cached: not in the Hugging Face cache")
    assert not list((tmp_path / "store").rglob("*.json"))  # nothing stored
