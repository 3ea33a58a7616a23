"""Faults over a whole alpha_prune flow on the local stack; after each, the flow converges.

The stack is private to this module (a nanio S3 server with its data on disk, an MLflow
server, a Prefect server, all on 127.0.0.1), so stopping a server disturbs no other test.
The flow runs in its own process with the `process` runner, so every step is a
`python -m steps.<name>` child the test can see and kill. A seeded plan of faults is played
against it:

- kill -9 of a step process at a random moment of its life (Prefect retries the step);
- kill -9 of the whole flow process group (the test starts the flow again);
- kill -9 and restart of the S3 server as a prune step uploads its model, of the MLflow
  server and of the Prefect server while a step runs.

After every fault the store must hold no manifest whose content is incomplete and no cache
entry that names a missing artifact; and the flow, run again until it completes, must end
with exactly the artifacts (digests) of an undisturbed run. A pass whose flow completed
with faults still planned starts over in a fresh store prefix.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
import pytest
import yaml

from steps.core.jobs import load_steps
from steps.core.store import ArtifactStore, open_store
from tailwise_dev.services import (
    S3Info,
    Service,
    make_bucket,
    start_mlflow,
    start_nanio,
    start_prefect,
)

REPO = Path(__file__).resolve().parents[2]
FLOW_PROCESS = Path(__file__).with_name("flow_process.py")
SEED = 20261202
STEP_KILLS, FLOW_KILLS = 20, 4
KEYS = ("tailwise", "tailwise-faults-secret")
PARAMS = {"model": "tiny-llama", "method": "wanda", "sparsity": 0.5, "nsamples": 2,
          "seqlen": 32, "text_chars": 20_000, "eval_windows": 2}
MAX_LAUNCHES = 40  # flow starts over the whole plan; far more than the plan needs

FaultKind = Literal["kill_step", "kill_flow", "restart_s3", "restart_mlflow",
                    "restart_prefect"]


@dataclass(frozen=True)
class Fault:
    """Strike the `skip`+1-th step process to start (of `step`, when given) from now, once it
    has lived `delay` s (restart_s3: once it has written a new object to the server)."""

    kind: FaultKind
    delay: float = 0.0
    skip: int = 0
    step: str | None = None


def fault_plan(seed: int) -> list[Fault]:
    """Step and flow kills at seeded moments (one in every kind of step), then one restart
    of each server."""
    rng = random.Random(seed)
    kills = [Fault("kill_step", delay=rng.uniform(0.2, 3.0), skip=rng.choice([0, 1]))
             for _ in range(STEP_KILLS)]
    for _ in range(FLOW_KILLS):
        kills.insert(rng.randrange(len(kills) + 1),
                     Fault("kill_flow", delay=rng.uniform(0.2, 3.0), skip=1))
    # The model is built once per pass, first: aim one kill at it for sure.
    first = Fault("kill_step", delay=rng.uniform(0.5, 2.0), step="build_model")
    return [first] + kills + [Fault("restart_s3", step="prune"),
                    Fault("restart_mlflow", delay=1.0, step="spectral"),
                    Fault("restart_prefect", delay=1.0, step="evaluate")]


# ------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    """The module's servers, each restartable on its own port with its own data."""

    root: Path
    nanio: Service
    mlflow: Service
    prefect: Service
    bucket: S3Info

    @classmethod
    def start(cls, root: Path) -> Stack:
        nanio = start_nanio(root / "s3", access_key=KEYS[0], secret_key=KEYS[1])
        bucket = make_bucket(nanio.url, "faults", *KEYS)
        return cls(root, nanio, cls._mlflow(root), cls._prefect(root), bucket)

    @staticmethod
    def _mlflow(root: Path, port: int | None = None) -> Service:
        artifacts = root / "mlflow-artifacts"
        artifacts.mkdir(exist_ok=True)
        return start_mlflow(root / "mlflow.db", str(artifacts), "", port=port)

    @staticmethod
    def _prefect(root: Path, port: int | None = None) -> Service:
        return start_prefect(root / "prefect-home", port=port, ui=False)

    def kill_and_restart(self, name: str) -> None:
        """kill -9 the server's process group, then start it again on the same port."""
        name = {"s3": "nanio"}.get(name, name)
        service = getattr(self, name)
        service.kill()
        if name == "nanio":
            self.nanio = start_nanio(self.root / "s3", port=service.port, access_key=KEYS[0],
                                     secret_key=KEYS[1])
        elif name == "mlflow":
            self.mlflow = self._mlflow(self.root, service.port)
        else:
            self.prefect = self._prefect(self.root, service.port)

    def s3_objects(self) -> int:
        """How many files the S3 server holds (grows as an upload lands)."""
        return sum(len(files) for _, _, files in os.walk(self.root / "s3"))

    def stop(self) -> None:
        for service in (self.prefect, self.mlflow, self.nanio):
            service.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    the_stack = Stack.start(tmp_path_factory.mktemp("fault-stack"))
    with pytest.MonkeyPatch.context() as env:  # this process reads the store too
        for key, value in the_stack.bucket.env().items():
            env.setenv(key, value)
        yield the_stack
    the_stack.stop()


