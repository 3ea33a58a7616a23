"""`tailwise allocate | prune | evaluate` from the command line, and their bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_workspace import tiny_llama_workspace


def tailwise(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tailwise_cli", *args], capture_output=True,
                          text=True, timeout=600, env=os.environ | env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_llama_workspace(tmp_path_factory.mktemp("cli-prune"))


def test_spectral_allocate_prune_evaluate(setup):
    root, model, text, env = setup
    done = tailwise("spectral", str(model), "--estimator", "alpha_peak", "--output",
                    str(root / "metrics.parquet"), env=env)
    assert done.returncode == 0, done.stderr
    done = tailwise("allocate", str(root / "metrics.parquet"), "--policy", "alphapruning",
                    "--sparsity", "0.5", "--epsilon", "0.2", "--output",
                    str(root / "decisions.parquet"), env=env)
    assert done.returncode == 0, done.stderr
    decisions = pq.read_table(root / "decisions.parquet")
    assert {"name", "sparsity"} <= set(decisions.column_names)
    done = tailwise("prune", str(model), "--method", "wanda", "--allocation",
                    str(root / "decisions.parquet"), "--calibration", str(text), "--nsamples",
                    "2", "--seqlen", "64", "--batch-tokens", "128", "--output",
                    str(root / "pruned"), env=env)
    assert done.returncode == 0, done.stderr
    done = tailwise("prune", str(model), "--method", "wanda", "--allocation",
                    str(root / "decisions.parquet"), "--calibration", str(text), "--nsamples",
                    "2", "--seqlen", "64", "--compressed", "--output", str(root / "packed"),
                    env=env)
    assert done.returncode == 0, done.stderr
    report = pq.read_table(root / "pruned" / "sparsity_report.parquet")
    targets = dict(zip(decisions["name"].to_pylist(), decisions["sparsity"].to_pylist(),
                       strict=True))
    for name, achieved in zip(report["name"].to_pylist(), report["achieved"].to_pylist(),
                              strict=True):
        assert abs(achieved - targets[name]) < 0.01, name
    evaluations = {}
    for name in ("pruned", "packed"):
        done = tailwise("evaluate", str(root / name), "--perplexity", str(text), "--seqlen",
                        "64", "--max-windows", "4", env=env)
        assert done.returncode == 0, done.stderr
        evaluations[name] = done.stdout
    assert "perplexity" in done.stdout and "sparsity" in done.stdout
    # The compressed copy evaluates the same; its size on disk is smaller.
    metrics = {name: dict(re.findall(r"(\w+)\s*[:=]\s*([\d.e+-]+)\s*$", out, re.MULTILINE))
               for name, out in evaluations.items()}
    assert metrics["pruned"]["perplexity"] == metrics["packed"]["perplexity"]
    assert metrics["pruned"]["sparsity"] == metrics["packed"]["sparsity"]
    assert int(metrics["packed"]["size_bytes"]) < int(metrics["pruned"]["size_bytes"])


def assert_clean_failure(done: subprocess.CompletedProcess, phrase: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, done.stderr


def test_prune_bad_input(setup):
    root, model, text, env = setup
    assert_clean_failure(tailwise("prune", str(model), "--sparsity", "1.2", env=env),
                         "invalid parameter sparsity")
    assert_clean_failure(tailwise("prune", str(model), "--method", "magnitude", "--nm", "4:2",
                                  env=env), "4:2")
    assert_clean_failure(tailwise("prune", str(model), "--sparsity", "0.5", "--batch-tokens",
                                  "0", env=env), "invalid parameter batch_tokens")
    alien = root / "alien.parquet"
    pq.write_table(pa.table({"name": ["model.layers.0.nope"], "sparsity": [0.5]}), alien)
    assert_clean_failure(tailwise("prune", str(model), "--method", "magnitude", "--allocation",
                                  str(alien), env=env), "model.layers.0.nope")
    short = root / "short.txt"
    short.write_text("too short")
    assert_clean_failure(tailwise("prune", str(model), "--sparsity", "0.5", "--calibration",
                                  str(short), "--seqlen", "64", "--nsamples", "2", env=env),
                         "fewer than one sequence")
    before = {p.name for p in (root / "store" / "manifests").iterdir()}
    assert not any(m.startswith(".partial") for m in before)


def test_prune_a_plain_model_by_global_magnitude(setup):
    root, _, _, env = setup
    done = tailwise("model", "mlp", "--output", str(root / "mlp"), env=env)
    assert done.returncode == 0, done.stderr
    done = tailwise("prune", str(root / "mlp"), "--method", "magnitude", "--sparsity", "0.9",
                    "--output", str(root / "mlp-pruned"), env=env)
    assert done.returncode == 0, done.stderr
    report = pq.read_table(root / "mlp-pruned" / "sparsity_report.parquet").to_pylist()
    zeros = sum(row["achieved"] * row["params"] for row in report)
    assert round(zeros) == round(0.9 * sum(row["params"] for row in report))
    done = tailwise("prune", str(root / "mlp"), "--method", "wanda", "--sparsity", "0.5",
                    "--output", str(root / "mlp-wanda"), env=env)
    assert_clean_failure(done, "wanda")
    assert not (root / "mlp-wanda").exists()
