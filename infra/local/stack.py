"""The local stack without Docker: `python infra/local/stack.py up|down|status|deploy`.

`up` starts, on 127.0.0.1 and each in its own process group:

- nanio, an S3 server with its buckets (`tailwise`, `mlflow`) as folders on disk;
- an MLflow server (SQLite backend, artifacts proxied to nanio's `mlflow` bucket);
- a Prefect server with its UI;
- a Prefect worker on the process work pool `tailwise`, after registering the
  deployments of `flows/deployments.py` on that pool (with their schedules).

Everything lives under the state directory (default `.tailwise/stack` in the repo):
data, logs, `pids.json` (what `down` stops, by process group), `credentials.env`
(S3 keys, generated once, mode 0600, never printed) and `env.sh` (what a shell
sources to use the stack; it reads the keys from `credentials.env`). A second `up`
probes each service and starts only those that are down.

Settings, from the environment: TAILWISE_STACK_DIR, TAILWISE_STACK_S3_PORT (9000),
TAILWISE_STACK_MLFLOW_PORT (5000), TAILWISE_STACK_PREFECT_PORT (4200),
TAILWISE_STACK_WORKER_PORT (4201, the worker's health check), TAILWISE_STACK_POOL.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from tailwise_dev.services import (  # noqa: E402
    BIN_DIR,
    HOST,
    OFFLINE_ENV,
    Service,
    ServiceError,
    make_bucket,
    probe,
    start_mlflow,
    start_nanio,
    start_prefect,
    start_service,
    stop_pid,
)

BUCKETS = ("tailwise", "mlflow")
REGION = "us-east-1"
ORDER = ("nanio", "mlflow", "prefect", "worker")
# Services of a stage start together; MLflow and Prefect need only what came before.
STAGES = (("nanio",), ("mlflow", "prefect"), ("worker",))


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which ports it binds."""

    state_dir: Path
    s3_port: int = 9000
    mlflow_port: int = 5000
    prefect_port: int = 4200
    worker_port: int = 4201
    pool: str = "tailwise"

    @classmethod
    def from_env(cls) -> StackConfig:
        env = os.environ
        return cls(
            state_dir=Path(env.get("TAILWISE_STACK_DIR", REPO / ".tailwise" / "stack")).resolve(),
            s3_port=int(env.get("TAILWISE_STACK_S3_PORT", 9000)),
            mlflow_port=int(env.get("TAILWISE_STACK_MLFLOW_PORT", 5000)),
            prefect_port=int(env.get("TAILWISE_STACK_PREFECT_PORT", 4200)),
            worker_port=int(env.get("TAILWISE_STACK_WORKER_PORT", 4201)),
            pool=env.get("TAILWISE_STACK_POOL", "tailwise"),
        )

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_ui_url}/api"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.env"

    @property
    def pids_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env.sh"

    def log(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def public_env(self) -> dict[str, str]:
        """What a client needs, without the credentials."""
        return {
            "TAILWISE_STORE": "s3://tailwise/store",
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PREFECT_API_URL": self.prefect_api_url,
        }

    def client_env(self) -> dict[str, str]:
        """Everything a client needs, credentials included (for processes, never printed)."""
        return {**self.public_env(), **read_credentials(self)}


def ensure_credentials(cfg: StackConfig) -> dict[str, str]:
    """Generate the S3 keys once into `credentials.env` (mode 0600); return them."""
    if not cfg.credentials_file.exists():
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        lines = f"AWS_ACCESS_KEY_ID=tailwise\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(24)}\n"
        fd = os.open(cfg.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(lines)
    return read_credentials(cfg)


def read_credentials(cfg: StackConfig) -> dict[str, str]:
    """The KEY=value lines of `credentials.env`."""
    pairs = (line.split("=", 1) for line in cfg.credentials_file.read_text().splitlines())
    return {key.strip(): value.strip() for key, value in pairs if key.strip()}


def write_env_file(cfg: StackConfig) -> None:
    """`env.sh`: the public settings, and the credentials sourced from their 0600 file."""
    lines = ["# tailwise local stack: `source` this file (written by infra/local/stack.py up)"]
    lines += [f"export {key}={value}" for key, value in cfg.public_env().items()]
    lines.append(f'set -a; . "{cfg.credentials_file}"; set +a')
    cfg.env_file.write_text("\n".join(lines) + "\n")


# --- the services -------------------------------------------------------------------------


def start_one(name: str, cfg: StackConfig) -> Service:
    """Start service `name` of the stack and wait until it is healthy."""
    creds = read_credentials(cfg)
    if name == "nanio":
        service = start_nanio(cfg.state_dir / "nanio", port=cfg.s3_port,
                              access_key=creds["AWS_ACCESS_KEY_ID"],
                              secret_key=creds["AWS_SECRET_ACCESS_KEY"], region=REGION,
                              log_path=cfg.log("nanio"))
        try:
            for bucket in BUCKETS:
                make_bucket(service.url, bucket, creds["AWS_ACCESS_KEY_ID"],
                            creds["AWS_SECRET_ACCESS_KEY"], REGION)
        except Exception as exc:
            service.stop()
            raise ServiceError(f"nanio: cannot create the buckets: {exc}") from exc
        return service
    if name == "mlflow":
        return start_mlflow(cfg.state_dir / "mlflow.db", "s3://mlflow/artifacts", cfg.s3_url,
                            port=cfg.mlflow_port, env=creds, log_path=cfg.log("mlflow"),
                            timeout=180)
    if name == "prefect":
        return start_prefect(cfg.state_dir / "prefect", port=cfg.prefect_port, ui=True,
                             log_path=cfg.log("prefect"), timeout=240)
    if name == "worker":
        health = f"http://{HOST}:{cfg.worker_port}"
        env = {
            **cfg.client_env(),
            "PREFECT_HOME": str(cfg.state_dir / "prefect-client"),
            "PREFECT_WORKER_WEBSERVER_HOST": HOST,
            "PREFECT_WORKER_WEBSERVER_PORT": str(cfg.worker_port),
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "5"),
        }
        cmd = [str(BIN_DIR / "prefect"), "worker", "start", "--pool", cfg.pool, "--type",
               "process", "--name", f"{cfg.pool}-local", "--with-healthcheck"]
        return start_service("worker", cmd, port=cfg.worker_port, url=health,
                             health_url=f"{health}/health", log_path=cfg.log("worker"), env=env,
                             cwd=REPO, timeout=120)
    raise ValueError(f"unknown service {name!r}")


def load_pids(cfg: StackConfig) -> dict[str, dict]:
    try:
        return json.loads(cfg.pids_file.read_text())
    except FileNotFoundError:
        return {}


def save_pids(cfg: StackConfig, pids: dict[str, dict]) -> None:
    cfg.pids_file.write_text(json.dumps(pids, indent=2) + "\n")


def record(service: Service, ok_status: tuple[int, ...] = (200,)) -> dict:
    """What pids.json keeps about a started service."""
    return {"pid": service.pid, "url": service.url, "health": service.health_url,
            "ok": list(ok_status), "log": str(service.log_path),
            "cmd": Path(service.process.args[0]).name}


def is_ours(rec: dict) -> bool:
    """True when the recorded PID still runs the recorded command (not a reused PID)."""
    try:
        cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: trust the record
        return True
    return rec["cmd"].encode() in cmdline


def healthy(rec: dict | None) -> bool:
    return bool(rec) and is_ours(rec) and probe(rec["health"], rec["ok"])


# --- the commands -------------------------------------------------------------------------


def register_deployments(cfg: StackConfig) -> list[str]:
    """Create the process work pool (if missing) and apply `flows.deployments` to it.

    Prefect is imported here, after its settings are in the environment, so the
    registration talks to the stack's server and keeps its client files in the state dir.
    """
    os.environ.update(OFFLINE_ENV)
    os.environ.update(cfg.client_env())
    os.environ["PREFECT_HOME"] = str(cfg.state_dir / "prefect-client")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from flows.deployments import deployments

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(cfg.pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=cfg.pool, type="process",
                                                   base_job_template=template))
    names = []
    for deployment in deployments():
        # Flow runs start in the repo, so steps find its git revision and relative paths.
        deployment.job_variables = {"working_dir": str(REPO), **deployment.job_variables}
        deployment.apply(work_pool_name=cfg.pool)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names


