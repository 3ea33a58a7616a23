"""Start and stop the real local services (S3, MLflow, Prefect) on 127.0.0.1.

Each ``start_*`` function launches the service as a subprocess in its own
process group, polls its health endpoint until it answers (or a deadline
passes), and returns a :class:`Service` handle. ``Service.stop()`` terminates
the whole process group, then kills it if it has not exited in time. Handles
are context managers, so ``with start_moto() as s3: ...`` cleans up.

Used by the pytest fixtures in ``tests/conftest.py`` and by the local stack
(``make up``); :func:`stop_pid` stops a service started by an earlier process
from its recorded PID.

Binaries are resolved next to ``sys.executable`` (the venv's ``bin/``), so
nothing needs to be activated. Every service binds to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core.offline import OFFLINE_ENV

HOST = "127.0.0.1"
BIN_DIR = Path(sys.executable).parent

class ServiceError(RuntimeError):
    """A service failed to start, died, or did not become ready in time."""


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something already listens on (or holds) ``host:port``.

    Uses SO_REUSEADDR like the servers do, so a port left in TIME_WAIT by a
    previous run does not count as taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_pid(pid: int, timeout: float = 15.0) -> bool:
    """Stop the process group led by ``pid``: SIGTERM, then SIGKILL after ``timeout``.

    Returns False when no such process group exists (already stopped).
    Only for groups started by :func:`start_service` (which makes the child a
    session and group leader), e.g. from a PID file written by ``make up``.
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The group leader may be a zombie child of ours: reap it so it stops counting.
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


@dataclass
class Service:
    """A running service: where to reach it, its process and its log."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    health_url: str
    startup_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the whole process group; kill it if still alive after ``timeout``."""
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        # Children may outlive the leader: give them the rest of the time, then kill.
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def kill(self, timeout: float = 15.0) -> None:
        """kill -9 the whole process group (a crash, not a shutdown) and wait until every
        process of it is gone, so its port is free again."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        deadline = time.monotonic() + timeout
        while _group_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe(url: str, ok_status: Iterable[int] = (200,)) -> bool:
    """One health probe (no proxy): True when ``url`` answers with a status in ``ok_status``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            return resp.status in ok_status
    except urllib.error.HTTPError as err:
        return err.code in ok_status
    except (OSError, ValueError):
        return False


def start_service(
    name: str,
    cmd: list[str],
    *,
    port: int,
    url: str,
    health_url: str,
    log_path: Path,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    ok_status: Iterable[int] = (200,),
    timeout: float = 60.0,
) -> Service:
    """Launch ``cmd`` in a new process group and wait until ``health_url`` answers.

    ``env`` is added to this process's environment (a ``None`` value removes the
    variable). Raises :class:`ServiceError`, with the tail of the service's log, when
    ``port`` is taken, the process exits early, or ``timeout`` seconds pass.
    """
    if port_in_use(port):
        raise ServiceError(f"{name}: port {port} on {HOST} is already in use")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **OFFLINE_ENV}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    no_proxy = ",".join(filter(None, [full_env.get("NO_PROXY"), HOST, "localhost"]))
    full_env["NO_PROXY"] = full_env["no_proxy"] = no_proxy
    ok = tuple(ok_status)
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    service = Service(name, url, port, process, log_path, health_url)
    deadline = t0 + timeout
    while True:
        code = process.poll()
        if code is not None:
            service.stop()
            raise ServiceError(
                f"{name} exited with code {code} before it was ready "
                f"(command: {' '.join(cmd)}); last lines of {log_path}:\n{service.log_tail()}"
            )
        if probe(health_url, ok):
            break
        if time.monotonic() > deadline:
            service.stop()
            raise ServiceError(
                f"{name} did not answer {health_url} within {timeout:.0f} s; "
                f"last lines of {log_path}:\n{service.log_tail()}"
            )
        time.sleep(0.2)
    service.startup_s = time.monotonic() - t0
    return service


