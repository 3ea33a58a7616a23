"""Mode connectivity: LMC barriers, Bezier curves and BatchNorm re-estimation on digits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from steps.core.data import digits_images, labelled_dataset
from steps.core.errors import TailwiseError
from steps.core.factory import build_model
from steps.core.training import evaluate, train
from steps.diagnose.connectivity import (
    BezierCurve,
    evaluate_curve,
    linear_path,
    mode_connectivity,
    permute_mlp_hidden,
    reestimate_bn,
    reference_lr_factor,
    train_bezier,
    train_bezier_reference,
)


def trained(name: str, seed: int, epochs: int = 3) -> tuple[nn.Module, tuple]:
    """A factory model trained (seeded) on digits; returns it and its (x, y) training data."""
    data = labelled_dataset("digits", seed=0)
    if name == "cnn":
        x = torch.from_numpy(digits_images(data.x_train))
    else:
        x = torch.from_numpy(data.x_train / 16.0).float()
    y = torch.from_numpy(data.y_train)
    model = build_model(name, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, (x, y), None, optimizer=optimizer, epochs=epochs, seed=seed)
    return model.eval(), (x, y)


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, tuple]:
    return trained("mlp", seed=0)


@pytest.fixture(scope="module")
def cnns() -> tuple[nn.Module, nn.Module, tuple]:
    model_a, data = trained("cnn", seed=0, epochs=2)
    model_c, _ = trained("cnn", seed=1, epochs=2)
    return model_a, model_c, (data[0][:512], data[1][:512])


def test_mode_connectivity_follows_methods_definition() -> None:
    assert mode_connectivity([10.0, 30.0, 12.0]) == 11.0 - 30.0  # a barrier: mc < 0
    assert mode_connectivity([10.0, 5.0, 12.0]) == 11.0 - 5.0
    assert mode_connectivity([10.0, 11.0, 12.0]) == 1.0  # endpoints deviate most
    with pytest.raises(TailwiseError):
        mode_connectivity([1.0])


def test_lmc_of_a_model_with_itself_has_no_barrier(mlp) -> None:
    model, data = mlp
    path = linear_path(model, model, data, points=11)
    assert path.ts[0] == 0.0 and path.ts[-1] == 1.0 and len(path.ts) == 11
    assert path.mc == 0.0
    assert abs(path.mc_loss) < 1e-5
    assert max(path.losses) - min(path.losses) < 1e-5


def test_permuted_copy_is_identical_but_the_straight_line_has_a_barrier(mlp) -> None:
    model, (x, y) = mlp
    permuted = permute_mlp_hidden(model, seed=0)
    assert not torch.equal(permuted.layers[0].weight, model.layers[0].weight)
    with torch.no_grad():
        assert torch.allclose(permuted(x), model(x), atol=1e-5)
    path = linear_path(model, permuted, (x, y), points=11)
    assert abs(path.losses[0] - path.losses[-1]) < 1e-5
    assert path.errors[0] < 15.0  # the model did learn
    assert path.mc_loss < -0.1  # barrier height -mc_loss
    assert path.mc < 0.0
    assert max(path.errors[1:-1]) > path.errors[0]


def test_a_list_of_batches_gives_the_size_weighted_mean(mlp) -> None:
    model, (x, y) = mlp
    permuted = permute_mlp_hidden(model, seed=1)
    whole = linear_path(model, permuted, (x, y), points=3)
    split = linear_path(model, permuted, [(x[:300], y[:300]), (x[300:], y[300:])], points=3)
    assert split.losses == pytest.approx(whole.losses, abs=1e-6)
    assert split.errors == pytest.approx(whole.errors, abs=1e-4)  # float32 accuracies


def test_permute_rejects_a_model_whose_linears_do_not_chain() -> None:
    with pytest.raises(TailwiseError, match="chain"):
        permute_mlp_hidden(nn.Sequential(nn.Linear(4, 5), nn.Linear(6, 2)))


def test_bn_reestimation_changes_running_stats_deterministically(cnns) -> None:
    model_a, _, (x, _) = cnns
    bn = model_a.features[1]
    first, second = copy.deepcopy(model_a), copy.deepcopy(model_a)
    reestimate_bn(first, [(x[:256], None), (x[256:], None)])
    reestimate_bn(second, [(x[:256], None), (x[256:], None)])
    bn1, bn2 = first.features[1], second.features[1]
    assert not torch.allclose(bn1.running_mean, bn.running_mean)
    assert not torch.allclose(bn1.running_var, bn.running_var)
    assert torch.equal(bn1.running_mean, bn2.running_mean)
    assert torch.equal(bn1.running_var, bn2.running_var)
    assert int(bn1.num_batches_tracked) == 2
    assert bn1.momentum == bn.momentum and not first.training  # restored


def test_bn_reestimation_from_one_batch_gives_the_batch_statistics(cnns) -> None:
    model_a, _, (x, y) = cnns
    model = copy.deepcopy(model_a)
    reestimate_bn(model, (x, y), batch_size=len(x))
    with torch.no_grad():
        conv = model.features[0](x)
    bn = model.features[1]
    assert torch.allclose(bn.running_mean, conv.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, conv.var((0, 2, 3), unbiased=True), rtol=1e-4)


def test_untrained_bezier_is_the_linear_path(cnns) -> None:
    model_a, model_c, data = cnns
    curve = BezierCurve(model_a, model_c)
    for bn_data in (None, data):
        on_curve = evaluate_curve(curve, data, bn_data=bn_data)
        straight = linear_path(model_a, model_c, data, points=5, bn_data=bn_data)
        assert on_curve.ts == straight.ts == (0.0, 0.25, 0.5, 0.75, 1.0)
        assert on_curve.losses == pytest.approx(straight.losses, abs=1e-5)
        assert on_curve.errors == pytest.approx(straight.errors, abs=1e-9)


def test_trained_bezier_reproduces_the_endpoints_and_lowers_the_middle(cnns) -> None:
    model_a, model_c, data = cnns
    straight = evaluate_curve(BezierCurve(model_a, model_c), data, bn_data=data)
    curve = BezierCurve(model_a, model_c, seed=0)
    train_bezier(curve, data, epochs=3, lr=0.02, seed=0)
    moved = max(float((b.detach() - (curve.start[k] + curve.end[k]) / 2).abs().max())
                for k, b in zip(curve.names, curve.bend, strict=True))
    assert moved > 1e-3
    path = evaluate_curve(curve, data)
    for t_index, model in ((0, model_a), (-1, model_c)):
        own_loss, own_accuracy = evaluate(model, data, "classification", F.cross_entropy)
        assert path.losses[t_index] == pytest.approx(own_loss, abs=1e-6)
        assert path.errors[t_index] == pytest.approx(100 * (1 - own_accuracy), abs=1e-9)
    bent = evaluate_curve(curve, data, bn_data=data)
    assert bent.losses[2] < straight.losses[2]
    assert bent.peak == -max(bent.errors[1:-1])
    # Seeded: the same training gives the same bend.
    again = BezierCurve(model_a, model_c, seed=0)
    train_bezier(again, data, epochs=3, lr=0.02, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(curve.bend, again.bend, strict=True))


def test_mismatched_models_are_rejected() -> None:
    with pytest.raises(TailwiseError, match="state dicts"):
        linear_path(build_model("mlp"), build_model("cnn"), (torch.zeros(2, 64), None))


def test_reference_curve_schedule_steps_down_as_the_reference():
    # Mode_connectivity.py learning_rate_schedule, epochs 1..10 of 10.
    factors = [reference_lr_factor(e, 10) for e in range(1, 11)]
    expected = [1.0] * 5 + [1 - (a - 0.5) / 0.4 * 0.99 for a in (0.6, 0.7, 0.8, 0.9)] + [0.01]
    assert factors == pytest.approx(expected, abs=1e-12)
    assert factors[8] == pytest.approx(0.01)


def test_reference_bend_step_is_sgd_on_the_loss_plus_l2_of_the_curve_point(mlp) -> None:
    model_a, (x, y) = mlp
    model_c = copy.deepcopy(model_a)
    with torch.no_grad():
        for p in model_c.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x, y = x[:50], y[:50]
    curve = BezierCurve(model_a, model_c, seed=3)
    before = [b.detach().clone() for b in curve.bend]
    train_bezier_reference(curve, (x, y), epochs=1, lr=0.5, weight_decay=0.1, batch_size=64)
    # By hand: one batch (all 50), t the curve generator's first draw, lr factor 0.01 (the
    # last 10 % of training), no momentum history yet.
    t = float(torch.rand((), generator=torch.Generator().manual_seed(3)))
    bends = [b.clone().requires_grad_() for b in before]
    a = dict(model_a.named_parameters())
    c = dict(model_c.named_parameters())
    point = {k: (1 - t) ** 2 * a[k].detach() + 2 * t * (1 - t) * b + t ** 2 * c[k].detach()
             for k, b in zip(a, bends, strict=True)}
    template = copy.deepcopy(model_a).train()
    loss = F.cross_entropy(functional_call(template, point, (x,)), y)
    loss = loss + 0.5 * 0.1 * sum((p ** 2).sum() for p in point.values())
    grads = torch.autograd.grad(loss, bends)
    for b, b0, g in zip(curve.bend, before, grads, strict=True):
        assert torch.allclose(b.detach(), b0 - 0.5 * 0.01 * g, rtol=1e-5, atol=1e-7)
