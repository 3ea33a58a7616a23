"""The prune step's params: checked with the inputs given before a model is read, in every
caller (CLI, flows, step containers all go through run_step), and recorded as they took
effect."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steps.core.errors import ParamsError
from steps.core.registry import load_step
from steps.core.step import run_step
from steps.core.store import open_store

PRUNE = load_step("prune")


@pytest.mark.parametrize(
    ("params", "inputs", "message"),
    [
        ({"method": "magnitude", "sparsity": 0.5}, {"allocation"}, "conflict"),
        ({"method": "magnitude", "nm": "2:4"}, {"allocation"}, "conflict"),
        ({"method": "magnitude"}, set(), "give a sparsity"),
        ({"method": "wanda", "sparsity": 0.5}, set(), "needs a calibration text"),
        ({"method": "sparsegpt", "nm": "2:4"}, set(), "needs a calibration text"),
    ],
)
def test_params_that_conflict_with_the_inputs_are_refused(params, inputs, message):
    with pytest.raises(ParamsError, match=message):
        PRUNE.validate(params, {"model", *inputs})


@pytest.mark.parametrize(("nm", "message"), [("2-4", "not of the form N:M"),
                                             ("4:2", "needs 1 <= N < M")])
def test_a_bad_nm_pattern_is_a_params_error(nm, message):
    with pytest.raises(ParamsError, match=message):
        PRUNE.validate({"method": "magnitude", "nm": nm})


def test_sparsity_beside_nm_is_refused():
    with pytest.raises(ParamsError, match="not both"):
        PRUNE.validate({"method": "wanda", "nm": "2:4", "sparsity": 0.5})


def test_magnitude_claims_no_calibration_params_and_the_others_keep_theirs():
    magnitude = PRUNE.validate({"method": "magnitude", "sparsity": 0.5, "nsamples": 4})
    assert (magnitude.nsamples, magnitude.seqlen, magnitude.seed, magnitude.batch_tokens) == \
        (None, None, None, None)
    wanda = PRUNE.validate({"method": "wanda", "sparsity": 0.5, "nsamples": 4})
    assert wanda.nsamples == 4 and wanda.seqlen == 2048 and wanda.seed == 0


def test_run_step_refuses_before_reading_the_model(tmp_path):
    store = open_store(str(tmp_path / "store"))
    decisions = tmp_path / "decisions.parquet"
    pq.write_table(pa.table({"name": ["model.layers.0.mlp.up_proj"], "sparsity": [0.7]}),
                   decisions)
    allocation = store.put(decisions, "decisions").digest
    # The model ref names no artifact: the conflict is found before it is looked up.
    with pytest.raises(ParamsError, match="conflict"):
        run_step(PRUNE, {"method": "magnitude", "sparsity": 0.5},
                 {"model": "0" * 64, "allocation": allocation}, store=store)
