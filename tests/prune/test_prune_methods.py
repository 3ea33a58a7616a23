"""Magnitude, Wanda and SparseGPT on the tiny seeded LMs: exact sparsity, N:M, fidelity."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY_LMS, tiny_model

from steps.core.blocks import calibrated_blocks, find_blocks, wanda_scores, weight_matrix
from steps.prune import Pattern, magnitude, prune, sparsegpt, wanda
from steps.prune.masks import count_zeros, lowest_k, select, zero_masked

CALIBRATION = {"nsamples": 4, "seqlen": 64, "seed": 0, "device": "cpu"}


def _prune(name: str, method: str, tokenizer, text: Path, **target):
    model = tiny_model(name)
    report = prune(model, tokenizer, method=method, calibration_text=text, **CALIBRATION, **target)
    return model, report


@pytest.mark.parametrize("name", TINY_LMS)
def test_magnitude_prunes_the_smallest_weights_of_each_layer(name: str, tokenizer, kjv) -> None:
    model, report = _prune(name, "magnitude", tokenizer, kjv["validation"], sparsity=0.6)
    for layer_name, layer in find_blocks(model).all_layers().items():
        weight = weight_matrix(layer)
        pruned = weight == 0
        assert pruned.sum().item() == round(0.6 * weight.numel())
        original = weight_matrix(find_blocks(tiny_model(name)).all_layers()[layer_name])
        # Every zeroed weight was no larger than every kept one, and kept ones are unchanged.
        assert original[pruned].abs().max() <= original[~pruned].abs().min()
        assert torch.equal(weight[~pruned], original[~pruned])
    for row in report.to_pylist():
        assert row["achieved"] == round(0.6 * row["params"]) / row["params"]


@pytest.mark.parametrize("name", TINY_LMS)
def test_wanda_prunes_the_same_count_in_every_row(name: str, tokenizer, kjv) -> None:
    model, _ = _prune(name, "wanda", tokenizer, kjv["validation"], sparsity=0.5)
    for layer in find_blocks(model).all_layers().values():
        weight = weight_matrix(layer)
        per_row = (weight == 0).sum(dim=1)
        assert (per_row == round(0.5 * weight.shape[1])).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_nm_pattern_holds_in_every_group(name: str, method: str, nm, tokenizer, kjv) -> None:
    n, m = nm
    model, report = _prune(name, method, tokenizer, kjv["validation"], nm=f"{n}:{m}")
    for layer in find_blocks(model).all_layers().values():
        weight = weight_matrix(layer)
        nonzero_per_group = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=2)
        assert (nonzero_per_group == n).all()
    assert set(report.column("target").to_pylist()) == {(m - n) / m}


def test_wanda_equals_a_brute_force_reference(calibration_ids: torch.Tensor) -> None:
    """One small layer: score every weight by |W_ij| * ||X_j|| from explicitly kept inputs,
    rank each row with Python's sort, and compare the masks."""
    model = tiny_model("tiny-llama")
    name = "model.layers.1.self_attn.o_proj"
    layer = find_blocks(model).all_layers()[name]
    inputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _o: inputs.append(args[0].detach()))
    for block in calibrated_blocks(model, calibration_ids):
        if block.index == 1:
            handle.remove()  # the statistics pass is done: keep only its inputs
            original = layer.weight.detach().clone()
            wanda.prune_layer(layer, block.stats[name], Pattern(0.3))
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    assert x.shape[0] == calibration_ids.numel()
    column_norms = [sum(v * v for v in x[:, j].tolist()) ** 0.5 for j in range(x.shape[1])]
    out_features, in_features = original.shape
    k = round(0.3 * in_features)
    for i in range(out_features):
        scores = [abs(original[i, j].item()) * column_norms[j] for j in range(in_features)]
        lowest = set(sorted(range(in_features), key=lambda j: scores[j])[:k])
        expected = [0.0 if j in lowest else original[i, j].item() for j in range(in_features)]
        assert layer.weight[i].tolist() == pytest.approx(expected, abs=0, rel=0)


@pytest.mark.parametrize("pattern", [Pattern(0.3), Pattern(0.5, nm=(2, 4))])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # Linear; Conv1D (transposed)
def test_wanda_by_row_slabs_equals_the_whole_matrix_at_once(
    name: str, pattern: Pattern, calibration_ids: torch.Tensor, monkeypatch
) -> None:
    model = tiny_model(name)
    block = next(calibrated_blocks(model, calibration_ids))
    monkeypatch.setattr(wanda, "SLAB_ELEMENTS", 100)  # a few rows per slab, a ragged last one
    for layer_name, layer in block.layers.items():
        expected = weight_matrix(layer).detach().clone()
        whole = select(wanda_scores(layer, block.stats[layer_name]), pattern, per_row=True)
        expected[whole] = 0.0
        assert len(list(wanda.row_slabs(*expected.shape))) > 2
        wanda.prune_layer(layer, block.stats[layer_name], pattern)
        assert torch.equal(weight_matrix(layer), expected), layer_name


def _reconstruction_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor):
    """||W X^T - W' X^T||_F^2 = tr(D H D^T) with D = W - W', H = X^T X."""
    delta = (before - after).double()
    return torch.einsum("ij,jk,ik->", delta, hessian.double(), delta).item()


