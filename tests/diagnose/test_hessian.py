"""Hessian toolkit: HVPs, power iteration, Hutchinson and SLQ against exact float64 Hessians."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from steps.core.errors import TailwiseError
from steps.diagnose.hessian import (
    HessianOperator,
    hessian_operator,
    hutchinson_trace,
    spectral_density,
    top_eigenvalue,
)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_batch(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


def exact_hessian(op: HessianOperator) -> torch.Tensor:
    """The dense Hessian of the operator's weighted loss, by torch.func.hessian."""
    def flat_loss(theta: torch.Tensor) -> torch.Tensor:
        params = op.unflatten(theta)
        return sum(w * f(params) for f, w in zip(op.losses, op.weights, strict=True))

    return hessian(flat_loss)(op.flatten(op.params))


@pytest.mark.parametrize(("mode", "reuse"), [("vjp", True), ("vjp", False), ("jvp", True)])
def test_hvp_equals_exact_hessian_times_v(mode: str, reuse: bool) -> None:
    op = hessian_operator(tiny_net(), tiny_batch(), mode=mode, reuse_graph=reuse)
    exact = exact_hessian(op)
    assert exact.shape == (op.dim, op.dim)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
        assert torch.allclose(op.hvp(v), exact @ v, rtol=0, atol=1e-10)
    as_dict = op.hvp(op.unflatten(v))
    assert set(as_dict) == set(op.params)
    assert torch.allclose(op.flatten(as_dict), exact @ v, rtol=0, atol=1e-10)


def test_gradient_and_loss_match_autograd() -> None:
    model = tiny_net()
    x, y = tiny_batch()
    op = hessian_operator(model, [(x[:5], y[:5]), (x[5:], y[5:])])
    loss = F.cross_entropy(model(x), y)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
    assert torch.allclose(op.gradient(), expected, rtol=0, atol=1e-12)
    assert op.loss() == pytest.approx(float(loss.detach()), abs=1e-12)


