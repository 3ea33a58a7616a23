"""Fan-out on a real Dask cluster: parallel steps give exactly the digests of sequential runs.

The clusters are real `distributed.LocalCluster`s with 2 worker processes (1 thread each)
on 127.0.0.1; the flows report to the test Prefect server. Worker processes import
prefect, torch and the steps on their first task, which is most of these tests' time.
"""

from __future__ import annotations

import distributed
import pytest

from flows.common import RunSettings
from flows.spectral_audit import AuditParams, spectral_audit
from steps.core.factory import build_model, save_hf


@pytest.fixture(scope="module")
def dask_cluster():
    """An already running cluster, reached by its scheduler's address (the remote path)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        # Like a long-lived cluster, its workers have imported the code before the first
        # flow comes; here that happens while the first test computes its reference.
        warm = [client.submit(import_steps, workers=[address], pure=False)
                for address in client.scheduler_info()["workers"]]
        yield cluster
        distributed.wait(warm)


def import_steps() -> None:
    import flows.common  # noqa: F401
    from steps.core.registry import STEP_NAMES, load_step

    for name in STEP_NAMES:
        load_step(name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Four tiny 'checkpoints' of a training run (seeded, so every run sees the same bytes)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return [str(save_hf(build_model("tiny-gpt2", seed=seed), None, root / f"ckpt-{seed}"))
            for seed in range(4)]


def settings(tmp_path, executor: str, **extra) -> RunSettings:
    return RunSettings(store=str(tmp_path / f"store-{executor}"), tracking=False,
                       executor=executor, **extra)


def step_tasks_run(cluster: distributed.LocalCluster) -> int:
    """How many tasks the cluster's scheduler has seen finish (each is one Prefect task)."""
    return sum(prefix.state_counts["memory"]
               for prefix in cluster.scheduler.task_prefixes.values())


def test_audit_on_a_local_dask_cluster_gives_the_sequential_digests(tmp_path, checkpoints,
                                                                    prefect_api):
    params = AuditParams(models=checkpoints, name="fanout")
    sequential = spectral_audit(params, settings(tmp_path, "sequential"))
    threads = spectral_audit(params, settings(tmp_path, "threads"))
    dask = spectral_audit(params, settings(tmp_path, "dask"))  # starts its own LocalCluster
    assert len(sequential["metrics"]) == 4 and len(sequential["drifts"]) == 3
    assert dask == sequential and threads == sequential


def test_prune_sweep_on_a_running_cluster_gives_the_sequential_table(tmp_path, dask_cluster,
                                                                     prefect_api):
    from flows.prune_sweep import PruneSweepParams, prune_sweep

    params = PruneSweepParams(model="tiny-llama", sparsities=[0.3, 0.6],
                              methods=["magnitude", "wanda"], nsamples=2, seqlen=64,
                              text_chars=20_000, eval_windows=2)
    sequential = prune_sweep(params, settings(tmp_path, "sequential"))
    before = step_tasks_run(dask_cluster)
    remote = prune_sweep(params, settings(tmp_path, "dask",
                                          dask_address=dask_cluster.scheduler_address))
    # build_model, 2 texts, spectral, dense evaluate, 2 allocates, 4 prunes, 4 evaluates.
    assert step_tasks_run(dask_cluster) - before >= 14
    assert remote == sequential
    cells = {(row["method"], row["target_sparsity"]) for row in remote}
    assert cells == {("dense", None), ("magnitude", 0.3), ("magnitude", 0.6), ("wanda", 0.3),
                     ("wanda", 0.6)}
    for row in remote:  # the sparsity of the pruned layers is the target
        assert abs(row["sparsity"] - (row["target_sparsity"] or 0.0)) < 0.02, row
        assert row["perplexity"] > 0, row


def test_audit_by_address_runs_on_that_cluster_and_reruns_cached(tmp_path, checkpoints,
                                                                  dask_cluster, prefect_api):
    params = AuditParams(models=checkpoints[:2], name="by-address")
    remote = settings(tmp_path, "dask", dask_address=dask_cluster.scheduler_address)
    before = step_tasks_run(dask_cluster)
    first = spectral_audit(params, remote)
    assert step_tasks_run(dask_cluster) - before >= 3  # 2 spectral + 1 drift
    assert first == spectral_audit(params, settings(tmp_path, "sequential"))
    again = spectral_audit(params, remote)  # cache hits, looked up on the workers
    assert again["metrics"] == first["metrics"] and again["previous"] == first["metrics"][-1]


def test_an_address_without_the_dask_executor_is_refused():
    with pytest.raises(ValueError, match="dask_address"):
        RunSettings(executor="threads", dask_address="tcp://127.0.0.1:8786")
