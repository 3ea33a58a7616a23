"""A full disk while the store writes: a clear error, no manifest, no visible partial artifact.

The OS really refuses the write: a child process runs with RLIMIT_FSIZE below the artifact's
size and SIGXFSZ ignored, so write() fails with EFBIG exactly as it fails with ENOSPC on a
full disk. A rerun without the limit then completes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from steps.core.backends import LocalBackend
from steps.core.store import ArtifactStore, sha256_file

LIMIT = 1 << 20  # bytes any one file of the child may reach

CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from steps.core.backends import LocalBackend
    from steps.core.errors import TailwiseError
    from steps.core.store import ArtifactStore

    action, store_root, source, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = ArtifactStore(LocalBackend(store_root))
    # After the imports (bytecode caches are written then): from here on, a write past
    # `limit` bytes fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        if action == "put":
            outcome = "stored " + store.put(source, "blob").digest
        else:
            outcome = "fetched " + str(store.get(source, sys.argv[5]))
    except TailwiseError as err:
        outcome = "error " + type(err).__name__ + ": " + str(err)
    print(json.dumps(outcome))
""")


def run_limited(*args: str | Path) -> str:
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def visible_state(root: Path) -> dict[str, list[str]]:
    """Manifests and leftover temp files in a local store."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return {"manifests": sorted(p.name for p in files if p.parent.name == "manifests"),
            "partial": sorted(p.name for p in files if p.name.startswith(".partial-"))}


@pytest.mark.parametrize("shape", ["file", "directory"])
def test_full_disk_leaves_no_artifact_and_a_rerun_completes(tmp_path: Path, shape: str) -> None:
    if shape == "file":
        source = random_file(tmp_path / "big.bin", 3 * LIMIT)
    else:  # the first files fit, the weights do not
        source = tmp_path / "model"
        random_file(source / "config.json", 1000, seed=1)
        random_file(source / "tokenizer.json", 2000, seed=2)
        random_file(source / "weights" / "model.safetensors", 3 * LIMIT, seed=3)
    root = tmp_path / "store"
    outcome = run_limited("put", root, source, LIMIT)
    assert outcome.startswith("error StoreError: cannot write objects/sha256/"), outcome
    assert f"in {root}" in outcome and "File too large" in outcome
    assert visible_state(root) == {"manifests": [], "partial": []}
    store = ArtifactStore(LocalBackend(root))
    assert store.list() == []

    manifest = store.put(source, "blob")  # the same store, without the limit
    assert visible_state(root)["manifests"] == [f"{manifest.digest}.json"]
    back = store.get(manifest.digest, tmp_path / "back")
    if shape == "file":
        assert sha256_file(back) == sha256_file(source)
    else:
        assert sha256_file(back / "weights/model.safetensors") == \
            sha256_file(source / "weights/model.safetensors")


def test_full_disk_while_fetching_leaves_no_partial_file(tmp_path: Path) -> None:
    source = random_file(tmp_path / "big.bin", 3 * LIMIT)
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    digest = store.put(source, "blob").digest
    dest = tmp_path / "out" / "big.bin"
    outcome = run_limited("get", tmp_path / "store", digest, LIMIT, dest)
    assert outcome.startswith("error StoreError: cannot copy objects/sha256/"), outcome
    assert str(dest) in outcome and "File too large" in outcome
    assert list((tmp_path / "out").iterdir()) == []  # neither dest nor its temp file
    assert store.get(digest, dest) == dest and sha256_file(dest) == digest


def test_limit_really_makes_the_os_refuse(tmp_path: Path) -> None:
    """The simulation is real: below the limit a plain write works, past it the OS says EFBIG."""
    script = textwrap.dedent("""
        import errno, resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        open(sys.argv[1] + "/small", "wb", buffering=0).write(b"x" * 1000)
        big = open(sys.argv[1] + "/big", "wb", buffering=0)
        try:
            big.write(b"x" * 1000)  # up to the limit: accepted
            big.write(b"x")  # one byte past it: refused by the kernel
        except OSError as err:
            print(errno.errorcode[err.errno])
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "EFBIG", done.stderr
    assert (tmp_path / "small").stat().st_size == 1000
