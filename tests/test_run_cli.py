"""`tailwise run FLOW`: every flow from the command line, its params validated first."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.registry import FLOWS, lookup
from steps.core.errors import ParamsError
from steps.core.factory import build_model, save_hf
from steps.core.store import open_store
from steps.diagnose.regimes import REGIMES
from tailwise_cli import app
from tailwise_cli.run import assignments, merge, read_params_file

TAILWISE = [sys.executable, "-m", "tailwise_cli"]
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    done = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert done.exit_code == 0, (done.output, done.exception)
    return done.output


def settings(tmp_path: Path, tracking: bool = False) -> list[str]:
    """--param items putting the run's store (and MLflow database) under tmp_path."""
    items = ["-p", f"settings.store={tmp_path / 'store'}"]
    if tracking:
        return items + ["-p", f"settings.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return items + ["-p", "settings.tracking=false"]


def table_rows(output: str, first: str) -> list[list[str]]:
    """The cells of the rich table rows whose first cell is `first`."""
    rows = [[c.strip() for c in line.strip("│┃ ").split("│")] for line in output.splitlines()
            if line.startswith("│")]
    return [row for row in rows if row[0] == first]


def test_list_names_every_flow_with_its_params_defaults_and_descriptions():
    listed = invoke("run", "--list")
    assert invoke("flows") == listed
    for name, entry in FLOWS.items():
        assert f"{name}: {entry.description[:40]}" in listed
        for param in entry.params.model_fields:
            assert re.search(rf"^\s+{param}\s", listed, re.M), (name, param)
    assert re.search(r"^\s+sparsity\s+float\s+0\.7\s+Global target sparsity\.", listed, re.M)
    assert re.search(r"^\s+method\s+magnitude\|wanda\|sparsegpt\s+'wanda'", listed, re.M)
    assert re.search(r"^\s+models\s+list\[str\]\s+\(required\)", listed, re.M)
    assert re.search(r"^\s+executor\s+sequential\|threads\|dask\s+'sequential'", listed, re.M)


def test_params_nest_merge_and_convert_to_the_flows_types(tmp_path):
    given = tmp_path / "params.yaml"
    given.write_text("sparsity: 0.5\nmethod: magnitude\nsettings: {executor: threads}\n")
    values = merge(read_params_file(given), assignments(["sparsity=0.6", "eval_windows=null",
                                        "settings.workers=3", "model=0123abcd"]))
    params, run_settings = lookup("alpha_prune").validate(values)
    assert (params.sparsity, params.method, params.eval_windows, params.model) == \
        (0.6, "magnitude", None, "0123abcd")  # a digest prefix stays text
    assert (run_settings.executor, run_settings.workers) == ("threads", 3)
    (tmp_path / "p.json").write_text(json.dumps({"sparsities": [0.5, 0.8]}))
    sweep, _ = lookup("prune_sweep").validate(read_params_file(tmp_path / "p.json"))
    assert sweep.sparsities == [0.5, 0.8]
    sweep, _ = lookup("prune_sweep").validate(assignments(["methods=[wanda, sparsegpt]"]))
    assert sweep.methods == ["wanda", "sparsegpt"]


@pytest.mark.parametrize(("flow", "items", "message"), [
    ("alpha_prnue", [], "unknown flow 'alpha_prnue' (did you mean alpha_prune?)"),
    ("alpha_prune", ["sparsty=0.5"], "unknown param sparsty (did you mean sparsity?)"),
    ("alpha_prune", ["settings.executr=dask"],
     "unknown param settings.executr (did you mean settings.executor?)"),
    ("alpha_prune", ["sparsity=lots"], "invalid param sparsity='lots': Input should be a "
     "valid number"),
    ("alpha_prune", ["sparsity=1.5"], "invalid param sparsity='1.5': Input should be less "
     "than 1"),
    ("alpha_prune", ["settings.executor=gpu"], "invalid param settings.executor='gpu'"),
    ("alpha_prune", ["settings.dask_address=tcp://h:1"], "executor is 'sequential'"),
    ("prunability", ["densities=[0, 0.5]"], "densities [0.0] are outside (0, 1]"),
    ("spectral_audit", [], "invalid param models"),
    ("alpha_prune", ["sparsity"], "--param 'sparsity': expected KEY=VALUE"),
    ("alpha_prune", ["sparsities=[0.5,"], "--param sparsities: '[0.5,' is not a YAML/JSON"),
    ("alpha_prune", ["settings=x"], "settings must be a mapping"),
])
def test_bad_params_name_the_param(flow, items, message):
    with pytest.raises(ParamsError) as error:
        lookup(flow).validate(assignments(items))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_params_file_must_be_a_yaml_or_json_mapping(tmp_path):
    cases = {"bad.yaml": "sparsity: [0.5\n", "list.json": "[1, 2]", "bin.yaml": b"\xff\xfe\x00"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ParamsError, match=rf"--params {re.escape(str(path))}: "):
            read_params_file(path)
    with pytest.raises(ParamsError, match="no such file"):
        read_params_file(tmp_path / "nope.yaml")


def test_cli_refuses_bad_input_in_one_line_with_exit_2_and_starts_nothing(tmp_path):
    (tmp_path / "p.txt").write_text("{not: yaml: at all")
    env = os.environ | {"TAILWISE_STORE": str(tmp_path / "store"), "PYTHONPATH": str(ROOT),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([*TAILWISE, "run", "alpha_prune", "--params", str(tmp_path / "p.txt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: --params {tmp_path / 'p.txt'}: not a YAML or JSON file")
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def test_alpha_prune_prints_its_table_mlflow_run_and_lineage(tmp_path, prefect_api):
    tiny = ["-p", "model=tiny-llama", "-p", "sparsity=0.5", "-p", "nsamples=2", "-p",
            "seqlen=64", "-p", "text_chars=20000", "-p", "eval_windows=2"]
    output = invoke("run", "alpha_prune", *tiny, *settings(tmp_path, tracking=True))
    assert [table_rows(output, name)[0][0] for name in ("dense", "uniform", "alphapruning")]
    perplexity = {name: float(table_rows(output, name)[0][1])
                  for name in ("dense", "uniform", "alphapruning")}
    assert all(value > 1 for value in perplexity.values())
    assert re.search(r"MLflow\s+: parent run [0-9a-f]{32} in sqlite:///", output)
    audit = re.search(r"audit it\s+: tailwise lineage ([0-9a-f]{12})", output).group(1)
    assert audit in table_rows(output, "alphapruning")[0]  # the evaluation's digest
    entries = open_store(str(tmp_path / "store")).cache_entries()
    again = invoke("demo", *tiny, *settings(tmp_path))  # the demo is the same flow
    assert "Quick setting for a 2-core CPU: calibration 2 x 64 tokens" in again
    assert {n: float(table_rows(again, n)[0][1]) for n in perplexity} == perplexity
    assert open_store(str(tmp_path / "store")).cache_entries() == entries  # all reused


def test_spectral_audit_and_the_tiny_demo(tmp_path, prefect_api):
    checkpoints = [str(save_hf(build_model("tiny-gpt2", seed=seed), None, tmp_path / f"c{seed}"))
                   for seed in (0, 1)]
    output = invoke("run", "spectral_audit", "-p", f"models=[{', '.join(checkpoints)}]",
                    "-p", "name=nightly", *settings(tmp_path))
    metrics = re.search(r"metrics: \['([0-9a-f]{64})', '([0-9a-f]{64})'\]", output)
    drift = re.search(r"drifts: \['([0-9a-f]{64})'\]", output).group(1)
    assert metrics and f"tailwise lineage {drift[:12]}" in output
    assert open_store(str(tmp_path / "store")).get_ref("audit/nightly") == metrics.group(2)

    demo = invoke("run", "demo", "-p", "model=mlp", *settings(tmp_path))
    digests = dict(re.findall(r"(\w+\.\w+): ([0-9a-f]{64})  \(computed\)", demo))
    assert {"build_model.model", "spectral.metrics"} <= set(digests)
    audit = re.search(r"audit it\s+: tailwise lineage ([0-9a-f]{12})", demo).group(1)
    assert audit in {digest[:12] for name, digest in digests.items() if name.startswith("spec")}


def test_tempbalance_finetune(tmp_path, prefect_api):
    output = invoke("run", "tempbalance_finetune", "-p", "model=tiny-llama",
                    "-p", "max_train_examples=16", "-p", "max_eval_examples=8", "-p", "epochs=1",
                    "-p", "batch_size=8", "-p", "max_length=16", *settings(tmp_path))
    for method in ("plain", "tempbalance"):
        (row,) = table_rows(output, method)
        assert 0 <= float(row[1]) <= 1 and row[4] == "16"  # test accuracy, train examples
    assert re.search(r"audit it\s+: tailwise lineage [0-9a-f]{12}", output)


def test_prunability_and_ctrl_c_resumes_from_the_finished_steps(tmp_path, prefect_server):
    """SIGINT once the first step has finished: exit 130, a resume line, nothing partial in
    the store; the resume command reuses the finished steps and completes the grid."""
    env = os.environ | {"PREFECT_API_URL": prefect_server, "PYTHONPATH": str(ROOT)}
    command = [*TAILWISE, "run", "prunability", "-p", "width=16", "-p", "knob=batch_size",
               "-p", "knob_values=[16]", "-p", "densities=[0.5]", "-p", "seeds=[0, 1]",
               "-p", "epochs=1", "-p", "retrain_epochs=1", "-p", "line_points=3",
               *settings(tmp_path)]
    manifests = tmp_path / "store" / "manifests"
    # A shell's background job inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as a terminal would.
    with subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
                          ) as running:
        for line in running.stderr:  # Prefect logs each finished step on stderr
            if "step build_model: computed" in line:
                break
        running.send_signal(signal.SIGINT)
        stdout, stderr = running.communicate(timeout=300)
    assert running.returncode == 130, stderr[-2000:]
    resume = re.search(r"Resume with: (tailwise run prunability .*) \(every", stderr).group(1)
    store = open_store(str(tmp_path / "store"))
    finished = store.cache_entries()
    assert finished and not list((tmp_path / "store").rglob(".partial-*"))
    for _, entry in finished:  # every cached output is a whole artifact
        for digest in entry["outputs"].values():
            assert (manifests / f"{digest}.json").is_file()
    again = subprocess.run([*TAILWISE, *shlex.split(resume)[1:]], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step build_model: cached" in again.stderr
    (cell,) = table_rows(again.stdout, "digits")  # the one cell, classified
    assert cell[1:4] == ["batch_size", "16", "0.5"]
    assert len(set(cell) & set(REGIMES)) == 1, cell  # classified into one regime
    assert re.search(r"audit it\s+: tailwise lineage [0-9a-f]{12}", again.stdout)


def test_deployment_submits_a_run_of_the_served_deployment(prefect_api):
    from prefect import get_client

    failed = CliRunner().invoke(app, ["run", "alpha_prune", "--deployment"])
    assert "no deployment alpha_prune/alpha_prune" in str(failed.exception)
    deployment_id = FLOWS["alpha_prune"].flow.to_deployment(name="alpha_prune").apply()
    output = invoke("run", "alpha_prune", "--deployment", "-p", "sparsity=0.6",
                    "-p", "settings.executor=threads")
    flow_run_id = re.search(r"submitted alpha_prune/alpha_prune: flow run \S+ \((\S+)\)",
                            output).group(1)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
    assert flow_run.deployment_id == deployment_id
    assert flow_run.parameters["params"]["sparsity"] == 0.6
    assert flow_run.parameters["settings"]["executor"] == "threads"
