"""The defects a new user hit on the CLI chain (spectral -> allocate -> prune -> evaluate).

Each test runs the `tailwise` command as a user would (its entry point, in this process: a
fresh interpreter per command would spend most of the test importing torch), on a tiny
seeded LLaMA with the byte tokenizer, and checks the answer the user gets: exit code,
one-line errors, what is stored.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_workspace import tiny_llama_workspace

from steps.core.factory import build_model, save_hf
from steps.core.registry import load_step
from steps.core.step import cache_key
from tailwise_cli import main


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def tailwise(*args: str, env: dict) -> Done:
    """`tailwise ARGS` with the env vars set: exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setattr(sys, "argv", ["tailwise", *args])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        except Exception:  # what an uncaught error does to the real command: exit 1
            traceback.print_exc()
            code = 1
    return Done(code, out.getvalue(), err.getvalue())


def assert_one_line_error(done: Done, *phrases: str) -> str:
    """Exit 2, no traceback, and one `error:` line (the last) containing every phrase."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.stderr.strip().endswith(errors[0]), done.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return tiny_llama_workspace(tmp_path_factory.mktemp("cli-chain"))


def manifest_of(root, digest: str) -> dict:
    return json.loads((root / "store" / "manifests" / f"{digest}.json").read_text())


def output_digest(stdout: str, name: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith(name))


# ------------------------------------------------------------------- tokenizer


def test_a_magnitude_pruned_model_carries_its_tokenizer(chain):
    root, model, text, env = chain
    done = tailwise("prune", str(model), "--method", "magnitude", "--sparsity", "0.5",
                    "--output", str(root / "magnitude"), env=env)
    assert done.returncode == 0, done.stderr
    assert (root / "magnitude" / "tokenizer.json").is_file()
    done = tailwise("evaluate", str(root / "magnitude"), "--perplexity", str(text),
                    "--seqlen", "64", "--max-windows", "2", env=env)
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout


def test_evaluating_perplexity_without_a_tokenizer_is_a_one_line_error(chain):
    root, _, text, env = chain
    bare = save_hf(build_model("tiny-llama", seed=1), None, root / "no-tokenizer")
    done = tailwise("evaluate", str(bare), "--perplexity", str(text), env=env)
    assert_one_line_error(done, "tokenizer", "no-tokenizer")


# ------------------------------------------------------------ conflicting options


def test_sparsity_and_allocation_together_are_refused(chain):
    root, model, _, env = chain
    decisions = root / "decisions.parquet"
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    pq.write_table(pa.table({"name": names, "sparsity": [0.7] * len(names)}), decisions)
    done = tailwise("prune", str(model), "--method", "magnitude", "--sparsity", "0.5",
                    "--allocation", str(decisions), "--output", str(root / "both"), env=env)
    assert_one_line_error(done, "sparsity", "allocation")
    assert not (root / "both").exists()


def test_a_prune_manifest_records_the_params_that_took_effect(chain):
    root, model, _, env = chain
    done = tailwise("prune", str(model), "--method", "magnitude", "--sparsity", "0.25", env=env)
    assert done.returncode == 0, done.stderr
    params = manifest_of(root, output_digest(done.stdout, "prune.model"))["produced_by"]["params"]
    # Magnitude pruning reads no calibration text: no calibration params are claimed.
    assert params["sparsity"] == 0.25 and params["method"] == "magnitude"
    assert params["nsamples"] is None and params["seqlen"] is None


def test_checks_that_need_no_model_come_first(chain):
    root, model, _, env = chain
    fresh = env | {"TAILWISE_STORE": str(root / "fresh-store")}
    assert_one_line_error(tailwise("prune", str(model), "--method", "magnitude", "--nm", "2-4",
                                   env=fresh), "2-4", "N:M")
    assert_one_line_error(tailwise("prune", str(model), "--method", "wanda", "--sparsity",
                                   "0.5", env=fresh), "wanda", "calibration")
    # Refused before the model was read and stored (a real model takes a while to hash).
    assert not (root / "fresh-store" / "manifests").exists()


# ------------------------------------------------------------------ built-in corpora


def test_built_in_corpora_by_name_are_the_build_text_artifacts_flows_make(chain):
    root, model, _, env = chain
    done = tailwise("--quiet", "prune", str(model), "--sparsity", "0.5", "--calibration",
                    "kjv:validation", "--nsamples", "2", "--seqlen", "64", env=env)
    assert done.returncode == 0, done.stderr
    produced = manifest_of(root, output_digest(done.stdout, "prune.model"))["produced_by"]
    text = manifest_of(root, produced["inputs"]["calibration"])
    assert text["kind"] == "text"
    assert text["produced_by"]["step"] == "build_text"
    assert text["produced_by"]["params"] == {"corpus": "kjv", "split": "validation",
                                             "max_chars": None}
    # The same params a flow gives the step (flows/alpha_prune.py): one cache entry, one text.
    step = load_step("build_text")
    key = cache_key(step, step.validate({"split": "validation", "max_chars": None}), {})
    assert text["produced_by"]["cache_key"] == key
    done = tailwise("--quiet", "evaluate", str(model), "--perplexity", "fortunes", "--seqlen",
                    "64", "--max-windows", "2", env=env)
    assert done.returncode == 0, done.stderr
    fortunes = output_digest(done.stdout, "build_text.text")
    assert manifest_of(root, fortunes)["produced_by"]["params"]["corpus"] == "fortunes"
    assert manifest_of(root, fortunes)["produced_by"]["params"]["split"] == "test"
    done = tailwise("prune", str(model), "--sparsity", "0.5", "--calibration", "kjv:genesis",
                    env=env)
    assert_one_line_error(done, "kjv:genesis", "kjv:train")


# ----------------------------------------------------------------------- progress


def test_long_steps_show_progress_on_stderr_unless_quiet(chain):
    root, model, text, env = chain
    evaluate = ("evaluate", str(model), "--perplexity", str(text), "--seqlen", "32",
                "--max-windows", "3")
    done = tailwise(*evaluate, env=env)
    assert done.returncode == 0, done.stderr
    assert "perplexity: 3 windows of 32" in done.stderr and "3/3" in done.stderr
    assert "windows" not in done.stdout
    prune = ("prune", str(model), "--sparsity", "0.3", "--calibration", str(text),
             "--nsamples", "2", "--seqlen", "32")
    done = tailwise(*prune, env=env)
    assert done.returncode == 0, done.stderr
    assert "wanda: 2 blocks" in done.stderr and "2/2" in done.stderr
    # Other values than above, so the steps run again rather than come from the cache.
    for args in ((*evaluate[:-1], "2"), (*prune[:3], "0.35", *prune[4:])):
        quiet = tailwise("--quiet", *args, env=env)
        assert quiet.returncode == 0, quiet.stderr
        assert "(computed)" in quiet.stdout
        assert "windows" not in quiet.stderr and "blocks" not in quiet.stderr, quiet.stderr


# ------------------------------------------------------------------- bad input


def test_errors_name_the_users_argument_not_a_scratch_path(chain):
    root, _, _, env = chain
    metrics = root / "metrics.txt"
    metrics.write_text("not a table")
    line = assert_one_line_error(tailwise("allocate", str(metrics), env=env), "metrics.txt")
    assert "tailwise-allocate-" not in line and str(metrics) in line


def test_store_put_checks_the_kind_and_that_a_model_has_weights(chain):
    root, model, _, env = chain
    empty = root / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert_one_line_error(tailwise("store", "put", str(empty), "--kind", "model", env=env),
                          "empty-model")
    assert_one_line_error(tailwise("store", "put", str(model), "--kind", "modle", env=env),
                          "modle", "model")
    done = tailwise("store", "put", str(model), "--kind", "model", env=env)
    assert done.returncode == 0, done.stderr
    assert manifest_of(root, json.loads(done.stdout)["digest"])["kind"] == "model"


# ------------------------------------------------------------------------ tables


def test_wide_tables_keep_the_distinctive_tail_of_names(monkeypatch):
    from tailwise_cli.app import console
    from tailwise_cli.tables import print_layer_table

    names = [f"bert.encoder.layer.{i // 6}.attention.output.dense" for i in range(211)]
    rows = [(name, f"{i}", "768 x 768", f"{2 + i / 100:.3f}", "under-trained")
            for i, name in enumerate(names)]
    monkeypatch.setattr(console, "width", 80)
    with console.capture() as captured:
        print_layer_table("t", ("name", "layer", "N x M", "alpha", "warning"), rows,
                          optional=("layer",), top=5, rank=lambda i: float(rows[i][3]),
                          ranked_by="alpha", summary="211 matrices")
    lines = captured.get().splitlines()
    assert max(map(len, lines)) <= 80
    assert not any("encoder…" in line for line in lines)
    shown = [line for line in lines if "…" in line]
    assert len(shown) == 5  # the five largest alphas, largest first
    assert "…layer.35.attention.output.dense " in shown[0]  # the tail, from a whole part
    assert all(line.rstrip().endswith("under-trained") for line in shown)
    assert "5 of 211" in captured.get() and lines[-1] == "211 matrices"


def test_spectral_and_allocate_top_and_the_plot_allocate_made(chain):
    root, model, _, env = chain
    done = tailwise("spectral", str(model), "--estimator", "alpha_peak", "--output",
                    str(root / "alphas.parquet"), "--top", "3", env=env)
    assert done.returncode == 0, done.stderr
    assert "showing the 3 of 16 rows with the largest alpha" in done.stdout
    done = tailwise("allocate", str(root / "alphas.parquet"), "--sparsity", "0.6", "--top",
                    "2", "--plots", str(root / "plots"), env=env)
    assert done.returncode == 0, done.stderr
    assert "showing the 2 of 14 rows with the largest sparsity" in done.stdout
    assert "14 layers; sparsity min" in done.stdout
    assert (root / "plots" / "decisions.png").is_file()
    assert f"plot: {root / 'plots' / 'decisions.png'}" in done.stdout
