"""Prunability regimes: classification at the thresholds, advice, picks, phase map, the step."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from steps.core.errors import TailwiseError
from steps.core.factory import build_model, load_model, save_hf
from steps.core.registry import load_step
from steps.core.sparsity import density
from steps.core.step import run_step
from steps.core.store import open_store
from steps.diagnose.cka import output_cka
from steps.diagnose.regimes import (
    CKA_BATCH_SIZE,
    CKA_BATCHES,
    REGIMES,
    RegimeError,
    Thresholds,
    classify_cells,
    density_summary,
    fit_cka_threshold,
    knob_advice,
    measure_cell,
    plot_phase_map,
    regime,
    temperature_advice,
)
from steps.finetune.plain import plain_data, run_plain
from steps.prune.plain import prune_plain

PNG = b"\x89PNG\r\n\x1a\n"


def cell(value, load, lmc, cka, accuracy, knob="epochs") -> dict:
    return {"knob": knob, "knob_value": value, "density": load, "lmc_barrier": lmc,
            "cka": cka, "test_accuracy": accuracy}


# ------------------------------------------------------------------ classification


def test_regime_boundaries_count_equal_as_connected_and_similar():
    t = Thresholds(lmc_barrier=2.0, cka=0.9)
    assert regime(2.0, 0.5, t) == "II-A"  # at the LMC threshold: connected
    assert regime(2.0 + 1e-9, 0.99, t) == "I"  # just above: poorly connected, CKA ignored
    assert regime(-3.0, 0.9, t) == "II-B"  # at the CKA threshold: similar
    assert regime(-3.0, 0.9 - 1e-9, t) == "II-A"
    assert regime(0.0, 1.0, Thresholds(lmc_barrier=-1.0, cka=0.9)) == "I"


def test_default_thresholds_are_the_sign_of_mc_and_a_cka_split_fitted_from_the_cells():
    assert (Thresholds().lmc_barrier, Thresholds().cka) == (0.0, None)
    rows = [cell(1, 0.5, -0.4, 0.80, 0.9), cell(2, 0.5, -0.1, 0.82, 0.9),
            cell(3, 0.5, 0.0, 0.95, 0.9), cell(4, 0.5, -0.2, 0.96, 0.9),
            cell(5, 0.5, 0.3, 0.99, 0.9)]  # a barrier (mc < 0): regime I, not in the fit
    # Connected CKAs .80 .82 | .95 .96: the least within-group sum of squares cuts the gap.
    assert fit_cka_threshold(rows, 0.0) == pytest.approx((0.82 + 0.95) / 2)
    out = classify_cells(rows)
    assert [c["regime"] for c in out] == ["II-A", "II-A", "II-B", "II-B", "I"]
    assert [c["cka_threshold"] for c in out] == pytest.approx([0.885] * 5)
    assert {c["lmc_threshold"] for c in out} == {0.0}
    # Nothing relative to split: every connected cell is similar.
    assert fit_cka_threshold(rows[:1], 0.0) == 0.0
    assert fit_cka_threshold([cell(1, .5, 0.0, .9, .9), cell(2, .5, -1.0, .9, .9)], 0.0) == 0.0
    with pytest.raises(RegimeError, match="cka_threshold: one cell cannot fit it"):
        regime(0.0, 0.5, Thresholds())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lmc_barrier": math.nan}, "lmc_threshold"),
    ({"lmc_barrier": math.inf}, "lmc_threshold"),
    ({"cka": 1.5}, "cka_threshold"),
    ({"cka": -0.1}, "cka_threshold"),
    ({"cka": "high"}, "cka_threshold"),
])
def test_bad_thresholds_are_refused(kwargs, message):
    with pytest.raises(RegimeError, match=message):
        Thresholds(**kwargs)


@pytest.mark.parametrize(("lmc", "cka", "message"), [
    (math.nan, 0.9, "lmc_barrier"), (1.0, None, "cka"), (1.0, math.inf, "cka")])
def test_bad_measurements_are_refused(lmc, cka, message):
    with pytest.raises(RegimeError, match=message):
        regime(lmc, cka, Thresholds(cka=0.9))


def test_advice_raises_temperature_in_I_lowers_it_in_II_A_and_maps_to_the_knob():
    assert [temperature_advice(r) for r in REGIMES] == ["raise", "lower", "keep"]
    assert knob_advice("I", "epochs") == "raise epochs"
    assert knob_advice("I", "lr") == "raise lr"
    assert knob_advice("I", "batch_size") == "lower batch_size"  # larger batch: colder
    assert knob_advice("II-A", "batch_size") == "raise batch_size"
    assert knob_advice("II-B", "batch_size") == "keep batch_size"
    with pytest.raises(RegimeError, match="unknown regime"):
        temperature_advice("III")
    with pytest.raises(RegimeError, match="knob"):
        knob_advice("I", "weight_decay")


def test_classify_cells_adds_regime_and_advice_sorted_by_density_then_knob():
    rows = [cell(8, 0.5, 0.1, 0.99, 0.9), cell(2, 0.1, 5.0, 0.99, 0.7),
            cell(8, 0.1, 0.5, 0.80, 0.8), cell(2, 0.5, 0.0, 0.95, 0.85)]
    out = classify_cells(rows, Thresholds(2.0, 0.97))
    assert [(c["knob_value"], c["density"]) for c in out] == [(2, 0.1), (8, 0.1), (2, 0.5),
                                                              (8, 0.5)]
    assert [c["regime"] for c in out] == ["I", "II-A", "II-A", "II-B"]
    assert [c["knob_advice"] for c in out] == ["raise epochs", "lower epochs", "lower epochs",
                                               "keep epochs"]
    assert rows[0] == cell(8, 0.5, 0.1, 0.99, 0.9)  # the input rows are not changed


@pytest.mark.parametrize(("rows", "message"), [
    ([], "no rows"),
    ([{"knob": "epochs", "knob_value": 1, "density": 0.5}], "missing columns"),
    ([cell(1, 0.5, 0, 1, 0.9), cell(16, 0.5, 0, 1, 0.9, knob="batch_size")], "one temperature"),
    ([cell(1, 0.5, 0, 1, 0.9), cell(1, 0.5, 1, 1, 0.8)], "appears twice"),
    ([cell(1, 1.5, 0, 1, 0.9)], "density"),
    ([cell(1, 0.5, math.nan, 1, 0.9)], "lmc_barrier"),
    ([cell(1, 0.5, 0, 1, None)], "test_accuracy"),
    ([cell(1, 0.5, 0, 1, 0.9, knob="momentum")], "knob"),
])
def test_bad_cells_are_refused(rows, message):
    with pytest.raises(RegimeError, match=message):
        classify_cells(rows)


def test_the_pick_prefers_the_best_II_B_cell_and_reports_the_accuracy_argmax():
    t = Thresholds(2.0, 0.97)
    cells = classify_cells([
        cell(2, 0.1, 5.0, 0.99, 0.60),   # I
        cell(8, 0.1, 0.5, 0.90, 0.80),   # II-A, best accuracy at 0.1
        cell(32, 0.1, 0.5, 0.99, 0.75),  # II-B
        cell(2, 0.5, 9.0, 0.99, 0.95),   # I, best accuracy at 0.5, no II-B there
        cell(8, 0.5, 3.0, 0.99, 0.90),   # I
        cell(32, 0.5, 0.0, 0.90, 0.70),  # II-A
    ], t)
    low, high = density_summary(cells)
    assert low["density"] == 0.1 and low["pick_knob_value"] == 32
    assert low["pick_regime"] == "II-B" and low["pick_rule"] == "best II-B"
    assert low["best_knob_value"] == 8 and low["best_test_accuracy"] == 0.80
    assert (low["cells_I"], low["cells_II-A"], low["cells_II-B"]) == (1, 1, 1)
    assert high["pick_knob_value"] == 2 and high["pick_rule"].startswith("best accuracy")
    # The effect of temperature flips sign between the two loads (the paper's transition).
    assert low["temperature_effect"] == "helps" and low["accuracy_temperature_corr"] > 0
    assert high["temperature_effect"] == "hurts"
    assert high["accuracy_temperature_corr"] == pytest.approx(-1.0)


def test_temperature_runs_against_batch_size_and_is_undefined_for_one_cell():
    cells = classify_cells([cell(16, 0.2, 0, 1, 0.9, "batch_size"),
                            cell(256, 0.2, 0, 1, 0.7, "batch_size"),
                            cell(16, 0.6, 0, 1, 0.8, "batch_size")])
    low, high = density_summary(cells)
    assert low["temperature_effect"] == "helps"  # the small batch (hot) is the better one
    assert high["cells"] == 1 and high["accuracy_temperature_corr"] is None
    assert high["temperature_effect"] is None


def test_phase_map_is_written_for_a_grid_with_a_missing_cell(tmp_path):
    cells = classify_cells([cell(2, 0.1, 5.0, 0.99, 0.6), cell(8, 0.1, 0.1, 0.99, 0.8),
                            cell(2, 0.5, 0.1, 0.5, 0.9)])
    path = plot_phase_map(cells, density_summary(cells), Thresholds(),
                          tmp_path / "out" / "phase_map.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    with pytest.raises(RegimeError, match="nothing to plot"):
        plot_phase_map([], [], Thresholds(), tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


# ------------------------------------------------------------------- measuring


@pytest.fixture(scope="module")
def retrained(tmp_path_factory) -> list:
    """A trained width-16 MLP pruned to 30 % and retrained with two seeds on its mask."""
    root = tmp_path_factory.mktemp("retrained")
    start = save_hf(build_model("mlp", seed=0, width=16), None, root / "init")
    dense = run_plain(start, "digits", batch_size=32, fraction=1.0, seed=0, epochs=3,
                      lr=0.1).model
    prune_plain(dense, sparsity=0.7)
    pruned = save_hf(dense, None, root / "pruned")
    return [save_hf(run_plain(pruned, "digits", batch_size=32, fraction=1.0, seed=seed,
                              epochs=2, lr=0.1, keep_mask=True).model, None, root / f"s{seed}")
            for seed in (0, 1)]


def test_a_model_with_itself_is_connected_and_identical(retrained):
    model = load_model(retrained[0])
    data = plain_data("digits", model)
    row = measure_cell([model, load_model(retrained[0])], data, data.train, line_points=5)
    assert row["lmc_barrier"] == pytest.approx(0.0, abs=1e-9)
    assert row["cka"] == pytest.approx(1.0)
    assert row["test_accuracy_std"] == 0.0 and row["pairs"] == 1 and row["seeds"] == 2
    assert row["measured_density"] == pytest.approx(density(model))
    assert row["measured_density"] == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(RegimeError, match=">= 2 seeds"):
        measure_cell([model], data, data.train)


def test_cka_is_measured_on_the_reference_training_batches(retrained):
    a, b = load_model(retrained[0]), load_model(retrained[1])
    data = plain_data("digits", a)
    row = measure_cell([a, b], data, data.train, line_points=3)
    inputs = data.x_train[:CKA_BATCHES * CKA_BATCH_SIZE]  # 101 batches of 64, in order
    assert row["cka_samples"] == len(inputs) == min(len(data.x_train), 6464)
    assert row["cka"] == pytest.approx(output_cka(a, b, inputs), rel=1e-12)
    assert row["cka"] != pytest.approx(output_cka(a, b, data.x_test), rel=1e-6)


def test_a_collapsed_seed_counts_as_dissimilar(retrained):
    model, dead = load_model(retrained[0]), load_model(retrained[1])
    with torch.no_grad():
        dead.layers[-1].weight.zero_()  # constant logits (the biases) for every input
    data = plain_data("digits", model)
    row = measure_cell([model, dead], data, data.train, line_points=5)
    assert row["cka"] == 0.0 and row["collapsed_seeds"] == 1
    assert math.isfinite(row["lmc_barrier"])


def test_diagnose_cell_and_regimes_modes(retrained, tmp_path):
    store = open_store(str(tmp_path / "store"))
    step = load_step("diagnose")
    seeds = {f"retrained_{i}": store.put(p, "model").digest for i, p in enumerate(retrained)}
    tags = {"knob": "epochs", "knob_value": 3.0, "density": 0.3}
    result = run_step(step, {"mode": "cell", "line_points": 5, "tags": tags}, seeds,
                      store=store)
    [row] = pq.read_table(store.get(result.digests()["features"], tmp_path / "c.parquet")
                          ).to_pylist()
    assert row["knob"] == "epochs" and row["pairs"] == 1 and 0 < row["test_accuracy"] <= 1
    assert -100 <= row["lmc_barrier"] <= 100 and 0 <= row["cka"] <= 1 + 1e-9
    assert row["cka"] < 1.0  # two seeds differ

    table = tmp_path / "cells.parquet"
    pq.write_table(pa.Table.from_pylist([row, row | {"knob_value": 9.0, "cka": 0.1}]), table)
    out = run_step(step, {"mode": "regimes", "lmc_threshold": 100.0, "cka_threshold": 0.5},
                   {"cells": store.put(table, "table").digest}, store=store).digests()
    regimes = pq.read_table(store.get(out["regimes"], tmp_path / "r.parquet")).to_pylist()
    assert [r["regime"] for r in regimes] == ["II-B", "II-A"]
    [advice] = pq.read_table(store.get(out["advice"], tmp_path / "a.parquet")).to_pylist()
    assert advice["pick_knob_value"] == 3.0 and advice["pick_regime"] == "II-B"
    plots = store.get(out["phase_map"], tmp_path / "plots")
    assert (plots / "phase_map.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(("params", "inputs", "message"), [
    ({"mode": "cell"}, ["retrained_0"], ">= 2 retrained seeds"),
    ({"mode": "cell"}, ["model", "retrained_0"], "unexpected inputs"),
    ({"mode": "regimes"}, [], "cells input only"),
    ({"mode": "regimes", "lmc_threshold": math.nan}, ["cells"], "lmc_threshold"),
    ({"mode": "regimes", "cka_threshold": 2.0}, ["cells"], "cka_threshold"),
])
def test_bad_requests_fail_naming_the_input(retrained, tmp_path, params, inputs, message):
    store = open_store(str(tmp_path / "store"))
    digest = store.put(retrained[0], "model").digest
    with pytest.raises(TailwiseError, match=message):
        run_step(load_step("diagnose"), params, {name: digest for name in inputs},
                 store=store)
    assert store.cache_entries() == []


def test_regimes_refuses_a_table_without_the_cell_columns(tmp_path):
    store = open_store(str(tmp_path / "store"))
    table = tmp_path / "zoo.parquet"
    pq.write_table(pa.table({"width": [8], "test_error": [3.0]}), table)
    with pytest.raises(TailwiseError, match="missing columns"):
        run_step(load_step("diagnose"), {"mode": "regimes"},
                 {"cells": store.put(table, "table").digest}, store=store)


def test_retrained_models_keep_their_shared_mask(retrained):
    a, b = (load_model(p) for p in retrained)
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if name.endswith("weight"):
            assert torch.equal(wa == 0, wb == 0), name