def _bin(name: str) -> str:
    path = BIN_DIR / name
    if not path.exists():
        raise ServiceError(f"{name} not found next to {sys.executable}; install the test extras")
    return str(path)


def start_moto(
    port: int | None = None, log_path: Path | None = None, timeout: float = 30.0
) -> Service:
    """In-memory S3 (and other AWS APIs) from ``moto_server``; data is lost on stop."""
    port = port or free_port()
    log_path = log_path or Path(f"/tmp/tailwise-moto-{port}.log")
    return start_service(
        "moto",
        [_bin("moto_server"), "-H", HOST, "-p", str(port)],
        port=port,
        url=f"http://{HOST}:{port}",
        health_url=f"http://{HOST}:{port}/moto-api/",
        log_path=log_path,
        timeout=timeout,
    )


def start_nanio(
    data_dir: Path,
    port: int | None = None,
    access_key: str = "tailwise",
    secret_key: str = "tailwise-secret",
    region: str = "us-east-1",
    log_path: Path | None = None,
    timeout: float = 30.0,
) -> Service:
    """Persistent S3 server ``nanio``: buckets are folders under ``data_dir``.

    It verifies SigV4 signatures: clients need ``Config(signature_version="s3v4")``
    and the same ``access_key``/``secret_key``.
    """
    port = port or free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir.parent / f"nanio-{port}.log"
    env = {"NANIO_ACCESS_KEY": access_key, "NANIO_SECRET_KEY": secret_key}
    service = start_service(
        "nanio",
        [
            _bin("nanio"),
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--region",
            region,
            "--workers",
            "1",
        ],
        port=port,
        url=f"http://{HOST}:{port}",
        # nanio has no health endpoint: an unsigned GET / answers 403 once it serves.
        health_url=f"http://{HOST}:{port}/",
        ok_status=(200, 403),
        log_path=log_path,
        env=env,
        timeout=timeout,
    )
    service.extra.update(access_key=access_key, secret_key=secret_key, region=region)
    return service


@dataclass(frozen=True)
class MlflowAuth:
    """Basic auth for :func:`start_mlflow` (MLflow's ``basic-auth`` app).

    ``admin_username``/``admin_password`` become the admin user the first time the
    server starts against an empty auth database (later starts ignore them: MLflow
    keeps the stored password). ``secret_key`` is the Flask key MLflow's CSRF
    protection needs. ``default_permission`` is what every user may do on
    experiments nobody granted them (MLflow's own default is READ).
    The password and key travel in the server's environment only, never in a file.
    """

    admin_username: str
    # repr=False: a handle printed in a log or a test report shows no secret.
    admin_password: str = field(repr=False)
    secret_key: str = field(repr=False)
    default_permission: str = "READ"