# ----------------------------------------------------------------------------- invariants


@dataclass
class StoreAudit:
    """Checks that what the store shows is whole; remembers what it already verified."""

    store: ArtifactStore
    scratch: Path
    verified: set[str] = field(default_factory=set)

    def check(self) -> None:
        for manifest in self.store.list():
            if manifest.digest not in self.verified:
                # get() re-hashes every byte against the manifest: incomplete content fails.
                self.store.get(manifest.digest, self.scratch / manifest.digest)
                self.verified.add(manifest.digest)
        for key, entry in self.store.cache_entries():
            for output, digest in entry["outputs"].items():
                assert self.store.exists(digest), \
                    f"cache entry {key} names {output}={digest}, which the store lacks"

    def digests(self) -> set[str]:
        return {manifest.digest for manifest in self.store.list()}


# -------------------------------------------------------------------------- the flow


def step_of(process: psutil.Process) -> str | None:
    """The step a `python -m steps.<name>` process runs (None for anything else)."""
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return None
    for arg in cmdline:
        if arg.startswith("steps.") and "-m" in cmdline:
            return arg.removeprefix("steps.")
    return None


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def step_processes(flow: psutil.Process) -> list[tuple[psutil.Process, str]]:
    try:
        children = flow.children(recursive=True)
    except psutil.Error:
        return []
    named = ((child, step_of(child)) for child in children)
    return [(child, name) for child, name in named if name]


