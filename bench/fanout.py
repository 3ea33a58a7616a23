"""Fan-out speedup: 8 independent spectral analyses, sequential vs threads vs Dask.

    python bench/fanout.py [--models 8] [--width 512] [--layers 4]

Eight seeded GPT-2-shaped models (mid-size, so one spectral step takes about 1-3 s) are
analysed by one flow that submits a spectral step per model, on a local Prefect server,
each executor on a fresh store (every step computes). Executors: sequential; threads
(2 threads); dask on a LocalCluster the flow starts itself (cold: the workers import torch
and the steps inside the measured time); dask on an already running LocalCluster by
address (warm workers, the production case). Every worker, thread or process, runs torch
on 1 thread, so 2 workers can reach at most 2x. The digests must be the same everywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect import flow  # noqa: E402

from flows.common import RunSettings, flow_run_context  # noqa: E402

WORKERS = 2


@flow(name="bench-fanout")
def spectral_fanout(models: list[str], settings: RunSettings) -> list[str]:
    """One spectral step per model, all submitted at once; the metrics digests."""
    with flow_run_context("bench-fanout", settings, {}) as run:
        futures = [run.submit("spectral", {"estimator": "alpha_peak", "plots": False},
                              {"model": run.source(model, "model")}, label=f"spectral-{i}")
                   for i, model in enumerate(models)]
        return [future.result().digests()["metrics"] for future in futures]


def make_models(root: Path, count: int, width: int, layers: int) -> list[str]:
    """`count` seeded GPT-2 models of the given width and depth, saved as HF dirs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from steps.core.factory import save_hf

    config = GPT2Config(vocab_size=257, n_positions=128, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64))
    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        paths.append(str(save_hf(GPT2LMHeadModel(config), None, root / f"model-{seed}")))
    return paths


def timed(models: list[str], settings: RunSettings) -> tuple[float, list[str]]:
    started = time.perf_counter()
    digests = spectral_fanout(models, settings)
    return time.perf_counter() - started, digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import distributed
    import torch
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tailwise_dev.services import start_prefect

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tailwise-bench-fanout-") as tmp:
        tmp = Path(tmp)
        models = make_models(tmp / "models", args.models, args.width, args.layers)

        def settings(name: str, **extra) -> RunSettings:
            return RunSettings(store=str(tmp / f"store-{name}"), tracking=False,
                               workers=WORKERS, **extra)

        with start_prefect(tmp / "prefect", ui=False) as server, \
                temporary_settings({PREFECT_API_URL: server.url}):
            timed(models[:1], settings("warm-up"))  # imports, flow registration: not measured
            runs = {"sequential": timed(models, settings("sequential")),
                    "threads": timed(models, settings("threads", executor="threads")),
                    "dask (own cluster, cold)": timed(models, settings("dask-cold",
                                                                       executor="dask"))}
            with distributed.LocalCluster(n_workers=WORKERS, threads_per_worker=1,
                                          host="127.0.0.1", dashboard_address=None) as cluster:
                address = cluster.scheduler_address
                timed(models[:WORKERS], settings("dask-warm-up", executor="dask",
                                                 dask_address=address))  # worker imports
                runs["dask (running cluster)"] = timed(
                    models, settings("dask-warm", executor="dask", dask_address=address))
    report(runs, args)


def report(runs: dict[str, tuple[float, list[str]]], args: argparse.Namespace) -> None:
    base, reference = runs["sequential"]
    per_step = base / args.models
    print(f"\n{args.models} spectral steps on GPT-2 models (width {args.width}, "
          f"{args.layers} layers), {WORKERS} workers x 1 thread, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"sequential per step (incl. Prefect task overhead): {per_step:.2f} s")
    for name, (seconds, digests) in runs.items():
        same = "same digests" if digests == reference else "DIGESTS DIFFER"
        print(f"{name:26}: {seconds:7.2f} s  speedup {base / seconds:4.2f}x "
              f"(ideal {WORKERS}x)  {same}")


if __name__ == "__main__":
    main()