def write_mlflow_auth_config(path: Path, auth: MlflowAuth, database_uri: str) -> Path:
    """The ``basic_auth.ini`` MLflow reads from ``MLFLOW_AUTH_CONFIG_PATH`` (no secrets in it)."""
    path = Path(path)
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {auth.default_permission}\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {auth.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def start_mlflow(
    backend_sqlite_path: Path,
    artifacts_destination: str,
    s3_endpoint: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    timeout: float = 90.0,
    auth: MlflowAuth | None = None,
) -> Service:
    """MLflow tracking server: SQLite backend, artifacts proxied to S3.

    ``artifacts_destination`` is an ``s3://bucket/prefix`` URI. The server runs
    with artifact proxying (``--serve-artifacts --artifacts-destination``): clients
    log artifacts through the server over HTTP (``mlflow-artifacts:/`` URIs), so
    only the server needs S3 credentials. Put them in ``env`` (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``; ``s3_endpoint`` becomes ``MLFLOW_S3_ENDPOINT_URL``).
    ``service.url`` is the tracking URI.

    With ``auth``, the server runs MLflow's ``basic-auth`` app (needs ``mlflow[auth]``):
    its users live in ``basic_auth.db`` beside the backend, its config in
    ``basic_auth.ini`` there (``service.extra["auth_config"]``); clients authenticate
    with ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``. ``/health`` stays open.
    """
    port = port or free_port()
    backend = Path(backend_sqlite_path).resolve()
    backend.parent.mkdir(parents=True, exist_ok=True)
    log_path = log_path or backend.parent / f"mlflow-{port}.log"
    full_env: dict[str, str | None] = {
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "AWS_DEFAULT_REGION": "us-east-1",
        **(env or {}),
    }
    auth_args: list[str] = []
    if auth is not None:
        auth_config = write_mlflow_auth_config(
            backend.parent / "basic_auth.ini", auth,
            f"sqlite:///{backend.parent / 'basic_auth.db'}")
        full_env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": auth.admin_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": auth.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": auth.secret_key,
            # The server must not act as a client of itself with someone's credentials.
            "MLFLOW_TRACKING_USERNAME": None,
            "MLFLOW_TRACKING_PASSWORD": None,
        }
        auth_args = ["--app-name", "basic-auth"]
    service = start_service(
        "mlflow",
        [
            _bin("mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{backend}",
            "--serve-artifacts",
            "--artifacts-destination",
            artifacts_destination,
            *auth_args,
        ],
        port=port,
        url=f"http://{HOST}:{port}",
        health_url=f"http://{HOST}:{port}/health",
        log_path=log_path,
        env=full_env,
        timeout=timeout,
    )
    if auth is not None:
        service.extra["auth_config"] = backend.parent / "basic_auth.ini"
    return service


def start_prefect(
    home_dir: Path,
    port: int | None = None,
    ui: bool = True,
    log_path: Path | None = None,
    timeout: float = 120.0,
    auth_string: str | None = None,
) -> Service:
    """Prefect server with its SQLite database under ``home_dir`` (``PREFECT_HOME``).

    ``service.url`` is the API URL (``http://127.0.0.1:P/api``) to put in
    ``PREFECT_API_URL`` for clients; ``service.extra["ui_url"]`` is the UI.

    With ``auth_string`` (``user:password``) the server requires HTTP basic auth on
    its API (``PREFECT_SERVER_API_AUTH_STRING``); clients send the same string from
    ``PREFECT_API_AUTH_STRING``. ``/api/health`` stays open, so readiness is probed
    as without it.
    """
    port = port or free_port()
    home = Path(home_dir).resolve()
    home.mkdir(parents=True, exist_ok=True)
    log_path = log_path or home / f"prefect-{port}.log"
    base = f"http://{HOST}:{port}"
    env: dict[str, str | None] = {
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_URL": None,  # the server itself must not point at another API
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"{base}/api",
        "PREFECT_UI_ENABLED": "true" if ui else "false",
    }
    if auth_string is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    cmd = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    if not ui:
        cmd.append("--no-ui")
    service = start_service(
        "prefect",
        cmd,
        port=port,
        url=f"{base}/api",
        health_url=f"{base}/api/health",
        log_path=log_path,
        env=env,
        timeout=timeout,
    )
    service.extra["ui_url"] = base
    return service


@dataclass(frozen=True)
class S3Info:
    """How to reach one bucket on an S3-compatible server."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (SigV4, path-style addressing)."""
        return s3_client(self.endpoint_url, self.access_key, self.secret_key, self.region)

    def env(self) -> dict[str, str]:
        """AWS_* variables that point a boto3-based tool at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1") -> Any:
    """A boto3 S3 client with SigV4 and path-style addressing (what nanio needs)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def make_bucket(
    endpoint: str, bucket: str, access_key: str, secret_key: str, region: str = "us-east-1"
) -> S3Info:
    """Create ``bucket`` (if missing) and return an :class:`S3Info` for it."""
    info = S3Info(endpoint, bucket, access_key, secret_key, region)
    client = info.client()
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return info
