"""Pruning the real SmolLM2-135M (weights 4-bit quantised and expanded back): Wanda at 50 %
costs a moderate amount of perplexity, magnitude at 70 % destroys the model."""

from __future__ import annotations

import pytest
import torch

from steps.core.data import default_cache_dir
from steps.core.pretrained import load_hf_model, smollm2_hf_dir
from steps.evaluate import perplexity_of_ids, tokenize_file
from steps.prune import prune

pytestmark = pytest.mark.slow

EVAL = {"seqlen": 1024, "max_windows": 4, "device": "cpu"}  # 4096 held-out KJV test tokens
CALIBRATION = {"nsamples": 16, "seqlen": 512, "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer, a copy of the dense weights to restore between tests)."""
    from transformers import AutoTokenizer

    path = smollm2_hf_dir(default_cache_dir())
    model = load_hf_model(path)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True), dense


@pytest.fixture(scope="module")
def test_ids(smollm2, kjv) -> torch.Tensor:
    return tokenize_file(smollm2[1], kjv["test"])


@pytest.fixture(scope="module")
def dense_perplexity(smollm2, test_ids: torch.Tensor) -> float:
    model, _, dense = smollm2
    model.load_state_dict(dense)
    return perplexity_of_ids(model, test_ids, **EVAL)


def _pruned_perplexity(smollm2, test_ids, kjv, **request) -> tuple[float, float]:
    model, tokenizer, dense = smollm2
    model.load_state_dict(dense)
    report = prune(model, tokenizer, calibration_text=kjv["validation"], **CALIBRATION, **request)
    params = sum(report.column("params").to_pylist())
    achieved = sum(r["achieved"] * r["params"] for r in report.to_pylist()) / params
    return perplexity_of_ids(model, test_ids, **EVAL), achieved


def test_wanda_at_half_sparsity_raises_perplexity_moderately(
    smollm2, test_ids, kjv, dense_perplexity: float
) -> None:
    value, achieved = _pruned_perplexity(smollm2, test_ids, kjv, method="wanda", sparsity=0.5)
    assert achieved == pytest.approx(0.5, abs=1e-3)
    assert dense_perplexity < value < 2 * dense_perplexity


def test_magnitude_at_70_percent_raises_perplexity_a_lot(
    smollm2, test_ids, kjv, dense_perplexity: float
) -> None:
    value, achieved = _pruned_perplexity(smollm2, test_ids, kjv, method="magnitude", sparsity=0.7)
    assert achieved == pytest.approx(0.7, abs=1e-3)
    assert value > 20 * dense_perplexity
