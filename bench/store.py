"""Artifact store throughput and memory: a 200 MB file through our store vs plain boto3.

    python bench/store.py [--size-mb 200]

For each backend (moto's S3 server, nanio's on-disk S3 server, a local directory) it
times put and get of the same file through `ArtifactStore`, and, for S3, plain boto3
`upload_file`/`download_file` of the same file with boto3's default transfer settings.
Each measurement runs in a fresh process so its peak RSS above the process's
baseline (after imports) is its own. Targets: store within 1.2x of plain boto3;
peak RSS under 150 MB above baseline (streaming, never the whole file in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case(kind: str, store_url: str, source: Path, workdir: Path) -> dict:
    """One measurement, in this (fresh) process: seconds up, seconds down, peak RSS delta."""
    from steps.core.store import ArtifactStore

    store = ArtifactStore.from_url(store_url)
    if kind == "boto3":
        import boto3

        client, bucket = boto3.session.Session().client(
            "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]), store.backend.bucket
        key = f"plain/{uuid.uuid4().hex}"
        base = rss_mb()
        started = time.perf_counter()
        client.upload_file(str(source), bucket, key)
        up = time.perf_counter() - started
        started = time.perf_counter()
        client.download_file(bucket, key, str(workdir / "plain.bin"))
        down = time.perf_counter() - started
    else:
        base = rss_mb()
        started = time.perf_counter()
        digest = store.put(source, "blob").digest
        up = time.perf_counter() - started
        started = time.perf_counter()
        store.get(digest, workdir / "store.bin")
        down = time.perf_counter() - started
    return {"up_s": up, "down_s": down, "rss_mb": peak_rss_mb() - base}


def run_case(kind: str, store_url: str, source: Path, env: dict) -> dict:
    with tempfile.TemporaryDirectory(dir=source.parent) as workdir:
        out = subprocess.run([sys.executable, __file__, "--case", kind, store_url, str(source),
                              workdir], env=os.environ | env, capture_output=True, text=True,
                             check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, url, source, workdir = args.case
        print(json.dumps(case(kind, url, Path(source), Path(workdir))))
        return

    from tailwise_dev.services import make_bucket, start_moto, start_nanio

    size = args.size_mb * 2**20
    with tempfile.TemporaryDirectory(prefix="tailwise-bench-") as tmp:
        tmp = Path(tmp)
        source = tmp / "blob.bin"
        with open(source, "wb") as out:  # random bytes, written in chunks
            for _ in range(args.size_mb):
                out.write(os.urandom(2**20))
        rows = []
        with start_moto(log_path=tmp / "moto.log") as moto, \
                start_nanio(tmp / "nanio", access_key="bench", secret_key="bench-secret") as nanio:
            servers = {"moto": make_bucket(moto.url, "bench", "testing", "testing"),
                       "nanio": make_bucket(nanio.url, "bench", "bench", "bench-secret")}
            for name, info in servers.items():
                url = f"s3://{info.bucket}/{uuid.uuid4().hex}"
                plain = run_case("boto3", url, source, info.env())
                ours = run_case("store", url, source, info.env())
                rows.append((name, ours, plain))
            rows.append(("local dir", run_case("store", str(tmp / "local"), source, {}), None))
    mb = size / 2**20
    print(f"\n{args.size_mb} MB file, {os.cpu_count()} cores")
    print(f"{'backend':<10} {'put MB/s':>9} {'get MB/s':>9} {'boto3 up':>9} {'boto3 down':>10} "
          f"{'put/boto3':>9} {'get/boto3':>9} {'peak RSS +MB':>12}")
    for name, ours, plain in rows:
        line = f"{name:<10} {mb / ours['up_s']:>9.0f} {mb / ours['down_s']:>9.0f} "
        if plain:
            up_ratio, down_ratio = ours["up_s"] / plain["up_s"], ours["down_s"] / plain["down_s"]
            line += (f"{mb / plain['up_s']:>9.0f} {mb / plain['down_s']:>10.0f} "
                     f"{up_ratio:>8.2f}x {down_ratio:>8.2f}x ")
        else:
            line += f"{'-':>9} {'-':>10} {'-':>9} {'-':>9} "
        print(line + f"{ours['rss_mb']:>12.0f}")
    print("targets: put/get within 1.2x of plain boto3; peak RSS < 150 MB above baseline")


if __name__ == "__main__":
    main()
