"""The step contract: typed params + named input artifacts -> named output artifacts.

A step is a plain function wrapped in `Step`. `run_step` gives every step the same
life: validate params, resolve inputs, look up the cache, materialise inputs in a
scratch directory, run, store outputs with their lineage, record the cache entry,
and track it all in MLflow. `python -m steps.<name> --request request.json` runs
the same thing in a fresh process (the container command).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from steps.core.errors import ParamsError
from steps.core.store import ArtifactStore, Manifest, ProducedBy, now
from steps.core.tracking import NullTracker, StepRun, Tracker


@dataclass(frozen=True)
class Output:
    """A file or directory a step wrote, and what kind of artifact it is."""

    path: Path
    kind: str
    media_type: str | None = None


@dataclass
class StepContext:
    """What a running step may use besides its params and inputs."""

    workdir: Path
    run: StepRun
    input_digests: dict[str, str] = field(default_factory=dict)
    progress: bool = False

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metrics on the step's MLflow run (``step``: e.g. the epoch)."""
        self.run.log_metrics(metrics, step)

    def log_file(self, path: Path, folder: str | None = None) -> None:
        """Attach a small file (plot, table) to the step's MLflow run."""
        self.run.log_file(path, folder)


StepFn = Callable[[StepContext, Any, dict[str, Path]], dict[str, Output]]
# Refuses params that conflict with the inputs given (their names), before anything runs.
InputsCheck = Callable[[Any, frozenset[str]], None]


@dataclass(frozen=True)
class Step:
    name: str
    version: str
    params: type[BaseModel]
    inputs: tuple[str, ...]
    fn: StepFn
    optional_inputs: tuple[str, ...] = ()
    check_inputs: InputsCheck | None = None

    def validate(self, params: BaseModel | Mapping[str, Any] | None,
                 inputs: Iterable[str] | None = None) -> BaseModel:
        """Typed params; with the names of the inputs given, also checked against those."""
        valid = self._validate_params(params)
        if inputs is not None and self.check_inputs is not None:
            self.check_inputs(valid, frozenset(inputs))
        return valid

    def _validate_params(self, params: BaseModel | Mapping[str, Any] | None) -> BaseModel:
        if isinstance(params, self.params):
            return params
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params.model_fields))
        if unknown:  # a misspelt param must not silently fall back to its default
            raise ParamsError(f"step {self.name}: unknown parameter {', '.join(unknown)}; "
                              f"known: {', '.join(self.params.model_fields)}")
        try:
            return self.params.model_validate(params)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "params"
            raise ParamsError(f"step {self.name}: invalid parameter {where}: {first['msg']}") \
                from exc


@dataclass
class StepResult:
    step: str
    cache_key: str
    outputs: dict[str, Manifest]
    cached: bool
    mlflow_run_id: str | None = None
    flow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def digests(self) -> dict[str, str]:
        return {name: m.digest for name, m in self.outputs.items()}

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "cache_key": self.cache_key, "cached": self.cached,
                "mlflow_run_id": self.mlflow_run_id, "flow_run_id": self.flow_run_id,
                "outputs": {name: {"digest": m.digest, "kind": m.kind, "size": m.size}
                            for name, m in self.outputs.items()}}


