"""steps.spectral.analyze end to end: edge cases, options and the table contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from spectral_helpers import cnn, tiny_gpt2

from steps.core.naming import block_of as parse_block
from steps.spectral import SCHEMA, SpectralError, analyze, resolve_device, summarize


def _linear(out_features: int, in_features: int, weight=None, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(weight))
    return layer


def _rows(table) -> dict[str, dict]:
    return {row["name"]: row for row in table.to_pylist()}


def test_table_has_the_schema_and_one_row_per_matrix():
    model = torch.nn.Sequential(_linear(64, 32), torch.nn.ReLU(), _linear(16, 64))
    table = analyze(model, device="cpu")
    assert table.schema.equals(SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    assert [(r["name"], r["N"], r["M"], r["num_evals"]) for r in rows] == [
        ("0", 64, 32, 32),
        ("2", 64, 16, 16),
    ]
    for r in rows:
        assert r["status"] == "ok" and r["spectral_norm"] == r["lambda_max"]
        assert r["alpha_weighted"] == pytest.approx(r["alpha"] * np.log10(r["lambda_max"]))
        assert r["num_params"] == r["N"] * r["M"]
        assert 0 < r["entropy"] <= 1 and r["matrix_rank"] == r["M"]


def test_non_finite_and_zero_matrices_get_a_status_not_a_crash():
    bad = np.random.default_rng(0).standard_normal((40, 30))
    bad[3, 4] = np.nan
    inf = np.ones((40, 30))
    inf[0, 0] = np.inf
    model = torch.nn.Sequential(
        _linear(40, 30, bad), _linear(40, 30, inf), _linear(40, 30, np.zeros((40, 30))),
        _linear(40, 30),
    )  # fmt: skip
    rows = _rows(analyze(model, device="cpu"))
    assert rows["0"]["status"] == rows["1"]["status"] == "non-finite weights"
    assert np.isnan(rows["0"]["alpha"]) and np.isnan(rows["0"]["lambda_max"])
    assert rows["2"]["status"] == "zero matrix"
    assert rows["2"]["norm"] == 0 and rows["2"]["matrix_rank"] == 0
    assert np.isnan(rows["2"]["alpha"]) and np.isnan(rows["2"]["log_norm"])
    assert rows["3"]["status"] == "ok"


def test_one_by_n_matrix_is_skipped_by_default_and_reported_when_asked():
    weight = np.arange(1.0, 101.0)[None, :]
    model = torch.nn.Sequential(_linear(1, 100, weight), _linear(50, 20))
    table = analyze(model, device="cpu")
    assert [r["name"] for r in table.to_pylist()] == ["1"]
    skipped = json.loads(table.schema.metadata[b"tailwise.skipped"])
    assert skipped == {"0": "1 eigenvalues < min_evals 10"}
    (row,) = analyze(model, device="cpu", min_evals=1, include="^0$").to_pylist()
    assert row["status"] == "fit failed: fewer than 2 nonzero eigenvalues"
    assert row["lambda_max"] == pytest.approx(np.sum(weight**2))
    assert (row["N"], row["M"], row["matrix_rank"]) == (100, 1, 1)


def test_no_analysable_matrix_is_a_clear_error(tmp_path):
    with pytest.raises(SpectralError, match="LayerNorm: no analysable weight matrices.*none found"):
        analyze(torch.nn.LayerNorm(8), device="cpu")
    with pytest.raises(SpectralError, match="all skipped.*< min_evals 10"):
        analyze(torch.nn.Sequential(_linear(5, 5)), device="cpu")
    with pytest.raises(SpectralError, match="not included"):
        analyze(torch.nn.Sequential(_linear(50, 50)), device="cpu", include="attn")


def test_include_exclude_and_max_n():
    model = tiny_gpt2()
    names = {r["name"] for r in analyze(model, device="cpu", include=r"\.h\.1\.").to_pylist()}
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert names == {f"transformer.h.1.{part}" for part in parts}
    table = analyze(model, device="cpu", exclude=["mlp", r"^transformer\.wpe$"], max_n=500)
    assert {r["name"] for r in table.to_pylist()} == {
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
    }  # fmt: skip
    skipped = json.loads(table.schema.metadata[b"tailwise.skipped"])
    assert skipped["transformer.wte"] == "N = 1000 > max_n 500"
    assert skipped["transformer.wpe"] == "excluded"


def _esd_of(esd, name: str) -> list[list[float]]:
    return [r["evals"] for r in esd.to_pylist() if r["name"] == name]


def test_conv_pooled_and_per_slice_spectra_are_consistent():
    model = cnn()
    pooled, pooled_esd = analyze(model, device="cpu", return_esd=True)
    sliced, sliced_esd = analyze(model, device="cpu", conv_slices=True, return_esd=True)
    conv = _rows(pooled)["2"]  # Conv2d(16, 32, 3): 9 slices of 32 x 16
    assert (conv["layer_type"], conv["N"], conv["M"], conv["rf"], conv["num_evals"]) == (
        "conv2d", 32, 16, 9, 144,
    )  # fmt: skip
    weight = model[2].weight.detach().double()
    slice_evals = [
        torch.linalg.svdvals(weight[:, :, i, j]) ** 2 for i in range(3) for j in range(3)
    ]
    expected = np.sort(torch.cat(slice_evals).numpy()) * 0.5  # pooled, scaled by 0.5
    got = np.array(_esd_of(pooled_esd, "2")[0])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert conv["norm"] == pytest.approx(0.5 * float((weight**2).sum()))

    slices = [r for r in sliced.to_pylist() if r["name"] == "2"]
    assert [r["slice_id"] for r in slices] == list(range(9))
    assert all((r["rf"], r["num_evals"]) == (1, 16) for r in slices)
    # Per slice the scale is kh * kw / 2 (WeightWatcher's pool=False convention).
    per_slice = _esd_of(sliced_esd, "2")
    np.testing.assert_allclose(np.sort(np.concatenate(per_slice)) / 9, got, rtol=1e-12)
    assert _rows(sliced)["6"]["slice_id"] is None  # the Linear is not sliced


def test_esd_table_matches_the_metrics():
    metrics, esd = analyze(tiny_gpt2(), device="cpu", return_esd=True)
    assert esd.num_rows == metrics.num_rows
    for row, evals in zip(metrics.to_pylist(), esd["evals"].to_pylist(), strict=True):
        evals = np.asarray(evals)
        assert len(evals) == row["num_evals"] and np.all(np.diff(evals) >= 0)
        assert evals.sum() == pytest.approx(row["norm"], rel=1e-12)
        assert evals[-1] == row["lambda_max"]


def test_file_and_module_and_worker_counts_give_the_same_numbers(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    in_memory = _rows(analyze(model, device="cpu", workers=1))
    from_file = _rows(analyze(tmp_path, device="cpu", workers=2))
    assert set(in_memory) == set(from_file)
    for name, row in in_memory.items():
        other = from_file[name]
        assert (row["layer_type"], row["block"]) == (other["layer_type"], other["block"])
        for column in ("N", "M", "alpha", "xmin", "D", "norm", "entropy"):
            assert row[column] == pytest.approx(other[column], rel=1e-12), (name, column)


def test_blocks_are_parsed_from_names():
    cases = {
        "model.layers.3.self_attn.q_proj": 3,
        "transformer.h.11.mlp.c_fc": 11,
        "encoder.layer.5.attention.self.query": 5,
        "blocks.7.attn.qkv": 7,
        "layer3.1.conv2": 3,
        "model.embed_tokens": None,
        "lm_head": None,
        "classifier.weight": None,
    }
    assert {name: parse_block(name) for name in cases} == cases
    rows = _rows(analyze(tiny_gpt2(), device="cpu"))
    assert rows["transformer.h.1.mlp.c_proj"]["block"] == 1
    assert rows["transformer.wte"]["block"] is None


def test_rank_of_a_low_rank_matrix():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 40))
    (row,) = analyze(torch.nn.Sequential(_linear(60, 40, weight)), device="cpu").to_pylist()
    assert row["matrix_rank"] == 5


def test_options_are_checked_and_recorded():
    with pytest.raises(SpectralError, match="unknown estimator"):
        analyze(cnn(), estimator="mle")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SpectralError, match="no CUDA GPU"):
            analyze(cnn(), device="cuda")
    table = analyze(cnn(), estimator="hill", hill_k=1.5, device="cpu")
    options = json.loads(table.schema.metadata[b"tailwise.options"])
    assert options["estimator"] == "hill" and options["hill_k"] == 1.5


def test_progress_callback_and_summary():
    calls = []
    table = analyze(
        cnn(), device="cpu", progress=lambda done, total, name: calls.append((done, total))
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    summary = summarize(table)
    alphas = np.array(table["alpha"].to_pylist())
    assert summary["num_matrices"] == summary["num_fitted"] == 4
    assert summary["mean_alpha"] == pytest.approx(alphas.mean())
    assert summary["num_over_trained"] == np.count_nonzero(alphas < 2)
    assert summary["num_under_trained"] == np.count_nonzero(alphas > 6)