def up(cfg: StackConfig) -> int:
    """Start what is down, register the deployments, print the URLs and the env to source."""
    ensure_credentials(cfg)
    pids = load_pids(cfg)
    print(f"tailwise local stack, state in {cfg.state_dir}")
    for stage in STAGES:
        if "worker" in stage:  # every time, so new entries in flows/deployments.py show up
            print(f"  deployments on work pool {cfg.pool!r}: "
                  f"{', '.join(register_deployments(cfg))}")
        todo = []
        for name in stage:
            rec = pids.get(name)
            if healthy(rec):
                print(f"  {name:8} running  {rec['url']}  (pid {rec['pid']})")
            else:
                if rec and is_ours(rec):  # alive but not answering: restart it
                    stop_pid(rec["pid"])
                todo.append(name)
        if not todo:
            continue
        with ThreadPoolExecutor(len(todo)) as executor:
            started = {name: executor.submit(start_one, name, cfg) for name in todo}
        failed = False
        for name, future in started.items():
            try:
                service = future.result()
            except ServiceError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed = True
                continue
            pids[name] = record(service, (200, 403) if name == "nanio" else (200,))
            save_pids(cfg, pids)
            print(f"  {name:8} started  {service.url}  "
                  f"(pid {service.pid}, {service.startup_s:.1f} s)")
        if failed:
            return 1
    write_env_file(cfg)
    print(f"\nPrefect UI : {cfg.prefect_ui_url}")
    print(f"MLflow UI  : {cfg.mlflow_url}")
    print("Credentials (where each comes from; none is printed):")
    for line in credential_sources(cfg):
        print(f"  {line}")
    print(f"\nTo use it:  source {display(cfg.env_file)}   # sets:")
    for key, value in cfg.public_env().items():
        print(f"  {key}={value}")
    print("  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (from credentials.env)")
    return 0