def cache_key(step: Step, params: BaseModel, inputs: Mapping[str, str]) -> str:
    """Hash of (step name, step version, params, input digests): same key, same outputs."""
    payload = {"step": step.name, "version": step.version,
               "params": params.model_dump(mode="json"), "inputs": dict(sorted(inputs.items()))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_result(store: ArtifactStore, step: Step, params: BaseModel,
                  inputs: Mapping[str, str]) -> StepResult | None:
    """The earlier result of this exact computation, if all its outputs still exist."""
    key = cache_key(step, params, inputs)
    entry = store.cache_get(key)
    if entry is None:
        return None
    outputs = {name: store.stat(digest) for name, digest in entry["outputs"].items()}
    return StepResult(step.name, key, outputs, cached=True,
                      mlflow_run_id=entry.get("mlflow_run_id"),
                      flow_run_id=entry.get("flow_run_id"))


def git_revision() -> str | None:
    """The code's git revision, from $TAILWISE_GIT_REVISION (containers) or git itself."""
    if revision := os.environ.get("TAILWISE_GIT_REVISION"):
        return revision
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "steps"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_revision(step: Step) -> str | None:
    """The git tree id of the step's folder (steps/<name>/), or the blob id of its module
    when the step is a lone file; computed from the files, so a container without .git
    records the same id as `git rev-parse HEAD:steps/<name>` on a clean checkout."""
    module_file = getattr(sys.modules.get(step.fn.__module__), "__file__", None)
    if module_file is None:
        return None
    path = Path(module_file).resolve()
    if (path.parent / "__init__.py").is_file() and (path.parent.parent / "__init__.py").is_file():
        return _git_tree_id(path.parent).hex()
    return _git_object_id(b"blob", path.read_bytes()).hex()


def _git_object_id(kind: bytes, body: bytes) -> bytes:
    return hashlib.sha1(kind + b" %d\0" % len(body) + body, usedforsecurity=False).digest()


def _git_tree_id(folder: Path) -> bytes:
    """Git's tree hash of a folder: entries sorted as git sorts them (a folder as `name/`);
    caches (__pycache__, *.pyc) and empty folders are not part of it, as git tracks neither."""
    entries = []
    for child in folder.iterdir():
        if child.name == "__pycache__" or child.suffix == ".pyc" or child.is_symlink():
            continue
        if child.is_dir():
            if any(p.is_file() and p.suffix != ".pyc" for p in child.rglob("*")):
                entries.append((child.name + "/", b"40000", child.name, _git_tree_id(child)))
        elif child.is_file():
            mode = b"100755" if os.access(child, os.X_OK) else b"100644"
            entries.append((child.name, mode, child.name,
                            _git_object_id(b"blob", child.read_bytes())))
    body = b"".join(mode + b" " + name.encode() + b"\0" + oid
                    for _, mode, name, oid in sorted(entries))
    return _git_object_id(b"tree", body)


def run_step(step: Step, params: BaseModel | Mapping[str, Any] | None,
             inputs: Mapping[str, str], *, store: ArtifactStore,
             tracker: Tracker | None = None, parent_run_id: str | None = None,
             flow_run_id: str | None = None, flow_name: str | None = None,
             use_cache: bool = True, progress: bool = False) -> StepResult:
    """Run `step` on input artifact refs, or reuse its cached outputs."""
    params = step.validate(params, inputs)
    missing = set(step.inputs) - set(inputs)
    unknown = set(inputs) - set(step.inputs) - set(step.optional_inputs)
    if missing or unknown:
        raise ParamsError(f"step {step.name} takes inputs {list(step.inputs)} (optional "
                          f"{list(step.optional_inputs)}); missing {sorted(missing)}, "
                          f"unknown {sorted(unknown)}")
    input_digests = {name: store.resolve(ref) for name, ref in inputs.items()}
    if use_cache and (hit := cached_result(store, step, params, input_digests)):
        return hit
    tracker = tracker or NullTracker()
    key = cache_key(step, params, input_digests)
    started = now()
    with tracker.step_run(step.name, params.model_dump(mode="json"), parent_run_id) as run, \
            tempfile.TemporaryDirectory(prefix=f"tailwise-{step.name}-") as scratch:
        workdir = Path(scratch)
        local_inputs = {name: materialise(store, digest, workdir / "inputs" / name)
                        for name, digest in input_digests.items()}
        (workdir / "out").mkdir()
        context = StepContext(workdir / "out", run, input_digests, progress)
        written = step.fn(context, params, local_inputs)
        produced_by = ProducedBy(
            step=step.name, step_version=step.version, params=params.model_dump(mode="json"),
            inputs=input_digests, cache_key=key, flow_run_id=flow_run_id, flow_name=flow_name,
            mlflow_run_id=run.run_id, git_revision=git_revision(),
            code_revision=code_revision(step),
            container_image=os.environ.get("TAILWISE_CONTAINER_IMAGE"),
            started_at=started, ended_at=now())
        outputs = {name: store.put(out.path, out.kind, media_type=out.media_type,
                                   produced_by=produced_by)
                   for name, out in written.items()}
        run.record_artifacts({n: store.stat(d) for n, d in input_digests.items()}, outputs, key,
                             store.uri)
    store.cache_put(key, {"step": step.name, "version": step.version,
                          "code_revision": produced_by.code_revision,
                          "outputs": {n: m.digest for n, m in outputs.items()},
                          "flow_run_id": flow_run_id, "mlflow_run_id": run.run_id,
                          "created_at": now()})
    return StepResult(step.name, key, outputs, cached=False, mlflow_run_id=run.run_id,
                      flow_run_id=flow_run_id)


def materialise(store: ArtifactStore, digest: str, dest: Path) -> Path:
    """Give a step a local path for an input; a local store's files are linked, not copied."""
    manifest = store.stat(digest)
    local = store.local_path(manifest.digest) if not manifest.is_dir else None
    if local is not None and local.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest = dest.with_name(f"{dest.name}{Path(manifest.name or '').suffix}")
        os.symlink(local, dest)
        return dest
    if not manifest.is_dir:
        dest = dest.with_name(f"{dest.name}{Path(manifest.name or '').suffix}")
    return store.get(digest, dest)