@pytest.mark.parametrize("name", TINY_LMS)
def test_sparsegpt_reconstructs_layer_outputs_better_than_magnitude(
    name: str, calibration_ids: torch.Tensor
) -> None:
    model = tiny_model(name)
    block = next(calibrated_blocks(model, calibration_ids, hessian=True))
    totals = {"magnitude": 0.0, "sparsegpt": 0.0}
    for layer_name, layer in block.layers.items():
        stats = block.stats[layer_name]
        original = weight_matrix(layer).clone()
        errors = {}
        for method in ("magnitude", "sparsegpt"):
            weight_matrix(layer).copy_(original)
            if method == "magnitude":
                magnitude.prune_layer(layer, Pattern(0.5))
            else:
                sparsegpt.prune_layer(layer, stats, Pattern(0.5))
            pruned = weight_matrix(layer)
            assert (pruned == 0).sum().item() == round(0.5 * pruned.numel())
            errors[method] = _reconstruction_error(original, pruned, stats.hessian)
            totals[method] += errors[method]
        assert errors["sparsegpt"] < errors["magnitude"], layer_name
    assert totals["sparsegpt"] < 0.9 * totals["magnitude"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_per_layer_allocation_hits_every_target(name: str, method: str, tokenizer, kjv) -> None:
    layers = find_blocks(tiny_model(name)).all_layers()
    targets = {layer: 0.1 * (i % 9) for i, layer in enumerate(layers)}
    model, report = _prune(name, method, tokenizer, kjv["validation"], allocation=targets)
    rows = {row["name"]: row for row in report.to_pylist()}
    for layer_name, layer in find_blocks(model).all_layers().items():
        weight = weight_matrix(layer)
        expected = round(targets[layer_name] * weight.numel()) / weight.numel()
        if method == "wanda":  # per row: round(target * in) zeros in each of the out rows
            expected = round(targets[layer_name] * weight.shape[1]) / weight.shape[1]
        assert rows[layer_name]["target"] == pytest.approx(targets[layer_name])
        assert rows[layer_name]["achieved"] == pytest.approx(expected, abs=1e-12)


def test_unnamed_layers_get_the_default_sparsity_with_a_warning(tokenizer, kjv) -> None:
    only = {"model.layers.0.mlp.up_proj": 0.7}
    with pytest.warns(UserWarning, match="does not name 13 layer"):
        _, report = _prune("tiny-llama", "wanda", tokenizer, kjv["validation"], allocation=only)
    achieved = {row["name"]: row["achieved"] for row in report.to_pylist()}
    assert achieved.pop("model.layers.0.mlp.up_proj") == pytest.approx(0.7, abs=0.01)
    assert set(achieved.values()) == {0.0}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_is_deterministic(method: str, tokenizer, kjv) -> None:
    first, _ = _prune("tiny-llama", method, tokenizer, kjv["validation"], sparsity=0.5)
    second, _ = _prune("tiny-llama", method, tokenizer, kjv["validation"], sparsity=0.5)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_calibration_changes_wanda_masks(tokenizer, kjv) -> None:
    """Wanda is not magnitude: the activation norms move some weights across the cut."""
    wanda_model, _ = _prune("tiny-llama", "wanda", tokenizer, kjv["validation"], sparsity=0.5)
    reference = copy.deepcopy(tiny_model("tiny-llama"))
    prune(reference, method="magnitude", nm=None, sparsity=0.5)
    layer = "model.layers.1.mlp.down_proj"
    mask_w = weight_matrix(find_blocks(wanda_model).all_layers()[layer]) == 0
    mask_m = weight_matrix(find_blocks(reference).all_layers()[layer]) == 0
    assert not torch.equal(mask_w, mask_m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lowest_k_breaks_ties_by_position(dtype: torch.dtype) -> None:
    """Equal scores across the cut go first-position first, as a stable sort; without ties
    the mask is the k lowest. (bfloat16 takes torch's selection, the others numpy's.)"""
    scores = torch.tensor(
        [[3.0, 1.0, 2.0, 1.0, 2.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], dtype=dtype
    )
    mask = lowest_k(scores, 3)
    assert mask.tolist() == [
        [False, True, True, True, False, False],  # both 1s, then the first 2
        [False, False, False, True, True, True],
    ]
    generator = torch.Generator().manual_seed(0)
    for high in (4, 10**6):  # many ties; hardly any
        values = torch.randint(0, high, (50, 40), generator=generator).to(dtype)
        for k in (1, 13, 20, 39, 40):
            order = torch.sort(values, dim=1, stable=True).indices[:, :k]
            expected = torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, True)
            assert torch.equal(lowest_k(values, k), expected), (high, k)
        assert not lowest_k(values, 0).any()


def test_zero_masked_writes_positive_zeros() -> None:
    weight = torch.tensor([[-1.5, 2.0, -3.0], [4.0, -0.5, 6.0]])
    zero_masked(weight, torch.tensor([[True, False, True], [False, True, False]]))
    assert weight.tolist() == [[0.0, 2.0, 0.0], [4.0, 0.0, 6.0]]
    assert not torch.signbit(weight).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_count_zeros_counts_exact_zeros(dtype: torch.dtype) -> None:
    weight = torch.tensor([[0.0, -0.0, 1e-30], [float("nan"), 2.0, 0.0]], dtype=dtype)
    assert count_zeros(weight) == 3
    assert count_zeros(weight.t()) == 3  # a transposed view, as Conv1D's weight matrix
