"""Trigger `alpha_prune` from the Prefect UI in headless Chromium, then audit the run.

The stack (nanio S3, MLflow, Prefect server + UI, process worker) comes from
`infra/local/stack.py up` in a temp dir (fixture `stack` in conftest.py). The browser is
Debian's chromium driven by Playwright; browsers are never downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

from tailwise_dev.services import s3_client

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_DEADLINE_S = 180
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = [
    pytest.mark.ui,
    pytest.mark.services,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium (apt-get install "
                              "chromium); Playwright's own browsers are not downloaded"),
]


def wait_for_final_state(api_url: str, flow_run_id: str) -> dict:
    """Poll the Prefect API until the flow run reaches a final state (or fail at the deadline)."""
    deadline = time.monotonic() + RUN_DEADLINE_S
    with httpx.Client(base_url=api_url, timeout=10, trust_env=False) as client:
        while True:
            run = client.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()
            if run["state"]["type"] in FINAL_STATES:
                return run
            assert time.monotonic() < deadline, f"flow run still {run['state']['type']}"
            time.sleep(1)  # poll interval, not a synchronisation


def deployment_runs(api_url: str, name: str) -> set[str]:
    with httpx.Client(base_url=api_url, timeout=10, trust_env=False) as client:
        deployment = client.get(f"/deployments/name/{name}").raise_for_status().json()
        runs = client.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment["id"]]}}}).raise_for_status().json()
    return {run["id"] for run in runs}


DEPLOYMENT = "alpha_prune/alpha_prune"
STEPS = {"build_model", "build_text", "spectral", "allocate", "prune", "evaluate"}
# The server's SQLite waits up to 60 s on a locked table (its busy_timeout), so the UI's
# create request is given longer than that before the test calls it lost.
SUBMIT_TIMEOUT_MS = 150_000


def is_create_flow_run(response) -> bool:
    return (response.request.method == "POST"
            and urlparse(response.url).path.endswith("/create_flow_run"))


class ApiTrace:
    """What the page asked the API and the browser logged, for a failure message."""

    def __init__(self, page) -> None:
        self.responses: list = []
        self.console: list[str] = []
        page.on("response", lambda response: self.responses.append(response))
        page.on("console", lambda msg: msg.type == "error" and self.console.append(msg.text))

    def lines(self) -> list[str]:
        """Failed API calls and parameter validations, then the browser's console errors."""
        told = [r for r in self.responses
                if r.status >= 400 or urlparse(r.url).path.endswith("/schemas/validate")]
        return [*map(describe, told), *(f"console error: {text}" for text in self.console)]


def describe(response) -> str:
    try:
        body = response.text()[:500]
    except Exception as exc:  # the body is gone once the page has moved on
        body = f"(body unavailable: {exc})"
    return f"{response.request.method} {urlparse(response.url).path} -> {response.status}: {body}"


def submit_not_taken(page, trace: ApiTrace, log: Path) -> str:
    """Why a submitted form made no flow run: form errors, toasts, API replies, server log."""
    shown = page.locator(".p-message, .p-toast, [class*=error]").all_inner_texts()
    server_log = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []
    return "\n".join(["the UI sent no create_flow_run after Submit",
                      "shown: " + " | ".join(t.strip() for t in shown if t.strip()),
                      *trace.lines(), f"last lines of {log}:", *server_log])


def trigger_custom_run(page, stack, sparsity: float) -> str:
    """Find the `alpha_prune` deployment, set `sparsity` in the custom-run form, submit it;
    return the id of the run the UI created."""
    trace = ApiTrace(page)
    before = deployment_runs(stack.prefect_api_url, DEPLOYMENT)
    page.goto(f"{stack.prefect_ui_url}/deployments")
    page.locator("a[href^='/deployments/deployment/']", has_text="alpha_prune").first.click()
    page.wait_for_url("**/deployments/deployment/*")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url("**/deployments/deployment/*/run**")
    field = page.locator(".schema-form-property").filter(
        has=page.get_by_text("Sparsity (Optional)", exact=True)).last
    field.locator("input[type=number]").fill(str(sparsity))
    field.locator("input[type=number]").press("Tab")  # commit the value before submitting
    page.wait_for_load_state("networkidle")
    try:
        with page.expect_response(is_create_flow_run, timeout=SUBMIT_TIMEOUT_MS) as created:
            page.get_by_role("button", name="Submit", exact=True).click()
    except PlaywrightTimeout:
        raise AssertionError(submit_not_taken(page, trace, stack.log("prefect"))) from None
    response = created.value
    assert response.ok, f"create_flow_run -> {response.status}: {response.text()}\n" + \
        "\n".join(trace.lines())
    flow_run_id = response.json()["id"]
    assert deployment_runs(stack.prefect_api_url, DEPLOYMENT) - before == {flow_run_id}
    page.goto(f"{stack.prefect_ui_url}/runs/flow-run/{flow_run_id}")
    return flow_run_id


