"""Credentials never leak, and the local services listen on 127.0.0.1 only.

A secret S3 key and an MLflow password are planted in the environment; a real two-step chain
(build_model inline, then spectral as `python -m steps.spectral --request`) runs against
moto's S3 server and an MLflow server. Then everything it left behind is searched: MLflow
params, tags, metrics and artifacts, every object in the bucket (manifests, cache entries,
outputs), the request and result files, logs and the process output.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from steps.core.step import run_step
from steps.core.store import ArtifactStore
from steps.core.tracking import EXPERIMENT, Tracker
from tailwise_dev.services import HOST, S3Info, Service

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[2]
SECRET_KEY = "tw-planted-aws-secret-" + "5f3a9c1e7b"
MLFLOW_PASSWORD = "tw-planted-mlflow-pass-" + "c0ffee42"
MLFLOW_USER = "tw-user"


def secret_forms() -> list[bytes]:
    """The secrets as they could appear: plain, and the password inside a basic-auth header."""
    basic = base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}".encode())
    return [SECRET_KEY.encode(), MLFLOW_PASSWORD.encode(), basic]


def leaks(blob: bytes | str) -> list[bytes]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [form for form in secret_forms() if form in data]


@pytest.fixture
def planted(s3_moto: S3Info, monkeypatch) -> S3Info:
    """moto accepts any key pair: sign with the planted secret."""
    for key, value in s3_moto.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    return s3_moto


def run_artifacts(client, run_id: str, dest: Path) -> list[Path]:
    local = Path(client.download_artifacts(run_id, "", str(dest)))
    return [p for p in local.rglob("*") if p.is_file()]


@pytest.mark.timeout(600)
def test_secrets_appear_nowhere(planted: S3Info, mlflow_server: str, tmp_path: Path,
                                caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)
    from steps.build_model.step import STEP as BUILD

    store_url = f"s3://{planted.bucket}/{uuid.uuid4().hex}"
    store = ArtifactStore.from_url(store_url)
    tracker = Tracker(mlflow_server)
    with tracker.flow_run("secrets-check", {"store": store_url}) as parent:
        built = run_step(BUILD, {"name": "tiny-gpt2", "seed": 1}, {}, store=store,
                         tracker=tracker, parent_run_id=parent.run_id)
        request = tmp_path / "request.json"
        request.write_text(json.dumps({
            "params": {"device": "cpu"}, "inputs": {"model": built.digests()["model"]},
            "store": store_url, "tracking": True, "tracking_uri": mlflow_server,
            "parent_run_id": parent.run_id}))
        done = subprocess.run([sys.executable, "-m", "steps.spectral", "--request",
                               str(request), "--result", str(tmp_path / "result.json")],
                              capture_output=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["outputs"]) == {"metrics", "esd", "plots", "report"}

    found: dict[str, list[bytes]] = {}

    def check(where: str, blob: bytes | str) -> None:
        if hits := leaks(blob):
            found[where] = hits

    # The files and output of the step process, and this process's logs and output.
    check("request.json", request.read_bytes())
    check("result.json", (tmp_path / "result.json").read_bytes())
    check("step process stdout", done.stdout)
    check("step process stderr", done.stderr)
    captured = capfd.readouterr()
    check("captured stdout", captured.out)
    check("captured stderr", captured.err)
    check("log records", "\n".join(r.getMessage() for r in caplog.records))
    assert caplog.records, "DEBUG logging captured nothing: the log check would be empty"

    # Every object in the store's part of the bucket: manifests, cache entries, outputs.
    client = planted.client()
    prefix = store_url.removeprefix(f"s3://{planted.bucket}/")
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=planted.bucket, Prefix=prefix) for item in page.get("Contents", [])]
    assert any("/manifests/" in k for k in keys) and any("/cache/" in k for k in keys)
    for key in keys:
        check(f"s3 {key}", client.get_object(Bucket=planted.bucket, Key=key)["Body"].read())

    # MLflow: the flow run and both step runs, with their params, tags, metrics, artifacts.
    from mlflow import MlflowClient

    mlflow = MlflowClient(mlflow_server)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = mlflow.search_runs([experiment.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(r.data.tags["tailwise.step"] for r in runs) == ["build_model", "spectral"]
    artifact_count = 0
    for run in [*runs, mlflow.get_run(parent.run_id)]:
        check(f"mlflow run {run.info.run_id}", json.dumps(
            {"params": run.data.params, "tags": run.data.tags, "metrics": run.data.metrics,
             "name": run.info.run_name, "uri": run.info.artifact_uri}))
        for path in run_artifacts(mlflow, run.info.run_id, tmp_path / run.info.run_id):
            artifact_count += 1
            check(f"mlflow artifact {path.name}", path.read_bytes())
    assert artifact_count > 0  # the spectral plots were logged and searched
    assert found == {}


# --- the authenticated setup: no credential in a step Job's manifest --------------------------

PREFECT_AUTH = "tw-prefect:tw-planted-prefect-pass-" + "77c3e1a0"


def worker_job(env_override: dict[str, str | None] | None = None) -> tuple[dict, dict]:
    """The env and the Job a Kubernetes worker holding the auth string submits for a step.

    Prefect's own code decides the env: `BaseJobConfiguration` (which the Kubernetes
    worker's configuration extends) merges the worker's settings with the pool template's
    `env` and drops null values. The manifest is the template filled by Prefect's
    `apply_values`, with that env put in front of the template's container env, as the
    Kubernetes worker does (`_populate_env_in_manifest`).
    """
    import asyncio

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    from steps.core.jobs import job_variables, load_template

    template = load_template()
    values = job_variables("spectral") | ({"env": env_override} if env_override else {})
    with temporary_settings({PREFECT_API_URL: "http://prefect-server:4200/api",
                             PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        config = asyncio.run(BaseJobConfiguration.from_template_and_values(template, values))
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="secret-check"))
    defaults = {name: prop["default"] for name, prop in template["variables"]["properties"].items()
                if prop.get("default") is not None}
    job = apply_values(template["job_configuration"], defaults | values)["job_manifest"]
    box = job["spec"]["template"]["spec"]["containers"][0]
    box["env"] = [{"name": k, "value": v} for k, v in config.env.items()] + box["env"]
    return config.env, job


def test_step_job_manifest_holds_no_prefect_auth_string() -> None:
    env, job = worker_job()
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"  # the worker's settings
    assert "PREFECT_API_AUTH_STRING" not in env
    text = json.dumps(job)
    assert PREFECT_AUTH not in text and base64.b64encode(PREFECT_AUTH.encode()).decode() not in text
    # ... and the step still authenticates: from the Secret, by reference.
    box = job["spec"]["template"]["spec"]["containers"][0]
    auth = [e for e in box["env"] if e["name"] == "PREFECT_API_AUTH_STRING"]
    assert auth == [{"name": "PREFECT_API_AUTH_STRING", "valueFrom": {
        "secretKeyRef": {"name": "prefect-auth", "key": "auth-string"}}}]
    assert {e["secretRef"]["name"] for e in box["envFrom"] if "secretRef" in e} == {
        "tailwise-s3", "tailwise-mlflow"}
    assert not any(is_literal_secret(e) for e in box["env"])


def test_a_deployments_own_env_keeps_the_auth_string_out() -> None:
    """Prefect merges a deployment's `env` into the template's default, null entry included."""
    env, job = worker_job({"HF_HUB_OFFLINE": "1"})
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "PREFECT_API_AUTH_STRING" not in env and PREFECT_AUTH not in json.dumps(job)
    # Only a deployment that names the string itself would put it back (the check is live).
    env, job = worker_job({"PREFECT_API_AUTH_STRING": PREFECT_AUTH})
    assert PREFECT_AUTH in json.dumps(job)


def is_literal_secret(var: dict) -> bool:
    return any(w in var["name"] for w in SECRET_NAME_WORDS) and "value" in var


SECRET_NAME_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING", "TOKEN")


def literal_secrets(node: object, where: str = "") -> list[str]:
    """Secret-named settings in a parsed config that hold a literal value.

    A mapping key (`POSTGRES_PASSWORD: ...`) or an env entry (`name: ..., value: ...`)
    naming a secret must hold a compose reference (`${VAR:?...}`), a Secret reference
    (`valueFrom`), or nothing (null).
    """
    found = []
    if isinstance(node, dict):
        named = node.get("name") if isinstance(node.get("name"), str) else None
        if named and any(w in named.upper() for w in SECRET_NAME_WORDS) and node.get("value"):
            found.append(f"{where}.{named}")
        for key, value in node.items():
            secret_key = isinstance(key, str) and any(w in key.upper() for w in SECRET_NAME_WORDS)
            if secret_key and isinstance(value, str) and not value.startswith("${"):
                found.append(f"{where}.{key}")
            found += literal_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, f"{where}[{i}]")
    return found


def test_infra_configs_hold_no_credential() -> None:
    """Every compose, Kubernetes, helm and pool-template setting that names a secret refers to
    one; .env.example holds placeholders only."""
    import yaml

    configs = sorted((REPO / "infra").rglob("*.yaml")) + sorted((REPO / "infra").rglob("*.json"))
    assert len(configs) >= 6
    for path in configs:
        text = path.read_text()
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        assert literal_secrets(docs, path.name) == [], path
    assert literal_secrets({"X_PASSWORD": "hunter2"}) == [".X_PASSWORD"]  # the check is live
    for line in (REPO / "infra/compose/.env.example").read_text().splitlines():
        key, _, value = line.partition("=")
        if not line.startswith("#") and any(w in key for w in SECRET_NAME_WORDS):
            assert "change-me" in value, line


def test_unreachable_tracking_uri_does_not_echo_its_password() -> None:
    from steps.core.errors import TrackingError
    from tailwise_dev.services import free_port

    uri = f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@{HOST}:{free_port()}"
    with pytest.raises(TrackingError) as err:
        Tracker(uri)
    assert leaks(str(err.value)) == []


# --- where the services listen -----------------------------------------------------------


def listening_sockets(pgid: int) -> list[tuple[str, int]]:
    """(ip, port) of every listening TCP socket held by a process of group `pgid`."""
    sockets = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            sockets += [(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN]
        except (psutil.Error, ProcessLookupError):
            continue
    return sockets


def pgid_listening_on(port: int) -> int:
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return os.getpgid(conn.pid)
    raise AssertionError(f"nothing listens on port {port}")


def assert_loopback_only(url: str) -> None:
    assert url.startswith(f"http://{HOST}:"), url
    port = int(url.removeprefix(f"http://{HOST}:").split("/")[0])
    sockets = listening_sockets(pgid_listening_on(port))
    assert (HOST, port) in sockets
    assert {ip for ip, _ in sockets} == {HOST}, sockets


def test_moto_listens_on_loopback_only(moto_service: Service) -> None:
    assert_loopback_only(moto_service.url)
    assert listening_sockets(moto_service.pid)  # its own group, found by PID as well


def test_nanio_listens_on_loopback_only(s3_nanio: S3Info) -> None:
    assert_loopback_only(s3_nanio.endpoint_url)


def test_mlflow_listens_on_loopback_only(mlflow_server: str) -> None:
    assert_loopback_only(mlflow_server)


@pytest.mark.timeout(300)
def test_prefect_listens_on_loopback_only(prefect_server: str) -> None:
    assert_loopback_only(prefect_server)


def load_stack():
    spec = importlib.util.spec_from_file_location("tailwise_stack", REPO / "infra/local/stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_stack_addresses_and_credentials_files(tmp_path: Path, monkeypatch) -> None:
    """The stack's URLs are loopback; its keys live in a 0600 file that env.sh only sources."""
    stack = load_stack()
    monkeypatch.setenv("TAILWISE_STACK_DIR", str(tmp_path / "stack"))
    cfg = stack.StackConfig.from_env()
    for url in (cfg.s3_url, cfg.mlflow_url, cfg.prefect_ui_url, cfg.prefect_api_url):
        assert url.startswith(f"http://{HOST}:")
    creds = stack.ensure_credentials(cfg)
    assert (cfg.credentials_file.stat().st_mode & 0o777) == 0o600
    stack.write_env_file(cfg)
    secret = creds["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 32
    assert secret not in cfg.env_file.read_text()
    assert secret not in json.dumps(cfg.public_env())
    # What `up` prints about the credentials: where they come from, never their values.
    sources = "\n".join(stack.credential_sources(cfg))
    assert cfg.credentials_file.name in sources and "MLflow" in sources and "Prefect" in sources
    assert secret not in sources
