"""A flow killed mid-step resumes: the rerun redoes only the unfinished step, same digests.

The chain runs its steps with the `process` runner, so "mid-step" is observable: the
flow's process has a `python -m steps.spectral` child. The test kills the whole process
group with SIGKILL while that child is alive, then reruns the flow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from prefect import flow

from flows.common import RunSettings, flow_run_context
from steps.core.store import open_store

REPO = Path(__file__).resolve().parents[1]


@flow(name="resume-check")
def chain(settings: RunSettings) -> dict:
    """build_model -> spectral -> allocate; the digests and which steps were cached."""
    with flow_run_context("resume-check", settings, {}) as run:
        model = run.step("build_model", {"name": "tiny-llama", "seed": 3})
        metrics = run.step("spectral", {"plots": False}, {"model": model.digests()["model"]})
        decisions = run.step("allocate", {"policy": "alphapruning",
                                          "options": {"sparsity": 0.5, "epsilon": 0.2}},
                             {"metrics": metrics.digests()["metrics"]})
    results = {"build_model": model, "spectral": metrics, "allocate": decisions}
    return {"digests": {name: r.digests() for name, r in results.items()},
            "cached": {name: r.cached for name, r in results.items()}}


def settings(store: Path, runner: str = "process") -> RunSettings:
    return RunSettings(store=str(store), runner=runner, tracking=False)


def step_process_started(flow_process: psutil.Process, step: str) -> bool:
    """Whether the flow has a live `python -m steps.<step>` child."""
    try:
        children = flow_process.children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if f"steps.{step}" in child.cmdline():
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def kill_flow_during(step: str, store: Path, prefect_api: str) -> None:
    """Start the chain in a new process group and SIGKILL the group once `step` is running."""
    process = subprocess.Popen([sys.executable, __file__, str(store)], cwd=REPO,
                               env=os.environ | {"PREFECT_API_URL": prefect_api},
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    watched = psutil.Process(process.pid)
    deadline = time.monotonic() + 300
    while not step_process_started(watched, step):
        assert process.poll() is None, f"flow exited early: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"step {step} never started"
        time.sleep(0.02)  # poll interval; the condition is the child process appearing
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    process.stderr.close()


def test_killed_flow_reruns_only_the_unfinished_step(tmp_path, prefect_api):
    undisturbed = chain(settings(tmp_path / "reference", runner="inline"))

    store = tmp_path / "store"
    kill_flow_during("spectral", store, prefect_api)
    the_store = open_store(str(store))
    done = {entry["step"] for _, entry in the_store.cache_entries()}
    assert done == {"build_model"}, "only the step before the kill finished"
    for manifest in the_store.list():  # every visible artifact is complete (get verifies)
        the_store.get(manifest.digest, tmp_path / "check" / manifest.digest)

    resumed = chain(settings(store))
    assert resumed["cached"] == {"build_model": True, "spectral": False, "allocate": False}
    assert resumed["digests"] == undisturbed["digests"]


if __name__ == "__main__":
    chain(settings(Path(sys.argv[1])))
