"""`tailwise spectral` then `tailwise allocate` from the command line: the paper's alpha by
default, FARMS columns, and FARMS bad input."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from steps.core.factory import build_model, byte_tokenizer, save_hf
from tailwise_cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-spectral")
    return save_hf(build_model("tiny-llama", seed=0), byte_tokenizer(), root / "llama")


@pytest.fixture
def tailwise(tmp_path, monkeypatch, capsys):
    """Run the CLI's entry point in this process: (exit code, stderr)."""
    monkeypatch.setenv("TAILWISE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["tailwise", *args])
        with pytest.raises(SystemExit) as done:
            main()
        return done.value.code, capsys.readouterr().err

    return run


def alphapruning_by_formula(metrics, column: str, target: float, eps: float) -> np.ndarray:
    """METHODS.md section 2 on the block rows, computed here: sparsity per row."""
    blocks = metrics["block"].to_numpy()
    alpha = metrics[column].to_numpy()
    params = metrics["num_params"].to_numpy().astype(float)
    means = {b: alpha[blocks == b].mean() for b in np.unique(blocks)}
    score = np.array([means[b] for b in blocks])
    ratio = (score - score.min()) / (score.max() - score.min()) * 2 * eps + 1 - eps
    return ratio * target * params.sum() / (params @ ratio)


def test_plain_chain_allocates_from_alpha_peak(model_dir, tailwise, tmp_path):
    root = tmp_path
    code, err = tailwise("spectral", str(model_dir), "--output", str(root / "m.parquet"))
    assert code == 0, err
    code, err = tailwise("allocate", str(root / "m.parquet"), "--policy", "alphapruning",
                         "--mode", "reference", "--output", str(root / "d.parquet"))
    assert code == 0, err
    metrics = pq.read_table(root / "m.parquet")
    metrics = metrics.filter(pc.is_valid(metrics["block"]))
    decisions = pq.read_table(root / "d.parquet")
    assert decisions["name"].to_pylist() == metrics["name"].to_pylist()
    expected = alphapruning_by_formula(metrics, "alpha_peak", 0.7, 0.3)
    np.testing.assert_allclose(decisions["sparsity"].to_numpy(), expected, rtol=1e-12)
    # ks alphas (the alpha column) would have given another allocation.
    from_ks = alphapruning_by_formula(metrics, "alpha", 0.7, 0.3)
    assert np.abs(from_ks - expected).max() > 0.01


def test_farms_columns_and_allocation_from_them(model_dir, tailwise, tmp_path):
    root = tmp_path
    code, err = tailwise("spectral", str(model_dir), "--farms", "--farms-window", "64",
                         "--farms-ops", "3", "--output", str(root / "f.parquet"))
    assert code == 0, err
    metrics = pq.read_table(root / "f.parquet")
    rows = {r["name"]: r for r in metrics.to_pylist()}
    q_proj = rows["model.layers.0.self_attn.q_proj"]  # 128 x 128: 3 x 3 windows of 64 x 64
    assert (q_proj["farms_rows"], q_proj["farms_cols"], q_proj["farms_windows"]) == (64, 64, 9)
    assert q_proj["farms_capped"] is False
    k_proj = rows["model.layers.0.self_attn.k_proj"]  # 64 x 128 (2 KV heads of 32)
    assert (k_proj["farms_rows"], k_proj["farms_windows"], k_proj["farms_capped"]) == (64, 3, False)
    code, err = tailwise("allocate", str(root / "f.parquet"), "--policy", "alphapruning",
                         "--metric", "alpha_peak_farms", "--output", str(root / "fd.parquet"))
    assert code == 0, err
    assert "alpha_peak_farms" in pq.read_table(root / "fd.parquet").column_names


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--farms-ops", "1", "farms_ops: Input should be greater than or equal to 2"),
    ("--farms-q", "0", "farms_q: Input should be greater than 0"),
])
def test_farms_bad_options_exit_2_with_one_line_and_write_nothing(model_dir, tailwise, tmp_path,
                                                                 option, value, message):
    output = tmp_path / "bad.parquet"
    code, err = tailwise("spectral", str(model_dir), "--farms", option, value, "--output",
                         str(output))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not output.exists()
    assert not [f for f in (tmp_path / "store").rglob("*") if f.is_file()]
