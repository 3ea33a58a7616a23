"""Synthetic manifests for lineage tests and benchmarks: many prune chains, no content.

Each chain is a model (a source) -> spectral metrics -> allocation -> pruned model ->
evaluation, with params, dates and git revisions drawn from a seeded generator, written
straight into a local store's manifests/ folder (no objects: `find` reads manifests only).
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from steps.core.store import Manifest, ProducedBy

GIT_REVISIONS = ("1111111aaaa", "2222222bbbb", "3333333cccc")
SPARSITIES = (0.5, 0.6, 0.7)
METHODS = ("magnitude", "wanda", "sparsegpt")
POLICIES = ("uniform", "alphapruning", "owl")
START = datetime(2026, 11, 1, tzinfo=UTC)


def _digest(i: int) -> str:
    return hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()


def synthetic_manifests(count: int, seed: int = 0) -> list[Manifest]:
    """`count` manifests (chains of 5; the last chain may be cut short)."""
    rng = random.Random(seed)
    manifests: list[Manifest] = []
    while len(manifests) < count:
        chain = len(manifests) // 5
        when = START + timedelta(minutes=chain * 7)
        git = rng.choice(GIT_REVISIONS)
        sparsity, method, policy = (rng.choice(SPARSITIES), rng.choice(METHODS),
                                    rng.choice(POLICIES))
        steps = [(None, "model", {}, {}),
                 ("spectral", "table", {"estimator": "alpha_peak"}, {"model": 0}),
                 ("allocate", "table", {"policy": policy, "sparsity": sparsity}, {"metrics": 1}),
                 ("prune", "model", {"method": method, "sparsity": sparsity},
                  {"model": 0, "allocation": 2}),
                 ("evaluate", "table", {"seqlen": 128}, {"model": 3})]
        base = len(manifests)
        for offset, (step, kind, params, inputs) in enumerate(steps):
            if len(manifests) == count:
                break
            made = None if step is None else ProducedBy(
                step=step, step_version="1", params=params, git_revision=git,
                inputs={name: _digest(base + k) for name, k in inputs.items()})
            stamp = (when + timedelta(seconds=offset)).isoformat(timespec="milliseconds")
            manifests.append(Manifest(digest=_digest(base + offset), kind=kind,
                                      media_type="application/octet-stream", size=1000 + offset,
                                      created_at=stamp, name=f"{kind}-{chain}",
                                      produced_by=made).sealed())
    return manifests


def write_manifests(store_root: Path, manifests: list[Manifest]) -> None:
    """Write manifests as a local store keeps them (plain writes: a test store, not a real one)."""
    folder = store_root / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    for manifest in manifests:
        (folder / f"{manifest.digest}.json").write_bytes(manifest.to_json())
