"""OpenLineage: the lineage of tailwise artifacts as RunEvents, for Marquez, DataHub, ...

Each step run is one OpenLineage run: a START event (with its inputs) and a COMPLETE event
(with inputs and outputs). job = the step's name in the namespace given by settings
($OPENLINEAGE_NAMESPACE, else `tailwise`); run id = the step's MLflow run id as a UUID (or
a UUID derived from its cache key when untracked), so exported and live events of one run
agree; datasets are artifacts named by digest in the store's namespace (its URL), with a
facet holding kind, size and media type; the step's params and provenance are a run facet;
a step run by a flow names the flow run as its parent (ParentRunFacet, job = the flow's
name), and a flow sends START and COMPLETE (or FAIL) of its own run. Events are built with
the `openlineage-python` client's types and sent through the client's own transports
(OPENLINEAGE_URL, OPENLINEAGE_CONFIG, openlineage.yml, ...).

A live endpoint that fails does not fail the flow: one warning, and the events that could
not be sent go to a local file (`unsent_path()`) that `tailwise lineage resend` replays.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    RunFacet,
    dataset_version_dataset,
    job_type_job,
    parent_run,
)
from openlineage.client.serde import Serde

from steps.core.errors import TailwiseError
from steps.core.lineage import Graph
from steps.core.store import Manifest, ProducedBy

log = logging.getLogger("tailwise.openlineage")

DEFAULT_NAMESPACE = "tailwise"
FACET_SCHEMA = "urn:tailwise:openlineage:facets:1"


def producer() -> str:
    try:
        return f"urn:tailwise:{version('tailwise')}"
    except PackageNotFoundError:
        return "urn:tailwise"


def default_namespace() -> str:
    return os.environ.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE


@attr.define
class ArtifactDatasetFacet(DatasetFacet):
    """What a tailwise artifact is: kind, size in bytes, media type, file name."""

    kind: str
    size: int
    mediaType: str  # noqa: N815  (OpenLineage facets are camelCase)
    name: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return f"{FACET_SCHEMA}#ArtifactDatasetFacet"


@attr.define
class StepRunFacet(RunFacet):
    """The step run's params and provenance, as its manifest records them."""

    stepVersion: str  # noqa: N815
    params: dict[str, Any]
    cacheKey: str | None = None  # noqa: N815
    gitRevision: str | None = None  # noqa: N815
    codeRevision: str | None = None  # noqa: N815
    containerImage: str | None = None  # noqa: N815
    mlflowRunId: str | None = None  # noqa: N815
    flowRunId: str | None = None  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return f"{FACET_SCHEMA}#StepRunFacet"


def run_id(made: ProducedBy) -> str:
    """The step run's id as a UUID: its MLflow run id when it has one (32 hex digits)."""
    if made.mlflow_run_id and len(made.mlflow_run_id) == 32:
        try:
            return str(uuid.UUID(hex=made.mlflow_run_id))
        except ValueError:
            pass
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tailwise:run:{made.cache_key or made.step}"))


def dataset_facets(m: Manifest) -> dict[str, DatasetFacet]:
    return {"tailwise_artifact": ArtifactDatasetFacet(kind=m.kind, size=m.size,
                                                      mediaType=m.media_type, name=m.name,
                                                      producer=producer()),
            "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=m.digest, producer=producer())}


def parent_facet(made: ProducedBy, namespace: str) -> parent_run.ParentRunFacet | None:
    """The flow run that ran the step (job = the flow's name), when the manifest names one
    by a Prefect flow run id (a UUID) and the flow's name."""
    if not (made.flow_run_id and made.flow_name):
        return None
    try:
        flow_run = str(uuid.UUID(made.flow_run_id))
    except ValueError:
        return None
    return parent_run.ParentRunFacet(run=parent_run.Run(runId=flow_run),
                                     job=parent_run.Job(namespace=namespace,
                                                        name=made.flow_name),
                                     producer=producer())


def job_facets(job_type: str) -> dict[str, job_type_job.JobTypeJobFacet]:
    return {"jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="TAILWISE",
                                                    jobType=job_type, producer=producer())}


def flow_event(state: str, flow_name: str, flow_run_id: str, namespace: str,
               at: str) -> RunEvent:
    """START, COMPLETE or FAIL (`state`) of a flow run, the parent its step runs name."""
    return RunEvent(eventType=RunState(state), eventTime=at, run=Run(runId=flow_run_id),
                    job=Job(namespace=namespace, name=flow_name, facets=job_facets("FLOW")),
                    inputs=[], outputs=[], producer=producer())