def test_list_of_batches_is_the_mean_loss_over_all_samples() -> None:
    model = tiny_net()
    x, y = tiny_batch(12)
    split = hessian_operator(model, [(x[:8], y[:8]), (x[8:], y[8:])])
    whole = hessian_operator(model, (x, y))
    v = torch.randn(split.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(split.hvp(v), exact_hessian(whole) @ v, rtol=0, atol=1e-10)


def test_batchnorm_model_is_evaluated_in_eval_mode_and_mode_is_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model = model.double()
    x, y = tiny_batch()
    with torch.no_grad():
        model.train()(x)  # move the running statistics away from their initial values
    op = hessian_operator(model, (x, y))
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hv = op.hvp(v)
    assert model.training
    model.eval()
    assert torch.allclose(hv, exact_hessian(hessian_operator(model, (x, y))) @ v, atol=1e-10)
    # Train mode (batch statistics) is a different function: its Hessian differs.
    batch_stats = torch.func.replace_all_batch_norm_modules_(copy.deepcopy(model).train())

    def train_mode_loss(theta: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(batch_stats, op.unflatten(theta), (x,))
        return F.cross_entropy(out, y)

    train_h = hessian(train_mode_loss)(op.flatten(op.params))
    assert not torch.allclose(hv, train_h @ v, atol=1e-6)


def test_hutchinson_is_within_four_standard_errors_of_the_exact_trace() -> None:
    op = hessian_operator(tiny_net(), tiny_batch())
    exact = float(torch.trace(exact_hessian(op)))
    est = hutchinson_trace(op, probes=200, seed=0)
    assert est.probes == 200 and len(est.samples) == 200
    assert est.stderr > 0
    assert abs(est.mean - exact) <= 4 * est.stderr
    assert hutchinson_trace(op, probes=200, seed=0).mean == est.mean  # seeded


def test_hutchinson_confidence_stop() -> None:
    op = hessian_operator(tiny_net(), tiny_batch())
    exact = float(torch.trace(exact_hessian(op)))
    est = hutchinson_trace(op, rtol=0.2, min_probes=10, max_probes=5000, seed=1)
    assert 10 <= est.probes < 5000
    assert 1.96 * est.stderr <= 0.2 * abs(est.mean)
    assert abs(est.mean - exact) <= 4 * est.stderr


def test_top_eigenvalue_of_a_network_matches_eigvalsh() -> None:
    op = hessian_operator(tiny_net(), tiny_batch())
    eigenvalues = torch.linalg.eigvalsh(exact_hessian(op))
    dominant = float(eigenvalues[eigenvalues.abs().argmax()])
    top = top_eigenvalue(op, max_iter=5000, tol=1e-12, seed=0)
    assert top.converged
    assert abs(top.value - dominant) <= 1e-3


def quadratic(eigenvalues: list[float], seed: int = 0) -> tuple[HessianOperator, torch.Tensor]:
    """0.5 x^T A x with A = Q diag(eigenvalues) Q^T, as a Hessian operator (at a random x)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    return HessianOperator([lambda p: 0.5 * p["x"] @ a @ p["x"]], {"x": x0}), a


@pytest.mark.parametrize("eigenvalues", [[-6.0, 4.0, 3.0, 1.0, -2.0, 0.5],
                                         [6.0, -4.0, 3.0, 1.0, -2.0, 0.5]])
def test_top_eigenvalue_is_largest_in_magnitude_with_its_sign(eigenvalues: list[float]) -> None:
    op, a = quadratic(eigenvalues)
    top = top_eigenvalue(op, max_iter=1000, tol=1e-10, seed=0)
    exact = torch.linalg.eigvalsh(a)
    assert abs(top.value - float(exact[exact.abs().argmax()])) <= 1e-3
    assert abs(top.value - eigenvalues[0]) <= 1e-3
    # The returned vector is an eigenvector of that eigenvalue.
    assert torch.allclose(a @ top.vector, top.value * top.vector, atol=1e-3)


def test_slq_weights_sum_to_one_and_weighted_mean_approximates_trace_over_n() -> None:
    op = hessian_operator(tiny_net(), tiny_batch())
    exact_h = exact_hessian(op)
    slq = spectral_density(op, runs=30, steps=10, seed=0)
    assert len(slq.nodes) == len(slq.weights) == 30
    means = []
    for nodes, weights in zip(slq.nodes, slq.weights, strict=True):
        assert len(nodes) == len(weights) == 10
        assert abs(float(weights.sum()) - 1.0) <= 1e-12
        assert (weights >= 0).all()
        means.append(float(nodes @ weights))
    means_t = torch.tensor(means, dtype=torch.float64)
    stderr = float(means_t.std() / len(means) ** 0.5)
    assert abs(float(means_t.mean()) - float(torch.trace(exact_h)) / op.dim) <= 4 * stderr
    # The Ritz values lie inside the spectrum.
    spectrum = torch.linalg.eigvalsh(exact_h)
    assert all(float(n.min()) >= float(spectrum[0]) - 1e-9 for n in slq.nodes)
    assert all(float(n.max()) <= float(spectrum[-1]) + 1e-9 for n in slq.nodes)


def test_full_lanczos_recovers_the_spectrum_and_the_density_integrates_to_one() -> None:
    op, a = quadratic([-3.0, -1.0, 0.5, 2.0, 5.0])
    slq = spectral_density(op, runs=2, steps=50, seed=0)  # steps capped at dim = 5
    for nodes in slq.nodes:
        assert torch.allclose(nodes, torch.linalg.eigvalsh(a), atol=1e-8)
    grid, density = slq.density(points=4001, sigma=0.05, pad=0.2)
    assert abs(float(torch.trapezoid(density, grid)) - 1.0) <= 1e-3


def test_bad_vectors_raise_tailwise_errors() -> None:
    op = hessian_operator(tiny_net(), tiny_batch())
    with pytest.raises(TailwiseError, match="flat vector"):
        op.hvp(torch.zeros(op.dim + 1, dtype=torch.float64))
    with pytest.raises(TailwiseError, match="keys"):
        op.hvp({"nope": torch.zeros(3)})
    with pytest.raises(TailwiseError, match="probes"):
        hutchinson_trace(op, probes=0)
