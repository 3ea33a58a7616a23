"""One flow, three runners (inline, process, deployment): identical artifact digests."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from prefect import flow

from flows.common import RunSettings, flow_run_context
from steps.core.registry import STEP_NAMES
from tailwise_dev.services import probe


@flow(name="runner-check")
def chain(settings: RunSettings) -> dict:
    with flow_run_context("runner-check", settings, {}) as run:
        model = run.step("build_model", {"name": "mlp", "seed": 5})
        spectral = run.step("spectral", {"plots": False}, {"model": model.digests()["model"]})
        decisions = run.step("allocate", {"policy": "alphapruning",
                                          "options": {"sparsity": 0.5, "epsilon": 0.2}},
                             {"metrics": spectral.digests()["metrics"]})
    return {**model.digests(), **spectral.digests(), **decisions.digests(),
            "cached": spectral.cached}


@pytest.fixture
def step_worker(prefect_api):
    """A process serving the step deployments on the test's Prefect server."""
    prefect_server = prefect_api
    worker = subprocess.Popen([sys.executable, "-m", "flows.step_flow"],
                              env=os.environ | {"PREFECT_API_URL": prefect_server})
    wait_for_deployments(prefect_server, [f"step/{name}" for name in STEP_NAMES], worker)
    yield
    worker.terminate()
    worker.wait(30)


def wait_for_deployments(api: str, names: list[str], worker: subprocess.Popen) -> None:
    """Poll the API until the worker has registered every deployment (or has died)."""
    deadline = time.monotonic() + 120
    missing = list(names)
    while missing and time.monotonic() < deadline and worker.poll() is None:
        missing = [n for n in missing if not probe(f"{api}/deployments/name/{n}", (200,))]
        if missing:
            time.sleep(0.5)  # poll interval; the condition above is what we wait for
    assert not missing, f"deployments never appeared: {missing}"


def settings(tmp_path, runner: str) -> RunSettings:
    return RunSettings(store=str(tmp_path / f"store-{runner}"), runner=runner,
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_every_runner_gives_the_same_digests(tmp_path, step_worker):
    inline = chain(settings(tmp_path, "inline"))
    process = chain(settings(tmp_path, "process"))
    deployed = chain(settings(tmp_path, "deployment"))
    assert inline == process == deployed
    assert not inline["cached"]


def test_rerun_is_cached_and_no_cache_recomputes(tmp_path, prefect_api):
    first = chain(settings(tmp_path, "process"))
    again = chain(settings(tmp_path, "process"))
    assert again == first | {"cached": True}
    forced = chain(settings(tmp_path, "process").model_copy(update={"no_cache": ["spectral"]}))
    assert forced == first