def step_events(made: ProducedBy, inputs: Iterable[Manifest], outputs: Iterable[Manifest],
                store_url: str, namespace: str) -> list[RunEvent]:
    """START and COMPLETE of one step run."""
    facets: dict[str, RunFacet] = {"tailwise_step": StepRunFacet(
        stepVersion=made.step_version, params=made.params, cacheKey=made.cache_key,
        gitRevision=made.git_revision, codeRevision=made.code_revision,
        containerImage=made.container_image, mlflowRunId=made.mlflow_run_id,
        flowRunId=made.flow_run_id, producer=producer())}
    if parent := parent_facet(made, namespace):
        facets["parent"] = parent
    run = Run(runId=run_id(made), facets=facets)
    job = Job(namespace=namespace, name=made.step, facets=job_facets("STEP"))
    read = [InputDataset(namespace=store_url, name=m.digest, facets=dataset_facets(m))
            for m in inputs]
    wrote = [OutputDataset(namespace=store_url, name=m.digest, facets=dataset_facets(m))
             for m in outputs]
    started = made.started_at or made.ended_at
    ended = made.ended_at or made.started_at
    return [RunEvent(eventType=RunState.START, eventTime=started, run=run, job=job,
                     inputs=read, outputs=[], producer=producer()),
            RunEvent(eventType=RunState.COMPLETE, eventTime=ended, run=run, job=job,
                     inputs=read, outputs=wrote, producer=producer())]


def graph_events(graph: Graph, namespace: str) -> list[RunEvent]:
    """A START/COMPLETE pair for every step run of a lineage graph, oldest run first."""
    events = []
    for step_id, made in sorted(graph.steps.items(),
                                key=lambda item: (item[1].started_at or "", item[0])):
        inputs = [graph.artifacts[d] for d in sorted(set(made.inputs.values()))
                  if d in graph.artifacts]
        outputs = [graph.artifacts[b] for a, b in sorted(graph.edges) if a == step_id]
        events += step_events(made, inputs, outputs, graph.store_url, namespace)
    return events


def to_json_lines(events: Iterable[RunEvent]) -> str:
    return "\n".join(Serde.to_json(event) for event in events)


# -- live emission -----------------------------------------------------------------

def configured() -> bool:
    """Whether the user pointed the OpenLineage client somewhere (its standard config)."""
    if os.environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OPENLINEAGE_URL") or os.environ.get("OPENLINEAGE_CONFIG"):
        return True
    if any(key.startswith("OPENLINEAGE__TRANSPORT") for key in os.environ):
        return True
    return any(path.is_file() for path in (Path("openlineage.yml"),
                                           Path.home() / ".openlineage" / "openlineage.yml"))


def unsent_path() -> Path:
    """Where events that could not be sent wait for `tailwise lineage resend`."""
    default = Path(".tailwise") / "openlineage" / "unsent.jsonl"
    return Path(os.environ.get("TAILWISE_OPENLINEAGE_UNSENT", default))


class Emitter:
    """Sends events through the client's transport; after one failure, keeps them on disk.

    One warning per emitter (a flow run): an endpoint that is down is said once, and the
    events of the steps after it are written to the file without trying again.
    """

    def __init__(self, client: Any, unsent: Path | None = None) -> None:
        self.client = client
        self.unsent = unsent or unsent_path()
        self.failed = False
        self.lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> Emitter | None:
        """An emitter when the OpenLineage client is configured, else None."""
        if not configured():
            return None
        from openlineage.client import OpenLineageClient

        return cls(OpenLineageClient())

    def emit(self, events: list[RunEvent]) -> None:
        with self.lock:
            pending = list(events)
            while pending and not self.failed:
                try:
                    self.client.emit(pending[0])
                    pending.pop(0)
                except Exception as exc:  # any transport error: the flow goes on
                    self.failed = True
                    log.warning("OpenLineage endpoint failed (%s); events are kept in %s: send "
                                "them with `tailwise lineage resend`", _first_line(exc),
                                self.unsent)
            if pending:
                append_unsent(self.unsent, [Serde.to_json(e) for e in pending])


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def append_unsent(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write("".join(f"{line}\n" for line in lines))


def resend(path: Path, client: Any) -> tuple[int, int]:
    """Send the events kept in `path`, oldest first; keep those that fail. (sent, left)."""
    if not path.is_file():
        return 0, 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    events = []
    for number, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except ValueError as exc:
            raise TailwiseError(f"{path} line {number} is not an event (not JSON): fix or "
                                "remove it, then resend") from exc
    sent = 0
    for event in events:
        try:
            # Kept events are plain JSON: the transport serialises dicts as it does events.
            client.transport.emit(event)
        except Exception as exc:
            log.warning("OpenLineage endpoint failed (%s); %d events left in %s",
                        _first_line(exc), len(lines) - sent, path)
            break
        sent += 1
    rest = lines[sent:]
    tmp = path.with_name(f".partial-{path.name}")
    tmp.write_text("".join(f"{line}\n" for line in rest), encoding="utf-8")
    os.replace(tmp, path)
    if not rest:
        path.unlink()
    return sent, len(rest)
