"""Shared pytest setup: deterministic threads, no network, real local services.

The service fixtures are session-scoped and lazy: a server starts the first
time a test asks for it and stops at the end of the session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Pin thread pools before numpy/torch load, and keep every library offline.
for _var in (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process Prefect (ephemeral API) keeps its database in a private home, not ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tailwise-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from tailwise_dev.services import (  # noqa: E402
    OFFLINE_ENV,
    S3Info,
    Service,
    make_bucket,
    start_mlflow,
    start_moto,
    start_nanio,
    start_prefect,
)

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set, or parallel work already started
    pass

MOTO_KEYS = ("testing", "testing")
NANIO_KEYS = ("tailwise", "tailwise-nanio-secret")


_STARTUP_S: dict[str, float] = {}


def _report(service_name: str, seconds: float) -> None:
    _STARTUP_S[service_name] = seconds


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how long each service fixture took to become ready."""
    if _STARTUP_S:
        times = ", ".join(f"{name} {sec:.1f} s" for name, sec in _STARTUP_S.items())
        terminalreporter.write_line(f"service start-up: {times}")


@pytest.fixture(scope="session")
def moto_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The moto S3 server process (in-memory)."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with start_moto(log_path=log) as service:
        _report("moto", service.startup_s)
        yield service


@pytest.fixture(scope="session")
def s3_moto(moto_service: Service) -> S3Info:
    """A bucket on moto's S3 server."""
    return make_bucket(moto_service.url, "tailwise-test", *MOTO_KEYS)


@pytest.fixture(scope="session")
def s3_nanio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Info]:
    """A bucket on a nanio server (data on disk, SigV4 checked)."""
    root = tmp_path_factory.mktemp("nanio")
    with start_nanio(root / "data", access_key=NANIO_KEYS[0], secret_key=NANIO_KEYS[1]) as svc:
        _report("nanio", svc.startup_s)
        yield make_bucket(svc.url, "tailwise-test", *NANIO_KEYS)


@pytest.fixture(scope="session")
def mlflow_artifacts(moto_service: Service) -> str:
    """The ``s3://`` URI (on moto) where the MLflow server stores artifacts."""
    info = make_bucket(moto_service.url, "mlflow", *MOTO_KEYS)
    return f"s3://{info.bucket}/artifacts"


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, moto_service: Service, mlflow_artifacts: str
) -> Iterator[str]:
    """Tracking URI of an MLflow server (SQLite backend, artifacts proxied to moto S3)."""
    root = tmp_path_factory.mktemp("mlflow")
    env = {"AWS_ACCESS_KEY_ID": MOTO_KEYS[0], "AWS_SECRET_ACCESS_KEY": MOTO_KEYS[1]}
    with start_mlflow(root / "mlflow.db", mlflow_artifacts, moto_service.url, env=env) as svc:
        _report("mlflow", svc.startup_s)
        yield svc.url


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """API URL (``http://127.0.0.1:P/api``) of a Prefect server with a private home."""
    home: Path = tmp_path_factory.mktemp("prefect-home")
    with start_prefect(home, ui=False) as svc:
        _report("prefect", svc.startup_s)
        yield svc.url
        drain_prefect_workers()


def drain_prefect_workers() -> None:
    """Send the flow logs and events still queued in this process while the server is up;
    at exit Prefect would retry them against a stopped server for a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30)


@pytest.fixture
def prefect_api(prefect_server: str) -> Iterator[str]:
    """Flows run in this process report to the test Prefect server, not an ephemeral one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server
