"""Lineage at scale: `check --all` re-hash throughput and `find` latency.

    python bench/lineage.py [--size-mb 512] [--files 8] [--manifests 100000]

1. check: a local store holding `--files` random files (`--size-mb` in all) is checked
   with `lineage check --all` (in this process: the re-hash, manifest and cache checks,
   without interpreter start-up) and the same object files are hashed by `sha256sum`.
   Both read from the page cache (each runs once before it is timed); best of 3 each.
   Target: check's MB/s >= 0.8x sha256sum's.
2. find: `--manifests` synthetic manifests (prune chains, tailwise_dev.synthetic_lineage)
   in a local store; the index is built once (cold), then each query is timed warm:
   index refresh (a listing of the store) + SQL, in this process, and the whole
   `tailwise lineage find` command (with Python's start-up) once. Target: < 1 s warm.
3. check at scale: the whole `tailwise lineage check --all` command over 1,000 and over all
   `--manifests` of those manifests (no content, so every artifact is a `missing` finding):
   seconds and peak resident memory (no manifest or finding is kept: what grows is the
   store's listing of names).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steps.core.lineage_check import check, scope  # noqa: E402
from steps.core.lineage_index import LineageIndex, Query  # noqa: E402
from steps.core.store import open_store  # noqa: E402
from tailwise_dev.synthetic_lineage import synthetic_manifests, write_manifests  # noqa: E402


def best_of(runs: int, fn) -> float:
    fn()  # warm: page cache, imports
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_check(workdir: Path, size_mb: int, files: int) -> None:
    store = open_store(str(workdir / "check-store"))
    chunk = size_mb * 2**20 // files
    for i in range(files):
        source = workdir / f"file-{i}.bin"
        source.write_bytes(os.urandom(chunk))
        store.put(source, "blob")
        source.unlink()
    total = chunk * files
    paths = [str(store.local_path(d)) for d in store.digests()]
    assert all(Path(p).is_file() for p in paths) and len(paths) == files

    def ours() -> None:
        findings = list(check(store, scope(store, None)))
        assert all(f.ok for f in findings), [f.line() for f in findings if not f.ok]

    def sha256sum() -> None:
        subprocess.run(["sha256sum", *paths], check=True, capture_output=True)

    ours_s, theirs_s = best_of(3, ours), best_of(3, sha256sum)
    ours_mbs, theirs_mbs = total / 2**20 / ours_s, total / 2**20 / theirs_s
    print(f"check --all: {total / 2**20:.0f} MB in {files} artifacts: {ours_s:.3f} s "
          f"({ours_mbs:.0f} MB/s); sha256sum {theirs_s:.3f} s ({theirs_mbs:.0f} MB/s); "
          f"ratio {ours_mbs / theirs_mbs:.2f}x (target >= 0.8x)")


def bench_find(workdir: Path, count: int) -> None:
    root = workdir / "find-store"
    started = time.perf_counter()
    manifests = synthetic_manifests(count)
    write_manifests(root, manifests)
    print(f"find: wrote {count} synthetic manifests in {time.perf_counter() - started:.1f} s")
    os.environ["TAILWISE_CACHE_DIR"] = str(workdir / "cache")
    store = open_store(str(root))
    started = time.perf_counter()
    index = LineageIndex(store)
    index.refresh()
    print(f"find: index built (cold) in {time.perf_counter() - started:.1f} s")
    index.close()
    queries = {
        "--step prune --param sparsity=0.7 --kind model":
            Query(step="prune", params=(("sparsity", 0.7),), kind="model"),
        "--since 2026-11-20": Query(since="2026-11-20T00:00:00.000+00:00"),
        "--produced-from <a model>": Query(produced_from=manifests[500].digest[:12]),
        "--git 2222": Query(git="2222"),
    }
    for text, query in queries.items():
        def warm_query(query=query) -> None:
            warm = LineageIndex(store)
            warm.refresh()
            warm.find(query, 50)
            warm.close()

        print(f"find {text}: {best_of(3, warm_query):.3f} s warm (refresh + query, "
              f"{count} manifests; target < 1 s)")
    command = [sys.executable, "-m", "tailwise_cli", "lineage", "find", "--step", "prune",
               "--param", "sparsity=0.7", "--store", str(root)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    print(f"find: the whole `tailwise lineage find` command, warm: "
          f"{time.perf_counter() - started:.2f} s (with Python's start-up and imports)")


# The command's own peak (VmHWM): getrusage's maxrss would carry the parent's over exec.
PEAK_RSS = """
import re, sys
from tailwise_cli import main
try:
    main()
except SystemExit:
    pass
status = open("/proc/self/status").read()
print(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1), file=sys.stderr)
"""


def bench_check_scale(workdir: Path, count: int) -> None:
    manifests = synthetic_manifests(count)
    small = workdir / "check-scale-small"
    write_manifests(small, manifests[:1000])
    for root, n in ((small, 1000), (workdir / "find-store", count)):
        command = [sys.executable, "-c", PEAK_RSS, "lineage", "check", "--all", "--format",
                   "json", "--store", str(root)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
        seconds = time.perf_counter() - started
        problems = json.loads(done.stdout)["problems"]
        peak_mb = int(done.stderr.strip().splitlines()[-1]) / 1024
        print(f"check --all over {n} manifests: {seconds:.1f} s, {problems} findings, "
              f"peak RSS {peak_mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--manifests", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tailwise-bench-lineage-") as scratch:
        bench_check(Path(scratch), args.size_mb, args.files)
        bench_find(Path(scratch), args.manifests)
        bench_check_scale(Path(scratch), args.manifests)


if __name__ == "__main__":
    main()
