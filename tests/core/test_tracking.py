"""MLflow tracking: a parent run per flow, a child per step, against SQLite and a live server."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient
from toy_steps import COUNT, SHOUT

from steps.core.errors import TrackingError
from steps.core.step import run_step
from steps.core.store import open_store
from steps.core.tracking import Tracker
from tailwise_dev.services import free_port


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("mlflow_server")


def test_flow_and_step_runs(tracking_uri, tmp_path):
    store = open_store(str(tmp_path / "store"))
    source = tmp_path / "in.txt"
    source.write_text("a bb ccc dddd\n")
    text = store.put(source, "text").digest
    tracker = Tracker(tracking_uri, experiment=f"test-{time.time_ns()}")
    with tracker.flow_run("chain", {"model": {"name": "x"}}, "flow-42") as parent:
        loud = run_step(SHOUT, {"times": 2}, {"text": text}, store=store, tracker=tracker,
                        parent_run_id=parent.run_id).digests()["loud"]
        counted = run_step(COUNT, {"min_length": 3}, {"text": loud}, store=store,
                           tracker=tracker, parent_run_id=parent.run_id)

    client = MlflowClient(tracking_uri)
    flow = client.get_run(parent.run_id)
    assert flow.info.status == "FINISHED" and flow.data.params == {"model.name": "x"}
    assert flow.data.tags["tailwise.flow_run_id"] == "flow-42"
    children = client.search_runs([tracker.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.run_id}'")
    by_step = {run.data.tags["tailwise.step"]: run for run in children}
    assert set(by_step) == {"shout", "count"}
    shout = by_step["shout"]
    assert shout.data.params == {"times": "2"} and shout.data.metrics["chars"] == 28
    assert shout.data.tags["tailwise.input.text"] == text
    assert shout.data.tags["tailwise.output.loud"] == loud
    count = by_step["count"]
    assert count.data.tags["tailwise.output.count"] == counted.digests()["count"]
    assert count.info.run_id == counted.mlflow_run_id
    artifacts = [a.path for a in client.list_artifacts(count.info.run_id)]
    assert artifacts == ["count.json"]
    local = client.download_artifacts(count.info.run_id, "count.json", str(tmp_path))
    assert open(local).read() == '{"words": 4}'
    # The store's manifest points back at the MLflow run.
    assert store.stat(counted.digests()["count"]).produced_by.mlflow_run_id == count.info.run_id


def test_failed_step_marks_its_run_failed(tmp_path):
    from toy_steps import CRASH

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = open_store(str(tmp_path / "store"))
    source = tmp_path / "in.txt"
    source.write_text("x")
    tracker = Tracker(uri)
    with pytest.raises(RuntimeError):
        run_step(CRASH, {}, {"text": store.put(source, "text").digest}, store=store,
                 tracker=tracker)
    runs = MlflowClient(uri).search_runs([tracker.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_unreachable_server_fails_fast_and_clearly():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"cannot reach the MLflow tracking server at {uri}"):
        Tracker(uri)
    assert time.monotonic() - started < 10
