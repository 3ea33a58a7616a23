"""`tailwise lineage stale`: artifacts made by code that has changed since, and their products.

An artifact is stale when the step that made it now has another version or other code
(its folder's git tree id, `code_revision` in the manifest) and nothing has confirmed it
since: a rerun with the current code that gives the same bytes keeps the first manifest
(manifests are immutable) but rewrites the step's cache entry with the current version and
code, and that entry confirms the artifact. Everything built from a stale artifact is stale
too. Steps that cannot be loaded here (renamed, from another checkout) are not judged.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from steps.core.errors import TailwiseError
from steps.core.step import Step, code_revision
from steps.core.store import ArtifactStore, Manifest


@dataclass(frozen=True)
class StaleArtifact:
    digest: str
    kind: str
    step: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"digest": self.digest, "kind": self.kind, "step": self.step,
                "reason": self.reason}


def registered_step(name: str) -> Step | None:
    """The current code of a step of this checkout, or None for one it does not have."""
    from steps.core.registry import load_step

    try:
        return load_step(name)
    except TailwiseError:
        return None


def confirmations(store: ArtifactStore) -> dict[str, set[tuple[str, str, str | None]]]:
    """Per output digest, the (step, version, code) of the cache entries that made it."""
    confirmed: dict[str, set[tuple[str, str, str | None]]] = {}
    for key in store.backend.list("cache"):
        try:
            entry = json.loads(store.backend.get_bytes(key))
            made = (entry["step"], entry["version"], entry.get("code_revision"))
            for digest in entry["outputs"].values():
                confirmed.setdefault(digest, set()).add(made)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a broken entry confirms nothing (`lineage check` reports it)
    return confirmed


def why_stale(m: Manifest, step: Step, current_code: str | None,
              confirmed: set[tuple[str, str, str | None]]) -> str | None:
    """Why `m` is stale against the step's current code, or None when it is current."""
    made = m.produced_by
    code_known = made.code_revision is not None and current_code is not None
    if made.step_version == step.version and (not code_known or
                                              made.code_revision == current_code):
        return None
    if (step.name, step.version, current_code) in confirmed:
        return None  # recomputed by the current code, same bytes
    if made.step_version != step.version:
        return f"step {step.name} is now v{step.version} (made by v{made.step_version})"
    return (f"code of step {step.name} changed: {current_code[:12]} "
            f"(made by {made.code_revision[:12]})")


def find_stale(store: ArtifactStore,
               load: Callable[[str], Step | None] = registered_step) -> list[StaleArtifact]:
    """Stale artifacts: made by changed code first, then what was built from them."""
    manifests = store.list()
    confirmed = confirmations(store)
    steps: dict[str, tuple[Step | None, str | None]] = {}
    stale: dict[str, StaleArtifact] = {}
    consumers: dict[str, list[Manifest]] = {}
    for m in sorted(manifests, key=lambda m: m.created_at):
        made = m.produced_by
        if made is None:
            continue
        for digest in set(made.inputs.values()):
            consumers.setdefault(digest, []).append(m)
        if made.step not in steps:
            step = load(made.step)
            steps[made.step] = (step, code_revision(step) if step else None)
        step, code = steps[made.step]
        reason = step and why_stale(m, step, code, confirmed.get(m.digest, set()))
        if reason:
            stale[m.digest] = StaleArtifact(m.digest, m.kind, made.step, reason)
    queue = deque(stale)
    while queue:
        source = queue.popleft()
        for product in consumers.get(source, []):
            if product.digest not in stale:
                stale[product.digest] = StaleArtifact(
                    product.digest, product.kind, product.produced_by.step,
                    f"built from stale {source[:12]}")
                queue.append(product.digest)
    return list(stale.values())