@dataclass
class FlowLauncher:
    """Starts the flow process on one store prefix, with the stack's addresses."""

    stack: Stack
    work: Path
    runner: str = "process"
    launches: int = 0

    def spec(self, prefix: str) -> Path:
        path = self.work / f"{prefix}.json"
        # Two steps at once (the flow's independent branches): more step processes to strike
        # per flow run, and a shorter test.
        path.write_text(json.dumps({"params": PARAMS, "settings": {
            "store": f"s3://{self.stack.bucket.bucket}/{prefix}", "runner": self.runner,
            "executor": "threads", "workers": 2, "tracking_uri": self.stack.mlflow.url}}))
        return path

    def start(self, prefix: str) -> tuple[subprocess.Popen, Path]:
        self.launches += 1
        assert self.launches <= MAX_LAUNCHES, "the flow kept failing; see the flow logs"
        rows = self.work / f"{prefix}-rows.json"
        rows.unlink(missing_ok=True)
        env = os.environ | self.stack.bucket.env() | {
            "PREFECT_API_URL": self.stack.prefect.url,
            "TAILWISE_STEPS_FILE": str(quick_retries(self.work))}
        log = open(self.work / f"flow-{self.launches}.log", "wb")
        process = subprocess.Popen([sys.executable, str(FLOW_PROCESS), str(self.spec(prefix)),
                                    str(rows)], cwd=REPO, env=env, start_new_session=True,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        return process, rows


def quick_retries(work: Path) -> Path:
    """containers/steps.yaml with 3 retries 0.2 s apart for every step (the test's patience)."""
    path = work / "steps.yaml"
    if not path.exists():
        steps = load_steps()
        steps["retries"] = {"retries": 3, "delay_s": [0.2]}
        for spec in steps["steps"].values():
            spec.pop("retries", None)
            spec.pop("delay_s", None)
        path.write_text(yaml.safe_dump(steps))
    return path


# ------------------------------------------------------------------------- injection


@dataclass
class Injector:
    """Plays the fault plan against flow processes as their steps start."""

    stack: Stack
    pending: deque[Fault]
    struck: list[tuple[Fault, str]] = field(default_factory=list)
    missed: int = 0

    def watch(self, flow: subprocess.Popen, audit: StoreAudit) -> int:
        """Until the flow process exits: strike each planned fault at its moment."""
        try:
            return self._watch(flow, audit)
        finally:  # a failing check must not leave the flow running
            if flow.poll() is None:
                os.killpg(flow.pid, signal.SIGKILL)
                flow.wait()

    def _watch(self, flow: subprocess.Popen, audit: StoreAudit) -> int:
        watched = psutil.Process(flow.pid)
        seen: set[int] = set()
        skip_left = self.pending[0].skip if self.pending else 0
        target: tuple[psutil.Process, str, float, int] | None = None
        while flow.poll() is None:
            for process, step in step_processes(watched):
                if process.pid in seen:
                    continue
                seen.add(process.pid)
                fault = self.pending[0] if self.pending else None
                if target or not fault or (fault.step and fault.step != step):
                    continue
                if skip_left:
                    skip_left -= 1
                    continue
                target = (process, step, time.monotonic(), self.stack.s3_objects())
            if target and self.due(target):
                process, step = target[:2]
                target = None
                if alive(process):
                    self.strike(self.pending.popleft(), step, process, flow)
                    audit.check()
                    skip_left = self.pending[0].skip if self.pending else 0
                else:
                    self.missed += 1  # it finished first: aim at the next process instead
                    skip_left = 0
            time.sleep(0.02)  # polling interval of the watcher, not a synchronisation
        return flow.wait()

    def due(self, target: tuple[psutil.Process, str, float, int]) -> bool:
        process, _, started, objects_then = target
        fault = self.pending[0]
        if not alive(process):
            return True
        if fault.kind == "restart_s3":
            return self.stack.s3_objects() > objects_then
        return time.monotonic() - started >= fault.delay

    def strike(self, fault: Fault, step: str, process: psutil.Process,
               flow: subprocess.Popen) -> None:
        if fault.kind == "kill_step":
            process.send_signal(signal.SIGKILL)
        elif fault.kind == "kill_flow":
            os.killpg(flow.pid, signal.SIGKILL)
            flow.wait()
        else:
            self.stack.kill_and_restart(fault.kind.removeprefix("restart_"))
        self.struck.append((fault, step))


# ------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def undisturbed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, set]:
    """The flow's rows and artifact digests without faults (same stack, own prefix). Steps
    run in the flow's process: every runner gives the same digests (tests/test_runners.py)."""
    work = tmp_path_factory.mktemp("undisturbed")
    launcher = FlowLauncher(stack, work, runner="inline")
    flow, rows = launcher.start("undisturbed")
    assert flow.wait() == 0, (work / "flow-1.log").read_text()[-3000:]
    store = open_store(f"s3://{stack.bucket.bucket}/undisturbed")
    return json.loads(rows.read_text()), StoreAudit(store, work).digests()


@pytest.mark.timeout(1800)
def test_alpha_prune_survives_kills_and_server_restarts(stack, undisturbed, tmp_path, capsys):
    reference_rows, reference_digests = undisturbed
    launcher = FlowLauncher(stack, tmp_path)
    injector = Injector(stack, deque(fault_plan(SEED)))
    passes = 0
    while injector.pending:
        passes += 1
        prefix = f"pass-{passes}"
        audit = StoreAudit(open_store(f"s3://{stack.bucket.bucket}/{prefix}"),
                           tmp_path / prefix)
        while True:  # run the flow again until it completes: it must converge
            flow, rows = launcher.start(prefix)
            code = injector.watch(flow, audit)
            audit.check()
            if code == 0:
                break
        outcome = json.loads(rows.read_text())
        assert outcome == reference_rows, f"{prefix}: other results than undisturbed"
        assert audit.digests() == reference_digests, f"{prefix}: other artifacts than undisturbed"

    kinds = Counter(fault.kind for fault, _ in injector.struck)
    killed_steps = Counter(step for fault, step in injector.struck if fault.kind == "kill_step")
    with capsys.disabled():
        print(f"\nfaults tried {len(injector.struck)}, survived {len(injector.struck)} "
              f"({dict(kinds)}; step kills by step {dict(killed_steps)}; {injector.missed} "
              f"aimed at processes that finished first; {launcher.launches} flow starts over "
              f"{passes} passes)")
    assert kinds["kill_step"] + kinds["kill_flow"] >= 20
    assert {"restart_s3", "restart_mlflow", "restart_prefect"} <= set(kinds)
    assert set(killed_steps) >= {"build_model", "build_text", "spectral", "allocate", "prune",
                                 "evaluate"}
