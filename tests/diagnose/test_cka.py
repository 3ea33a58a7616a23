"""Linear CKA: identities, invariances, agreement with the explicit HSIC formula, hooks."""

from __future__ import annotations

import pytest
import torch

from steps.core.errors import TailwiseError
from steps.core.factory import build_model
from steps.diagnose.cka import collect_representations, linear_cka, output_cka
from steps.diagnose.connectivity import permute_mlp_hidden


def features(n: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(p: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(features(p, p, seed))[0]


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The textbook form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), H = I - 11^T / n."""
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, lmat = x @ x.T, y @ y.T

    def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, lmat) / torch.sqrt(hsic(k, k) * hsic(lmat, lmat)))


def test_cka_of_a_representation_with_itself_is_one() -> None:
    x = features(40, 7, 0)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x.float(), x.float()) == pytest.approx(1.0, abs=1e-12)


def test_both_forms_match_the_explicit_hsic_formula() -> None:
    x, y = features(30, 5, 1), features(30, 8, 2) + 0.5 * features(30, 8, 3)
    expected = hsic_cka(x, y)
    assert 0.0 < expected < 1.0
    for form in ("feature", "gram", "auto"):
        assert linear_cka(x, y, form=form) == pytest.approx(expected, abs=1e-12)
    # Trailing shapes are flattened: (N, C, H, W) behaves like (N, C*H*W).
    images = features(30, 12, 4).reshape(30, 3, 2, 2)
    assert linear_cka(images, y) == pytest.approx(hsic_cka(images.reshape(30, -1), y), abs=1e-12)


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling() -> None:
    x = features(50, 10, 5)
    y = x @ features(10, 6, 6) + 0.3 * features(50, 6, 7)
    base = linear_cka(x, y)
    assert linear_cka(x @ orthogonal(10, 8), y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 3.7 * y @ orthogonal(6, 9)) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, abs=1e-12)  # centring


def test_cka_is_not_invariant_to_a_generic_linear_map() -> None:
    x = features(50, 10, 5)
    y = x @ features(10, 6, 6) + 0.3 * features(50, 6, 7)
    stretch = torch.diag(torch.logspace(-2, 1, 10, dtype=torch.float64)) @ orthogonal(10, 8)
    assert abs(linear_cka(x @ stretch, y) - linear_cka(x, y)) > 1e-2


def test_bad_inputs_raise() -> None:
    with pytest.raises(TailwiseError, match="samples"):
        linear_cka(features(5, 2, 0), features(6, 2, 0))
    with pytest.raises(TailwiseError, match="constant"):
        linear_cka(torch.ones(5, 3), features(5, 2, 0))


def test_collect_representations_records_named_module_outputs() -> None:
    model = build_model("mlp", seed=0).train()
    x = torch.rand(70, 64, generator=torch.Generator().manual_seed(0))
    reps = collect_representations(model, x, ["layers.1", "layers.4"], batch_size=32)
    assert reps["layers.1"].shape == (70, 128)
    assert model.training  # the mode is restored
    with torch.no_grad():
        assert torch.allclose(reps["layers.4"], model.eval()(x))
        assert torch.equal(reps["layers.1"], torch.relu(model.layers[0](x)))
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(TailwiseError, match="not in the model"):
        collect_representations(model, x, ["nope"])


def test_output_cka_sees_a_permuted_copy_as_identical_and_another_seed_as_different() -> None:
    model = build_model("mlp", seed=0)
    x = torch.rand(100, 64, generator=torch.Generator().manual_seed(1))
    assert output_cka(model, permute_mlp_hidden(model, seed=3), x) == pytest.approx(1.0,
                                                                                    abs=1e-6)
    assert output_cka(model, build_model("mlp", seed=1), x) < 0.99
