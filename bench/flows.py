"""Orchestration overhead: a 4-step flow on a local Prefect server vs plain function calls.

    python bench/flows.py

The flow (build_model -> spectral -> allocate -> drift) runs three ways, each on a
fresh store: as plain `run_step` calls, as a Prefect flow against a local Prefect
server (cold: every step computes), and again on the same store (every step cached).
Targets: overhead under 1 s per step; a fully cached rerun under 10 s.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from prefect import flow  # noqa: E402

from flows.common import RunSettings, flow_run_context  # noqa: E402

STEPS = 4


def plan(model: str) -> list[tuple[str, dict, dict[str, str]]]:
    """The 4 steps with symbolic inputs ("step.output"), resolved as results come in."""
    return [("build_model", {"name": model}, {}),
            ("spectral", {"estimator": "alpha_peak", "plots": False},
             {"model": "build_model.model"}),
            ("allocate", {"policy": "alphapruning", "options": {"sparsity": 0.5}},
             {"metrics": "spectral.metrics"}),
            ("drift", {"threshold": 0.5},
             {"previous": "spectral.metrics", "current": "spectral.metrics"})]


def resolve(inputs: dict[str, str], digests: dict[str, str]) -> dict[str, str]:
    return {name: digests[ref] for name, ref in inputs.items()}


def plain(store_url: str, tracking_uri: str, model: str) -> float:
    from steps.core.registry import load_step
    from steps.core.step import run_step
    from steps.core.store import open_store
    from steps.core.tracking import Tracker

    store, tracker, digests = open_store(store_url), Tracker(tracking_uri), {}
    started = time.perf_counter()
    for name, params, inputs in plan(model):
        result = run_step(load_step(name), params, resolve(inputs, digests), store=store,
                          tracker=tracker)
        digests |= {f"{name}.{k}": v for k, v in result.digests().items()}
    return time.perf_counter() - started


@flow(name="bench-4-steps")
def four_steps(model: str, settings: RunSettings) -> bool:
    """The plan as a flow; True when every step was a cache hit."""
    digests, cached = {}, []
    with flow_run_context("bench", settings, {}) as run:
        for name, params, inputs in plan(model):
            result = run.step(name, params, resolve(inputs, digests))
            digests |= {f"{name}.{k}": v for k, v in result.digests().items()}
            cached.append(result.cached)
    return all(cached)


def orchestrated(store_url: str, tracking_uri: str, model: str) -> tuple[float, bool]:
    settings = RunSettings(store=store_url, tracking_uri=tracking_uri)
    started = time.perf_counter()
    all_cached = four_steps(model, settings)
    return time.perf_counter() - started, all_cached


def main() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tailwise_dev.services import start_prefect

    model = "tiny-llama"
    with tempfile.TemporaryDirectory(prefix="tailwise-bench-flows-") as tmp:
        tmp = Path(tmp)
        tracking = f"sqlite:///{tmp / 'mlflow.db'}"
        plain(str(tmp / "warm"), tracking, model)  # imports and MLflow tables, not measured
        base = plain(str(tmp / "plain"), tracking, model)
        with start_prefect(tmp / "prefect", ui=False) as server, \
                temporary_settings({PREFECT_API_URL: server.url}):
            orchestrated(str(tmp / "warm-flow"), tracking, model)  # first flow registration
            cold, _ = orchestrated(str(tmp / "flow"), tracking, model)
            rerun, all_cached = orchestrated(str(tmp / "flow"), tracking, model)
    overhead = (cold - base) / STEPS
    print(f"\n{STEPS}-step flow on {model}, local Prefect server, {os.cpu_count()} cores")
    print(f"plain function calls      : {base:6.2f} s")
    print(f"Prefect flow, cold        : {cold:6.2f} s  ({cold / base:.2f}x plain)")
    print(f"overhead per step         : {overhead:6.2f} s  (target < 1 s)")
    print(f"fully cached rerun        : {rerun:6.2f} s  (target < 10 s; all cached: "
          f"{all_cached})")


if __name__ == "__main__":
    main()
