"""The real local services start, serve, refuse bad credentials and stop cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tailwise_dev.services import (
    HOST,
    S3Info,
    Service,
    ServiceError,
    free_port,
    s3_client,
    start_moto,
    start_service,
    stop_pid,
)

pytestmark = pytest.mark.services


def _get_json(url: str) -> object:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        return json.loads(resp.read())


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists" for kill(0); it has stopped running though.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _roundtrip(s3: S3Info) -> None:
    client = s3.client()
    key = f"roundtrip/{uuid.uuid4().hex}.bin"
    body = os.urandom(3000) + b"tailwise"
    client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    assert client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == body
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="roundtrip/")
    assert key in [obj["Key"] for obj in listed["Contents"]]
    assert client.head_object(Bucket=s3.bucket, Key=key)["ContentLength"] == len(body)


def test_moto_put_get(s3_moto: S3Info) -> None:
    assert s3_moto.endpoint_url.startswith(f"http://{HOST}:")
    _roundtrip(s3_moto)


def test_nanio_put_get(s3_nanio: S3Info) -> None:
    _roundtrip(s3_nanio)


def test_nanio_refuses_wrong_secret(s3_nanio: S3Info) -> None:
    bad = s3_client(s3_nanio.endpoint_url, s3_nanio.access_key, "not-the-secret")
    with pytest.raises(ClientError) as err:
        bad.put_object(Bucket=s3_nanio.bucket, Key="forged.txt", Body=b"x")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    good = s3_nanio.client()
    with pytest.raises(ClientError):
        good.head_object(Bucket=s3_nanio.bucket, Key="forged.txt")


def test_mlflow_server_logs_to_sqlite_and_s3(
    mlflow_server: str, mlflow_artifacts: str, s3_moto: S3Info, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.create_experiment(f"services-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    run_id = run.info.run_id
    client.log_param(run_id, "alpha", "2.5")
    client.log_metric(run_id, "loss", 0.125, step=3)
    table = tmp_path / "table.csv"
    table.write_text("layer,alpha\nfc1,2.5\n")
    client.log_artifact(run_id, str(table), artifact_path="tables")
    client.set_terminated(run_id)

    got = client.get_run(run_id)
    assert got.data.params == {"alpha": "2.5"}
    assert got.data.metrics == {"loss": 0.125}
    assert got.info.status == "FINISHED"
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert [f.path for f in client.list_artifacts(run_id, "tables")] == ["tables/table.csv"]
    local = client.download_artifacts(run_id, "tables/table.csv", str(tmp_path / "dl"))
    assert Path(local).read_text() == table.read_text()

    # The artifact really lives in the S3 bucket behind the server.
    bucket, prefix = mlflow_artifacts.removeprefix("s3://").split("/", 1)
    s3 = s3_client(s3_moto.endpoint_url, s3_moto.access_key, s3_moto.secret_key)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    expected = f"{prefix}/{exp_id}/{run_id}/artifacts/tables/table.csv"
    assert expected in keys
    assert s3.get_object(Bucket=bucket, Key=expected)["Body"].read() == table.read_bytes()


def test_prefect_server_health(prefect_server: str) -> None:
    assert prefect_server.endswith("/api")
    assert _get_json(f"{prefect_server}/health") is True


FLOW_SCRIPT = """
import json
from prefect import flow

@flow(name="tailwise-smoke")
def smoke(x: int) -> int:
    return x + 1

state = smoke(41, return_state=True)
print("RESULT " + json.dumps({"id": str(state.state_details.flow_run_id),
                              "value": state.result()}))
"""


def test_prefect_flow_runs_against_server(prefect_server: str, tmp_path: Path) -> None:
    script = tmp_path / "smoke_flow.py"
    script.write_text(textwrap.dedent(FLOW_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / "client-home"))
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["value"] == 42

    flow_run = _get_json(f"{prefect_server}/flow_runs/{result['id']}")
    assert isinstance(flow_run, dict)
    assert flow_run["state"]["type"] == "COMPLETED"
    flow = _get_json(f"{prefect_server}/flows/{flow_run['flow_id']}")
    assert isinstance(flow, dict) and flow["name"] == "tailwise-smoke"


def test_service_that_dies_reports_its_log(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "bad.log"
    moto = str(Path(sys.executable).parent / "moto_server")
    with pytest.raises(ServiceError) as err:
        start_service(
            "moto",
            [moto, "-H", HOST, "-p", str(port), "--no-such-flag"],
            port=port,
            url=f"http://{HOST}:{port}",
            health_url=f"http://{HOST}:{port}/moto-api/",
            log_path=log,
            timeout=30,
        )
    message = str(err.value)
    assert "exited with code 2" in message
    assert "unrecognized arguments: --no-such-flag" in message  # the log tail
    assert str(log) in message


def test_occupied_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServiceError, match=f"port {port} on {HOST} is already in use"):
            start_moto(port=port, log_path=tmp_path / "moto.log")


def _http_server_with_child(tmp_path: Path, timeout: float = 30) -> tuple[Service, int]:
    """A service whose shell leaves a background child in the process group."""
    port = free_port()
    script = f"sleep 300 & echo CHILD $!; exec {sys.executable} -m http.server -b {HOST} {port}"
    service = start_service(
        "http",
        ["sh", "-c", script],
        port=port,
        url=f"http://{HOST}:{port}",
        health_url=f"http://{HOST}:{port}/",
        log_path=tmp_path / "http.log",
        cwd=tmp_path,
        timeout=timeout,
    )
    child = int(service.log_tail().split("CHILD ")[1].split()[0])
    return service, child


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    service, child = _http_server_with_child(tmp_path)
    with service:
        assert service.alive() and _pid_exists(child)
    assert not service.alive()
    assert not _pid_exists(child)


def test_stop_pid_stops_a_recorded_group(tmp_path: Path) -> None:
    service, child = _http_server_with_child(tmp_path)
    assert stop_pid(service.pid, timeout=10) is True
    service.process.wait(timeout=10)
    assert not _pid_exists(child)
    assert stop_pid(service.pid) is False


def test_not_ready_before_deadline_is_an_error(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(ServiceError, match="did not answer .* within 2 s") as err:
        start_service(
            "silent",
            [
                sys.executable,
                "-c",
                "import time; print('never listening', flush=True); time.sleep(300)",
            ],
            port=port,
            url=f"http://{HOST}:{port}",
            health_url=f"http://{HOST}:{port}/",
            log_path=tmp_path / "silent.log",
            timeout=2,
        )
    assert "never listening" in str(err.value)
