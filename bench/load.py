"""Load: N concurrent flow runs against a real Prefect server and a real S3 server.

    python bench/load.py [--runs 1 4 16] [--timeout 600]

The bench starts a Prefect server and an S3 server (nanio, data on disk, SigV4) on free
ports of 127.0.0.1. For each N it starts N processes (one per flow run, as a process
worker would); they import everything, meet at a barrier, then each runs the short flow
build_model -> spectral on a tiny GPT-2 at the same moment, on one fresh S3 store. Seeds
repeat (seed = run % 4), so up to four runs race to write the very same artifacts.

Printed per N: throughput (runs/s from the barrier to the last run's end), p50/p95 latency
of a step (as the flow sees it: Prefect task + step + S3), and the checks: no deadlock
(every run ends within --timeout), no corruption (every manifest's content re-hashes to
its digest), runs of one seed got one set of digests. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
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

SEEDS = 4
BUCKET = "tailwise-load"
KEYS = ("tailwise", "tailwise-load-secret")


@flow(name="bench-load")
def short_flow(seed: int, settings: RunSettings) -> dict:
    """build_model -> spectral; each step's latency as the flow sees it, and the digests."""
    latencies, digests = [], {}
    with flow_run_context("bench-load", settings, {"seed": seed}) as run:
        for name, params in (("build_model", {"name": "tiny-gpt2", "seed": seed}),
                             ("spectral", {"plots": False})):
            inputs = {"model": digests["model"]} if name == "spectral" else {}
            started = time.perf_counter()
            digests |= run.step(name, params, inputs).digests()
            latencies.append(time.perf_counter() - started)
    return {"latencies": latencies, "digests": digests}


def one_run(store_url: str, seed: int, barrier, results) -> None:
    """A run process: import, wait for the others, run the flow, report."""
    import torch

    torch.set_num_threads(1)
    from steps.core.registry import load_step  # imports before the barrier: not measured

    load_step("build_model"), load_step("spectral")
    barrier.wait(timeout=600)
    try:
        out = short_flow(seed, RunSettings(store=store_url, tracking=False))
        results.put({"seed": seed, "end": time.time(), **out})
    except Exception as exc:
        results.put({"seed": seed, "end": time.time(), "error": f"{type(exc).__name__}: {exc}"})


def load_round(store_url: str, runs: int, timeout: float) -> dict:
    """N concurrent flow runs; their results (or the deadlock) and the wall time."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(runs + 1), context.Queue()
    processes = [context.Process(target=one_run, args=(store_url, i % SEEDS, barrier, results))
                 for i in range(runs)]
    for process in processes:
        process.start()
    barrier.wait(timeout=900)  # every run process has imported its code
    started, deadline = time.time(), time.time() + timeout
    done = []
    while len(done) < runs and time.time() < deadline:
        try:
            done.append(results.get(timeout=max(0.1, deadline - time.time())))
        except queue.Empty:
            break
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    wall = max((r["end"] for r in done), default=time.time()) - started
    return {"results": done, "wall": wall, "deadlocked": len(done) < runs}


def corrupt_artifacts(store_url: str, scratch: Path) -> tuple[int, list[str]]:
    """Download every artifact of the store and re-hash it; (count, problems)."""
    from steps.core.errors import TailwiseError
    from steps.core.store import open_store, sha256_file, tree_digest

    store, problems = open_store(store_url), []
    manifests = store.list()
    for manifest in manifests:
        where = scratch / manifest.digest
        try:
            path = store.get(manifest.digest, where)  # re-hashes every object it fetches
            actual = (tree_digest(manifest.files) if manifest.is_dir else sha256_file(path))
            if actual != manifest.digest:
                problems.append(f"{manifest.digest[:12]}: content hashes to {actual[:12]}")
        except TailwiseError as exc:
            problems.append(f"{manifest.digest[:12]}: {exc}")
    return len(manifests), problems


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def report(runs: int, outcome: dict, checked: int, problems: list[str]) -> bool:
    results = outcome["results"]
    errors = [r["error"] for r in results if "error" in r]
    finished = [r for r in results if "error" not in r]
    latencies = [s for r in finished for s in r["latencies"]]
    by_seed: dict[int, set] = {}
    for r in finished:
        by_seed.setdefault(r["seed"], set()).add(tuple(sorted(r["digests"].items())))
    consistent = all(len(digests) == 1 for digests in by_seed.values())
    ok = not errors and not outcome["deadlocked"] and not problems and consistent
    line = f"N={runs:3}: {len(finished)}/{runs} runs in {outcome['wall']:6.2f} s, " \
           f"{len(finished) / outcome['wall']:5.2f} runs/s"
    if latencies:
        line += f", step latency p50 {percentile(latencies, 50):5.2f} s " \
                f"p95 {percentile(latencies, 95):5.2f} s"
    print(line + f"; {checked} artifacts re-hashed, {len(problems)} corrupt; "
          f"same digests per seed: {consistent}; deadlock: {outcome['deadlocked']}")
    for problem in [*errors, *problems][:10]:
        print(f"   problem: {problem}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a round may take before it counts as a deadlock")
    args = parser.parse_args()

    from tailwise_dev.services import OFFLINE_ENV, make_bucket, start_nanio, start_prefect

    os.environ.update(OFFLINE_ENV)
    with tempfile.TemporaryDirectory(prefix="tailwise-bench-load-") as tmp:
        tmp = Path(tmp)
        with start_nanio(tmp / "s3", access_key=KEYS[0], secret_key=KEYS[1]) as s3, \
                start_prefect(tmp / "prefect", ui=False) as prefect:
            # The run processes inherit these: the stack's servers, private Prefect home.
            os.environ.update(make_bucket(s3.url, BUCKET, *KEYS).env())
            os.environ.update(PREFECT_API_URL=prefect.url,
                              PREFECT_HOME=str(tmp / "prefect-client"))
            print(f"Prefect {prefect.url}, S3 {s3.url}; {os.cpu_count()} cores, "
                  f"load average {os.getloadavg()[0]:.1f}")
            ok = True
            for runs in args.runs:
                store_url = f"s3://{BUCKET}/load-{runs}"
                outcome = load_round(store_url, runs, args.timeout)
                checked, problems = corrupt_artifacts(store_url, tmp / f"check-{runs}")
                ok &= report(runs, outcome, checked, problems)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
