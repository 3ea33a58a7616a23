"""`tailwise run demo` end to end against a real Prefect server, and the CLI's bad-input
contract. (`tailwise demo`, alpha_prune on SmolLM2, runs through the same code as
`tailwise run alpha_prune`: tests/test_run_cli.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tailwise_dev.services import free_port

TAILWISE = [sys.executable, "-m", "tailwise_cli"]


def tailwise(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*TAILWISE, *args], capture_output=True, text=True, timeout=600,
                          env=os.environ | (env or {}), cwd=cwd)


@pytest.fixture
def demo_env(tmp_path, prefect_server) -> dict:
    return {"TAILWISE_STORE": str(tmp_path / "store"), "PREFECT_API_URL": prefect_server,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def test_tiny_demo_runs_is_cached_on_rerun_and_is_auditable(demo_env, tmp_path):
    first = tailwise("run", "demo", env=demo_env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    digests = dict(re.findall(r"(\w+\.\w+): ([0-9a-f]{64})  \(computed\)", first.stdout))
    assert {"build_model.model", "spectral.metrics", "spectral.esd", "spectral.plots"} <= \
        set(digests)
    assert re.search(r"MLflow\s+: parent run [0-9a-f]{32} in sqlite:///", first.stdout)
    audit = re.search(r"audit it\s+: tailwise (lineage \w+)", first.stdout).group(1).split()

    again = tailwise("run", "demo", env=demo_env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    cached = dict(re.findall(r"(\w+\.\w+): ([0-9a-f]{64})  \(cached\)", again.stdout))
    assert cached == digests
    assert "step spectral: cached (from run" in again.stdout + again.stderr

    lineage = tailwise(*audit, "--format", "json", env=demo_env)
    assert lineage.returncode == 0, lineage.stderr
    graph = json.loads(lineage.stdout)
    steps = {s["step"]: s for s in graph["steps"]}
    assert set(steps) == {"build_model", "spectral"}
    assert steps["spectral"]["inputs"] == {"model": digests["build_model.model"]}
    assert steps["build_model"]["params"] == {"name": "tiny-gpt2", "seed": 0, "width": None}
    assert steps["spectral"]["flow_run_id"] and steps["spectral"]["mlflow_run_id"]


def test_spectral_cli_on_a_model_dir(tmp_path):
    env = {"TAILWISE_STORE": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    built = tailwise("model", "tiny-llama", "--output", str(tmp_path / "llama"), env=env)
    assert built.returncode == 0, built.stderr
    done = tailwise("spectral", str(tmp_path / "llama"), "--output", str(tmp_path / "m.parquet"),
                    "--plots", str(tmp_path / "plots"), env=env)
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "m.parquet")
    assert table.num_rows > 0 and "model.layers.0.self_attn.q_proj" in \
        table.column("name").to_pylist()
    assert "matrices fitted; mean alpha" in done.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "alpha_vs_depth.png", "esd_best.png", "esd_worst.png"]


@pytest.fixture
def bad_env(tmp_path) -> dict:
    return {"TAILWISE_STORE": str(tmp_path / "store"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def assert_clean_failure(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def store_is_empty(env: dict) -> bool:
    from pathlib import Path

    manifests = Path(env["TAILWISE_STORE"]) / "manifests"
    return not manifests.exists() or not any(manifests.iterdir())


def test_missing_model_path(bad_env, tmp_path):
    done = tailwise("spectral", str(tmp_path / "nope"), env=bad_env)
    assert_clean_failure(done, str(tmp_path / "nope"), "no such file")
    assert store_is_empty(bad_env)


def test_corrupt_safetensors(bad_env, tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\"")
    done = tailwise("spectral", str(broken), env=bad_env)
    assert_clean_failure(done, str(broken))
    assert store_is_empty(bad_env)
    debug = tailwise("--debug", "spectral", str(broken), env=bad_env)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_unknown_digest(bad_env):
    assert_clean_failure(tailwise("lineage", "abcdef123456", env=bad_env), "no artifact")
    assert_clean_failure(tailwise("spectral", "abcdef123456", env=bad_env), "no artifact")


def test_invalid_params(bad_env):
    done = tailwise("model", "tiny-gpt2", "--seed", "-3", env=bad_env)
    assert_clean_failure(done, "invalid parameter seed")
    done = tailwise("model", "resnet-9000", env=bad_env)
    assert_clean_failure(done, "invalid parameter name")
    assert store_is_empty(bad_env)


def test_store_unreachable(bad_env):
    env = bad_env | {"TAILWISE_STORE": "s3://bucket/prefix", "TAILWISE_S3_MAX_ATTEMPTS": "1",
                     "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}",
                     "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    assert_clean_failure(tailwise("store", "ls", env=env), "cannot reach the S3 endpoint",
                         "bucket")


def test_mlflow_unreachable(bad_env):
    uri = f"http://127.0.0.1:{free_port()}"
    done = tailwise("model", "mlp", env=bad_env | {"MLFLOW_TRACKING_URI": uri})
    assert_clean_failure(done, "cannot reach the MLflow tracking server", uri)
    assert store_is_empty(bad_env)