def save_screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if target := os.environ.get("TAILWISE_TEST_ARTIFACTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def flow_manifests(stack, flow_run_id: str) -> list[dict]:
    """The manifests in the stack's bucket made by one flow run."""
    env = stack.client_env()
    s3 = s3_client(env["AWS_ENDPOINT_URL_S3"], env["AWS_ACCESS_KEY_ID"],
                   env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="tailwise", Prefix="store/manifests/")
            .get("Contents", [])]
    manifests = [json.loads(s3.get_object(Bucket="tailwise", Key=k)["Body"].read()) for k in keys]
    return [m for m in manifests if (m.get("produced_by") or {}).get("flow_run_id") == flow_run_id]


def final_evaluation(manifests: list[dict]) -> dict:
    return next(m for m in manifests if m["produced_by"]["step"] == "evaluate"
                and m["produced_by"]["params"]["name"] == "alphapruning")


def lineage(stack, digest: str, fmt: str) -> str:
    """`tailwise lineage DIGEST --format FMT` against the stack's S3 store."""
    done = subprocess.run([sys.executable, "-m", "tailwise_cli", "lineage", digest,
                           "--format", fmt],
                          env=os.environ | stack.client_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_custom_run_from_the_prefect_ui_is_stored_tracked_and_auditable(stack, tmp_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            try:
                flow_run_id = trigger_custom_run(page, stack, sparsity=0.6)
            except Exception:
                save_screenshot(page, tmp_path / "prefect-ui-failed-trigger.png")
                raise
            run = wait_for_final_state(stack.prefect_api_url, flow_run_id)
            page.reload(wait_until="networkidle")
            expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
            save_screenshot(page, tmp_path / "prefect-ui-completed-run.png")
            lineage_page = tmp_path / "lineage.html"
            evaluation = final_evaluation(flow_manifests(stack, flow_run_id))
            lineage_page.write_text(lineage(stack, evaluation["digest"], "html"))
            page.goto(lineage_page.as_uri())
            drawn = {t.strip() for t in page.locator("g.node title").all_text_contents()}
            save_screenshot(page, tmp_path / "lineage.png")
        finally:
            browser.close()
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["params"]["sparsity"] == 0.6

    # The artifacts: manifests in the stack's bucket, made by this flow run.
    ours = flow_manifests(stack, flow_run_id)
    assert {m["produced_by"]["step"] for m in ours} == STEPS

    # The MLflow runs: a parent for the flow run, a child per step.
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(stack.mlflow_url)
    experiment = mlflow.get_experiment_by_name("tailwise").experiment_id
    [parent] = mlflow.search_runs(
        [experiment], f"tags.`tailwise.flow_run_id` = '{flow_run_id}'")
    children = mlflow.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == STEPS
    assert all(c.info.status == "FINISHED" for c in [parent, *children])
    assert {c.data.params.get("options.sparsity") for c in children
            if c.info.run_name == "allocate"} == {"0.6"}

    # The lineage, from the S3 store, shows every step and the changed parameter; the HTML
    # page a person opens draws a node per artifact and step of it.
    graph = json.loads(lineage(stack, evaluation["digest"], "json"))
    steps = {s["step"]: s for s in graph["steps"]}
    assert drawn == {a["digest"] for a in graph["artifacts"]} | {s["id"] for s in graph["steps"]}
    assert set(steps) == STEPS
    assert steps["allocate"]["params"]["options"] == {"sparsity": 0.6, "epsilon": 0.3}
    assert steps["prune"]["flow_run_id"] == flow_run_id
    model_digest = next(m["digest"] for m in ours if m["produced_by"]["step"] == "build_model")
    assert steps["spectral"]["inputs"] == {"model": model_digest}
    assert steps["prune"]["inputs"]["model"] == model_digest


def test_second_up_is_harmless(stack, stack_env):
    """`up` on a running stack starts nothing and keeps every PID."""
    before = json.loads(stack.pids_file.read_text())
    again = subprocess.run([sys.executable, "infra/local/stack.py", "up"], cwd=REPO,
                           env=os.environ | stack_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "started" not in again.stdout and again.stdout.count(" running ") == 4
    assert json.loads(stack.pids_file.read_text()) == before