def down(cfg: StackConfig) -> int:
    """Stop every recorded service by its process group, the worker first."""
    pids = load_pids(cfg)
    for name in reversed(ORDER):
        rec = pids.pop(name, None)
        if rec is None:
            continue
        stopped = is_ours(rec) and stop_pid(rec["pid"])
        print(f"  {name:8} {'stopped' if stopped else 'was not running'}  (pid {rec['pid']})")
    cfg.pids_file.unlink(missing_ok=True)
    return 0


def status(cfg: StackConfig) -> int:
    """Print what runs; exit 0 only when every service is healthy."""
    pids = load_pids(cfg)
    all_up = True
    for name in ORDER:
        rec = pids.get(name)
        if rec is None:
            state, where = "not started", ""
        elif healthy(rec):
            state, where = "running", f"{rec['url']}  (pid {rec['pid']})"
        else:
            state, where = ("unhealthy" if is_ours(rec) else "stopped"), f"(pid {rec['pid']})"
        all_up &= state == "running"
        print(f"  {name:8} {state:11} {where}")
    if all_up:
        print(f"Prefect UI: {cfg.prefect_ui_url}   MLflow UI: {cfg.mlflow_url}   "
              f"env: source {display(cfg.env_file)}")
    return 0 if all_up else 1


def deploy(cfg: StackConfig) -> int:
    """Register the deployments again (after editing flows/deployments.py)."""
    print(f"deployments on work pool {cfg.pool!r}: {', '.join(register_deployments(cfg))}")
    return 0


def credential_sources(cfg: StackConfig) -> list[str]:
    """Who checks what in the local stack, and where each credential lives."""
    return [
        f"S3 (nanio)  : keys generated once into {display(cfg.credentials_file)} (mode 0600)",
        f"MLflow      : no login, listens on {HOST} only",
        f"Prefect     : no login, listens on {HOST} only",
        "(the authenticated setup, with a login for each: infra/README.md)",
    ]


def display(path: Path) -> str:
    """`path` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


COMMANDS: dict[str, Callable[[StackConfig], int]] = {
    "up": up, "down": down, "status": status, "deploy": deploy}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(f"usage: python infra/local/stack.py {{{'|'.join(COMMANDS)}}}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](StackConfig.from_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
