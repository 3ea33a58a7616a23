"""The prunability flow: a tiny knob x density grid trained, pruned, retrained, classified."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from flows.common import RunSettings
from flows.prunability import PrunabilityParams, prunability
from steps.core.factory import load_model
from steps.core.lineage import upstream
from steps.core.sparsity import density
from steps.core.store import open_store
from steps.diagnose.regimes import REGIMES, TEMPERATURE_SIGN

PNG = b"\x89PNG\r\n\x1a\n"


def test_prunability_maps_every_cell_and_reruns_cached(tmp_path, prefect_api):
    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    params = PrunabilityParams(width=16, knob="batch_size", knob_values=[16, 128],
                               densities=[0.1, 0.5], epochs=2, retrain_epochs=1,
                               line_points=5)
    result = prunability(params, settings)

    cells = result["cells"]
    assert sorted((c["knob_value"], c["density"]) for c in cells) == [
        (16, 0.1), (16, 0.5), (128, 0.1), (128, 0.5)]  # one row per cell
    for c in cells:
        assert c["regime"] in REGIMES and c["seeds"] == 3 and c["pairs"] == 3
        assert c["knob_advice"].endswith("batch_size")
        assert 0 < c["test_accuracy"] <= 1 and 0 <= c["cka"] <= 1 + 1e-9
        assert c["measured_density"] == pytest.approx(c["density"], abs=1e-3)
    assert [row["density"] for row in result["advice"]] == [0.1, 0.5]
    for row in result["advice"]:
        picked = next(c for c in cells if c["density"] == row["density"]
                      and c["knob_value"] == row["pick_knob_value"])
        assert picked["regime"] == row["pick_regime"]

    store = open_store(settings.store)
    plots = store.get(result["phase_map"], tmp_path / "plots")
    assert (plots / "phase_map.png").read_bytes()[:8] == PNG
    table = pq.read_table(store.get(result["regimes"], tmp_path / "regimes.parquet"))
    assert table.num_rows == 4 and set(table["regime"].to_pylist()) <= set(REGIMES)

    # Lineage: every retrained seed of a cell comes from one pruned model (one mask).
    graph = upstream(store, result["regimes"])
    made = [m for m in graph.steps.values()]
    assert {"build_model", "finetune", "prune", "diagnose"} <= {m.step for m in made}
    retrains = [m for m in made if m.step == "finetune" and m.params["keep_mask"]]
    assert len(retrains) == 12 and {m.params["seed"] for m in retrains} == {0, 1, 2}
    assert len({m.inputs["model"] for m in retrains}) == 4  # 4 cells, 4 masks
    for pruned in {m.inputs["model"] for m in retrains}:
        model = load_model(store.get(pruned, tmp_path / "pruned" / pruned[:12]))
        assert density(model) in (pytest.approx(0.1, abs=1e-3), pytest.approx(0.5, abs=1e-3))

    entries = store.cache_entries()
    assert prunability(params, settings) == result
    assert store.cache_entries() == entries  # nothing recomputed: every step was cached


@pytest.mark.parametrize(("update", "message"), [
    ({"densities": [0.0]}, "outside"),
    ({"densities": [0.5, 0.5]}, "repeated"),
    ({"knob_values": [1.5]}, "positive integers"),
    ({"knob": "lr", "knob_values": [0.0]}, "positive"),
    ({"seeds": [0]}, "at least 2"),
    ({"cka_threshold": 1.5}, "less than or equal"),
])
def test_bad_params_are_refused_before_anything_runs(update, message):
    with pytest.raises(ValidationError, match=message):
        PrunabilityParams(**update)


def test_every_knob_has_a_temperature_direction():
    knobs = PrunabilityParams.model_fields["knob"].annotation.__args__
    assert set(knobs) == set(TEMPERATURE_SIGN)
