"""A whole local stack (`infra/local/stack.py`) in a temporary directory, on free ports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tailwise_dev.services import free_port

REPO = Path(__file__).resolve().parents[2]
STACK_SCRIPT = REPO / "infra" / "local" / "stack.py"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ui: drives the Prefect UI in a real (headless) browser")


def load_stack_module() -> ModuleType:
    """infra/local/stack.py as a module (infra/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tailwise_local_stack", STACK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_stack(command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STACK_SCRIPT), command], env=os.environ | env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The settings of `stack.py`: a temp state dir and free ports."""
    return {
        "TAILWISE_STACK_DIR": str(tmp_path_factory.mktemp("stack")),
        "TAILWISE_STACK_S3_PORT": str(free_port()),
        "TAILWISE_STACK_MLFLOW_PORT": str(free_port()),
        "TAILWISE_STACK_PREFECT_PORT": str(free_port()),
        "TAILWISE_STACK_WORKER_PORT": str(free_port()),
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker picks up the run sooner
    }


@pytest.fixture(scope="module")
def stack(stack_env: dict[str, str]) -> Iterator:
    """`stack.py up` with `stack_env`; yields its StackConfig; `stack.py down` after."""
    env = stack_env
    cfg = load_stack_module().StackConfig(
        state_dir=Path(env["TAILWISE_STACK_DIR"]), s3_port=int(env["TAILWISE_STACK_S3_PORT"]),
        mlflow_port=int(env["TAILWISE_STACK_MLFLOW_PORT"]),
        prefect_port=int(env["TAILWISE_STACK_PREFECT_PORT"]),
        worker_port=int(env["TAILWISE_STACK_WORKER_PORT"]))
    try:
        started = run_stack("up", env, timeout=300)
        assert started.returncode == 0, f"stack up failed:\n{started.stdout}\n{started.stderr}"
        secret = cfg.client_env()["AWS_SECRET_ACCESS_KEY"]
        assert secret not in started.stdout + started.stderr, "up printed the S3 secret"
        assert cfg.prefect_ui_url in started.stdout and cfg.mlflow_url in started.stdout
        assert cfg.credentials_file.stat().st_mode & 0o777 == 0o600
        yield cfg
    finally:
        stopped = run_stack("down", env, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
