"""MLflow tracking: a parent run per flow run, a child run per step.

Large artifacts stay in the artifact store; MLflow gets params, metrics, small
files (plots, tables) and tags that point at artifact digests.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steps.core.errors import TrackingError
from steps.core.store import Manifest

EXPERIMENT = "tailwise"
MAX_PARAM_LENGTH = 6000


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in `.tailwise/` (the embedded default)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{(Path('.tailwise') / 'mlflow.db').resolve()}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow's flat string params (`a.b = 1`)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class StepRun:
    """One MLflow run; what a step logs goes here."""

    def __init__(self, client: Any, run_id: str | None) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        if self.client is None or not metrics:
            return
        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_file(self, path: Path, folder: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.client is not None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

    def record_artifacts(self, inputs: Mapping[str, Manifest], outputs: Mapping[str, Manifest],
                         cache_key: str, uri: Callable[[str], str]) -> None:
        """What the step read and wrote: tags with every digest; the inputs as MLflow
        datasets (digest and source URI) and the model outputs as MLflow logged models,
        which is as far as MLflow's run inputs/outputs go (no dataset outputs)."""
        tags = {f"tailwise.input.{k}": m.digest for k, m in inputs.items()}
        tags |= {f"tailwise.output.{k}": m.digest for k, m in outputs.items()}
        tags["tailwise.cache_key"] = cache_key
        self.set_tags(tags)
        if self.client is None:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput

        datasets = [DatasetInput(Dataset(name=name, digest=m.digest[:12], source_type="tailwise",
                                         source=uri(m.digest)),
                                 tags=[InputTag("mlflow.data.context", m.kind)])
                    for name, m in inputs.items()]
        if datasets:
            self.client.log_inputs(self.run_id, datasets=datasets)
        models = [self._logged_model(name, m, uri) for name, m in outputs.items()
                  if m.kind == "model"]
        if models:
            self.client.log_outputs(self.run_id, [LoggedModelOutput(i, step=0) for i in models])

    def _logged_model(self, name: str, m: Manifest, uri: Callable[[str], str]) -> str:
        experiment = self.client.get_run(self.run_id).info.experiment_id
        model = self.client.create_logged_model(
            experiment, name=name, source_run_id=self.run_id, model_type="tailwise",
            tags={"tailwise.digest": m.digest, "tailwise.uri": uri(m.digest)})
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id


class NullTracker:
    """Tracking switched off: runs have no id and log nothing."""

    tracking_uri = None

    @contextmanager
    def flow_run(self, name: str, params: Mapping[str, Any],
                 flow_run_id: str | None = None) -> Iterator[StepRun]:
        yield StepRun(None, None)

    @contextmanager
    def step_run(self, name: str, params: Mapping[str, Any],
                 parent_run_id: str | None = None) -> Iterator[StepRun]:
        yield StepRun(None, None)


class Tracker(NullTracker):
    """MLflow against a SQLite file or a tracking server."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = EXPERIMENT) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        check_reachable(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            return self.client.create_experiment(name, artifact_location=self._artifact_root())
        except Exception as exc:
            if type(exc).__name__ == "RestException" and "RESOURCE_ALREADY_EXISTS" in str(exc):
                return self.client.get_experiment_by_name(name).experiment_id
            raise TrackingError(f"MLflow at {redacted(self.tracking_uri)} failed: "
                                f"{str(exc).splitlines()[0]}") from exc

    def _artifact_root(self) -> str | None:
        # With a local SQLite backend keep MLflow's files beside the database, not in ./mlruns.
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///"):])
            return (db.parent / "mlartifacts").resolve().as_uri()
        return None

    def _start(self, name: str, params: Mapping[str, Any], tags: dict[str, str]) -> StepRun:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        step_run = StepRun(self.client, run.info.run_id)
        from mlflow.entities import Param

        flat = flatten(params)
        if flat:
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
        return step_run

    @contextmanager
    def _run(self, name: str, params: Mapping[str, Any], tags: dict[str, str]) -> Iterator[StepRun]:
        run = self._start(name, params, tags)
        try:
            yield run
        except BaseException:
            self.client.set_terminated(run.run_id, "FAILED")
            raise
        self.client.set_terminated(run.run_id, "FINISHED")

    @contextmanager
    def flow_run(self, name: str, params: Mapping[str, Any],
                 flow_run_id: str | None = None) -> Iterator[StepRun]:
        tags = {"tailwise.kind": "flow"}
        if flow_run_id:
            tags["tailwise.flow_run_id"] = flow_run_id
        with self._run(name, params, tags) as run:
            yield run

    @contextmanager
    def step_run(self, name: str, params: Mapping[str, Any],
                 parent_run_id: str | None = None) -> Iterator[StepRun]:
        tags = {"tailwise.kind": "step", "tailwise.step": name}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        with self._run(name, params, tags) as run:
            yield run


def check_reachable(tracking_uri: str) -> None:
    """Fail fast with a clear message instead of MLflow's minutes of retries."""
    if not tracking_uri.startswith(("http://", "https://")):
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=5) as reply:
            if reply.status == 200:
                return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"cannot reach the MLflow tracking server at "
                            f"{redacted(tracking_uri)}: {reason}") from exc
    raise TrackingError(f"MLflow tracking server at {redacted(tracking_uri)} is not healthy")


def redacted(uri: str) -> str:
    """The URI without its user:password part, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def open_tracker(tracking_uri: str | None = None, enabled: bool = True) -> NullTracker:
    return Tracker(tracking_uri) if enabled else NullTracker()
