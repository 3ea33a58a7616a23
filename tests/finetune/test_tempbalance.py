"""TempBalance during training: param groups, factors, schedule interplay, parity with the
spectral step, the sigmoid rule, optimisers and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from steps.core.factory import build_model
from steps.core.training.tempbalance import (
    TempBalance,
    TempBalanceError,
    layer_param_groups,
    pooled_esds,
    sigmoid_interval,
    with_default_interval,
)
from steps.spectral import analyze

torch.set_num_threads(1)


class Conv1D(nn.Module):
    """Stand-in for transformers' Conv1D (matched by class name): weight stored (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.05)
        self.bias = nn.Parameter(torch.zeros(n_out))


class Mixed(nn.Module):
    """Every case the grouping must handle: a raw parameter and a norm before the first
    layer, HF Conv1D, a frozen layer, a custom module, a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.pre_norm = nn.LayerNorm(8)
        self.embed = nn.Embedding(30, 16)
        self.attn = Conv1D(16, 48)
        self.frozen = nn.Linear(48, 16)
        self.frozen.weight.requires_grad_(False)
        self.norm = nn.LayerNorm(16)
        self.gate = nn.Module()
        self.gate.w = nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16, 30, bias=False)
        self.head.weight = self.embed.weight  # tied


def heavy_tailed_stack(nus: list[float], width: int = 96, seed: int = 0) -> nn.Sequential:
    """Linear layers (in, width, ..., 10) whose entries are Student-t(nu): smaller nu gives
    a heavier tail, i.e. a smaller alpha."""
    rng = np.random.default_rng(seed)
    sizes = [width] * (len(nus) + 1) + [10]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(n_in, n_out)
        nu = nus[i] if i < len(nus) else 30.0
        values = rng.standard_t(nu, size=(n_out, n_in)) * 0.05
        linear.weight.data = torch.tensor(values, dtype=torch.float32)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _cnn_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)


def _train_steps(model, optimizer, steps: int = 1, seed: int = 0) -> None:
    x, y = _cnn_batch(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _tb(model: nn.Module, lr: float = 0.1, **kwargs) -> tuple[TempBalance, torch.optim.SGD]:
    optimizer = torch.optim.SGD(layer_param_groups(model, lr), lr=lr)
    return TempBalance(model, optimizer, **kwargs), optimizer


# --- param groups -------------------------------------------------------------------


@pytest.mark.parametrize("make", [Mixed, lambda: build_model("cnn")], ids=["mixed", "cnn"])
def test_groups_cover_every_trainable_parameter_once(make):
    model = make()
    groups = layer_param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["lr"] == 0.1 for g in groups)


def test_norms_biases_and_custom_params_follow_their_layer():
    model = Mixed()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in layer_param_groups(model, 1.0)}
    # The frozen layer and the tied head are not groups; what follows them joins the layer
    # before (attn); what precedes the first layer joins it.
    assert list(groups) == ["embed", "attn"]
    assert groups["embed"] == {id(p) for p in (model.scale, *model.pre_norm.parameters(),
                                                model.embed.weight)}  # fmt: skip
    assert groups["attn"] == {id(p) for p in (model.attn.weight, model.attn.bias,
                                               model.frozen.bias, *model.norm.parameters(),
                                               model.gate.w)}  # fmt: skip

    cnn = build_model("cnn")
    cnn_groups = {g["name"]: g["params"] for g in layer_param_groups(cnn, 1.0)}
    bn = cnn.features[1]
    assert [id(p) for p in cnn_groups["features.0"]] == [
        id(cnn.features[0].weight), id(bn.weight), id(bn.bias)
    ]  # fmt: skip
    assert [id(p) for p in cnn_groups["classifier.1"]] == [
        id(cnn.classifier[1].weight), id(cnn.classifier[1].bias)
    ]  # fmt: skip


# --- factors ------------------------------------------------------------------------


NUS = [1.2, 6.0, 2.0, 20.0, 3.0]  # hidden layers 1..5; layer 0 (first) and the head are out


def test_linear_factors_in_range_and_increasing_with_alpha():
    model = heavy_tailed_stack([4.0, *NUS])
    tb, _ = _tb(model)
    tb.step()
    record = tb.history[-1]
    names = tb.layers[1:-1]
    alphas = np.array([record.alphas[n] for n in names])
    factors = np.array([record.factors[n] for n in names])
    assert len(set(np.round(alphas, 6))) == len(names)  # distinct, so the order means something
    assert factors.min() == pytest.approx(0.5) and factors.max() == pytest.approx(1.5)
    order = np.argsort(alphas)
    assert np.all(np.diff(factors[order]) > 0)  # higher alpha, larger lr
    expected = 0.5 + (alphas - alphas.min()) / (alphas.max() - alphas.min())
    np.testing.assert_allclose(factors, expected, rtol=0, atol=1e-12)
    # Heavier-tailed entries (small nu) give smaller alphas, hence smaller factors.
    assert record.factors[names[0]] < record.factors[names[3]]


def test_custom_lr_range():
    tb, _ = _tb(heavy_tailed_stack([4.0, *NUS]), lr_range=(0.8, 1.1))
    tb.step()
    factors = [tb.factors[n] for n in tb.layers[1:-1]]
    assert min(factors) == pytest.approx(0.8) and max(factors) == pytest.approx(1.1)


def test_excluded_layers_keep_factor_one():
    model = heavy_tailed_stack([4.0, 1.5, 5.0, 2.5, 3.0])
    model[4] = nn.Linear(96, 40)  # 40 eigenvalues < min_evals 50
    model[6] = nn.Linear(40, 96)
    tb, optimizer = _tb(model, lr=0.2)
    tb.step()
    excluded = {tb.layers[0], tb.layers[-1], "4", "6"}
    assert tb.layers == ["0", "2", "4", "6", "8", "10"]
    assert tb.included.tolist() == [False, True, False, False, True, False]
    for group in optimizer.param_groups:
        if group["name"] in excluded:
            assert tb.factors[group["name"]] == 1.0 and group["lr"] == 0.2
            assert math.isnan(tb.history[-1].alphas[group["name"]])
    assert {tb.factors["2"], tb.factors["8"]} == {0.5, 1.5}

    kept = TempBalance(model, optimizer, exclude_first_last=False, min_evals=10)
    assert kept.included.all()


# --- schedule -----------------------------------------------------------------------


def test_cosine_schedule_times_factor_exactly():
    base, epochs = 0.1, 6
    model = build_model("cnn")
    optimizer = torch.optim.SGD(layer_param_groups(model, base), lr=base, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    tb = TempBalance(model, optimizer, scheduler=scheduler)
    tb.step()
    for epoch in range(1, epochs):
        _train_steps(model, optimizer, steps=2, seed=epoch)
        scheduler.step()
        tb.step()
        eta = base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        assert scheduler.get_last_lr() == pytest.approx([eta] * 4, rel=1e-12)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(eta * tb.factors[group["name"]], rel=1e-12)
    # Factors really changed the rates: the two balanced layers are at 0.5x and 1.5x.
    assert sorted(tb.factors.values()) == [0.5, 1.0, 1.0, 1.5]


def test_optimizer_step_uses_the_factored_lr():
    """Plain SGD moves each parameter by exactly -lr_group * grad."""
    model = build_model("cnn")
    optimizer = torch.optim.SGD(layer_param_groups(model, 0.1), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    tb = TempBalance(model, optimizer, scheduler=scheduler)
    _train_steps(model, optimizer)
    scheduler.step()
    tb.step()
    before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
    _train_steps(model, optimizer, seed=1)
    for group, old in zip(optimizer.param_groups, before, strict=True):
        for p, p0 in zip(group["params"], old, strict=True):
            torch.testing.assert_close(p.detach(), p0 - group["lr"] * p.grad, rtol=0, atol=1e-7)


def test_unwrapped_scheduler_is_detected():
    model = build_model("cnn")
    optimizer = torch.optim.SGD(layer_param_groups(model, 0.1), lr=0.1)
    tb = TempBalance(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    tb.step()
    _train_steps(model, optimizer)
    scheduler.step()
    with pytest.raises(TempBalanceError, match="scheduler"):
        tb.step()


def test_every_steps_recomputes_every_k_calls():
    model = build_model("cnn")
    tb, optimizer = _tb(model, every_steps=3)
    done = []
    for _ in range(7):
        _train_steps(model, optimizer)
        done.append(tb.step())
    assert done == [True, False, False, True, False, False, True]
    assert [r.step for r in tb.history] == [1, 4, 7]
    assert tb.esd_seconds == pytest.approx(sum(r.seconds for r in tb.history))
    assert tb.esd_seconds > 0
    assert [sigmoid_interval(n) for n in (5000, 250, 3)] == [100, 25, 1]


def test_default_interval_only_for_sigmoid_without_one():
    assert with_default_interval({"rule": "sigmoid"}, 250)["every_steps"] == 25
    assert with_default_interval({"rule": "sigmoid", "every_steps": 7}, 250)["every_steps"] == 7
    assert "every_steps" not in with_default_interval({"rule": "linear"}, 250)


# --- parity with the spectral step ----------------------------------------------------


@pytest.mark.parametrize("rule,k", [("linear", 2.0), ("sigmoid", 1.5)])
def test_alphas_equal_spectral_analyze(rule, k):
    model = build_model("cnn")
    tb, optimizer = _tb(model, rule=rule, by_block=False)
    _train_steps(model, optimizer, steps=3)
    tb.step()
    table = analyze(model, estimator="hill", hill_k=k, device="cpu", min_evals=50, workers=1)
    reference = dict(zip(table["name"].to_pylist(), table["alpha"].to_pylist(), strict=True))
    assert tb.hill_k == k
    balanced = [n for n, keep in zip(tb.layers, tb.included, strict=True) if keep]
    assert balanced == ["features.3", "classifier.1"]
    for name in balanced:
        assert abs(tb.history[-1].alphas[name] - reference[name]) < 1e-10


# --- sigmoid rule ---------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)


class Blocks(nn.Module):
    """An embedding, three blocks named like a transformer's (layers.i.*) and a head."""

    def __init__(self, width: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(100, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(3))
        self.head = nn.Linear(width, 10)
        rng = np.random.default_rng(seed)
        for i, nu in enumerate([1.5, 4.0, 12.0]):
            for linear in (self.layers[i].q, self.layers[i].up, self.layers[i].down):
                values = rng.standard_t(nu, size=tuple(linear.weight.shape)) * 0.05
                linear.weight.data = torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("kwargs,sides", [({"scale": 0.5}, (0.5, 0.5)),
                                          ({"scale": 2.0}, (2.0, 2.0)),
                                          ({}, (2.0, 1.0)),  # the reference's defaults
                                          ({"scale_low": 0.25, "scale_high": 1.25},
                                           (0.25, 1.25))])
def test_sigmoid_rule_is_the_formula_on_block_means(kwargs, sides):
    model = Blocks()
    tb, optimizer = _tb(model, rule="sigmoid", **kwargs)
    tb.step()
    record = tb.history[-1]
    table = analyze(model, estimator="hill", hill_k=1.5, device="cpu", min_evals=50, workers=1)
    alpha = dict(zip(table["name"].to_pylist(), table["alpha"].to_pylist(), strict=True))
    block_alpha = [np.mean([alpha[f"layers.{b}.{m}"] for m in ("q", "up", "down")])
                   for b in range(3)]  # fmt: skip
    mean = np.mean(block_alpha)
    for b, a_b in enumerate(block_alpha):
        # The reference's stage_sigmoid: sigmoid_max above the mean, sigmoid_min otherwise.
        scale = sides[1] if a_b - mean > 0 else sides[0]
        phi = scale * (1 / (1 + math.exp(-10 * (a_b - mean))) - 0.5)
        for m in ("q", "up", "down"):
            assert record.factors[f"layers.{b}.{m}"] == pytest.approx(10**phi, rel=1e-12)
            assert record.alphas[f"layers.{b}.{m}"] == pytest.approx(alpha[f"layers.{b}.{m}"])
    assert record.factors["embed"] == record.factors["head"] == 1.0
    # Heavier-tailed block 0 learns slower than block 2.
    assert record.factors["layers.0.q"] < 1.0 < record.factors["layers.2.q"]
    lrs = tb.lrs()
    assert lrs["layers.1.up"] == pytest.approx(0.1 * record.factors["layers.1.up"], rel=1e-12)
    assert len(optimizer.param_groups) == 1 + 3 * 3 + 1


def test_sigmoid_by_block_needs_block_names():
    with pytest.raises(TempBalanceError, match="by_block=False"):
        _tb(build_model("cnn"), rule="sigmoid")


# --- optimisers -------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_works_with_torch_optimizers(optimizer_cls):
    model = build_model("cnn")
    kwargs = {"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {"weight_decay": 0.0}
    optimizer = optimizer_cls(layer_param_groups(model, 0.01), lr=0.01, **kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    tb = TempBalance(model, optimizer, scheduler=scheduler)
    tb.step()
    before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
    _train_steps(model, optimizer)
    for group, old in zip(optimizer.param_groups, before, strict=True):
        moved = zip(group["params"], old, strict=True)
        step = max(float((p.detach() - p0).abs().max()) for p, p0 in moved)
        if optimizer_cls is torch.optim.SGD:
            grad = max(float(p.grad.abs().max()) for p in group["params"])
            assert step == pytest.approx(group["lr"] * grad, rel=1e-4)
        else:  # Adam's first step moves each weight by about lr (g / (|g| + eps))
            assert step == pytest.approx(group["lr"], rel=1e-3)
    scheduler.step()
    tb.step()
    assert sorted(tb.factors.values()) == [0.5, 1.0, 1.0, 1.5]


# --- input errors ------------------------------------------------------------------------


@pytest.mark.parametrize("lr_range", [(1.5, 0.5), (1.0, 1.0), (0.0, 1.0), (0.5, float("inf"))])
def test_bad_lr_range(lr_range):
    with pytest.raises(TempBalanceError, match="lr_range"):
        _tb(build_model("cnn"), lr_range=lr_range)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rule": "cubic"}, "unknown rule 'cubic'"),
        ({"scale": 0.0}, "scale"),
        ({"hill_k": 0.5}, "hill_k"),
        ({"every_steps": 0}, "every_steps"),
        ({"min_evals": 10_000}, "no layer left to balance"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tb(build_model("cnn"), **kwargs)


def test_optimizer_over_foreign_parameters_or_a_model_without_layers():
    model = build_model("cnn")
    stranger = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    with pytest.raises(TempBalanceError, match=r"\(3,\).*not a trainable parameter"):
        TempBalance(model, optimizer)
    with pytest.raises(TempBalanceError, match="no trainable"):
        layer_param_groups(nn.Sequential(nn.ReLU()), 0.1)


# --- optimisers as users write them: regrouped per layer --------------------------------


def _epochs(model, optimizer, scheduler, tb, epochs: int = 3) -> list[dict[str, float]]:
    """lrs per layer after the initial step and after each epoch of two training steps."""
    tb.step()
    lrs = [tb.lrs()]
    for epoch in range(epochs):
        _train_steps(model, optimizer, steps=2, seed=epoch)
        scheduler.step()
        tb.step()
        lrs.append(tb.lrs())
    return lrs


def test_one_group_optimizer_gives_the_lrs_of_layer_param_groups():
    from steps.finetune import TempBalance as public

    assert public is TempBalance  # as users import it
    runs = {}
    for route in ("layer_param_groups", "parameters"):
        model = build_model("cnn")
        params = layer_param_groups(model, 0.1) if route == "layer_param_groups" else (
            model.parameters())
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
        tb = TempBalance(model, optimizer, scheduler=scheduler)
        runs[route] = (_epochs(model, optimizer, scheduler, tb), model.state_dict(), optimizer)
    (lrs, weights, grouped), (lrs_one, weights_one, regrouped) = runs.values()
    assert lrs_one == lrs and len(set(lrs[-1].values())) == 3  # 0.5x, 1x, 1.5x of eta_t
    assert [g["name"] for g in regrouped.param_groups] == [g["name"] for g in
                                                         grouped.param_groups]
    for name, value in weights.items():  # the same training, step for step
        torch.testing.assert_close(weights_one[name], value, rtol=0, atol=0)


def test_regrouping_keeps_hyperparameters_and_state():
    model = build_model("cnn")
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0, "lr": 0.002}],
                                  lr=0.001, betas=(0.8, 0.9))
    _train_steps(model, optimizer)  # the optimiser already has state (moments, step)
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
             for p in model.parameters()}
    tb = TempBalance(model, optimizer)
    groups = optimizer.param_groups
    assert {id(p) for g in groups for p in g["params"]} == set(state)
    assert sum(len(g["params"]) for g in groups) == len(state)  # each parameter once
    for group in groups:
        weights = {n.endswith("weight") for n, p in model.named_parameters()
                   if any(p is q for q in group["params"])}
        assert len(weights) == 1  # never a mix of the two original groups
        expected = (0.1, 0.001) if weights == {True} else (0.0, 0.002)
        assert (group["weight_decay"], group["schedule_lr"]) == expected
        assert group["betas"] == (0.8, 0.9) and group["name"] in tb.layers
    for p in model.parameters():
        for key, value in state[id(p)].items():
            assert torch.equal(optimizer.state[p][key], value)
    tb.step()
    _train_steps(model, optimizer, seed=1)  # Adam continues from its moments


def test_torch_esd_equals_the_float64_numpy_path():
    """The in-training ESD (torch eigvalsh) against the spectral step's numpy kernel."""
    from steps.core.esd import compute_spectra_batch
    from steps.core.fits import fit_power_law

    model = Mixed()
    cnn = build_model("cnn")
    _train_steps(cnn, torch.optim.SGD(cnn.parameters(), lr=0.1), steps=2)
    tensors = [(cnn.features[0].weight, "conv2d"), (cnn.features[3].weight, "conv2d"),
               (cnn.classifier[1].weight, "linear"), (model.attn.weight.T, "conv1d"),
               (model.embed.weight, "embedding"), (heavy_tailed_stack([2.0]).get_submodule(
                   "0").weight, "linear")]
    for tensor, kind in tensors:
        (evals,) = pooled_esds([tensor.detach()], kind, "cpu")
        ((reference,),) = compute_spectra_batch([tensor.detach()], kind, device="cpu")
        np.testing.assert_allclose(evals, reference.evals, rtol=1e-9, atol=1e-12 * evals.max())
        for k in (1.5, 2.0):
            alpha = fit_power_law(evals, estimator="hill", hill_k=k).alpha
            expected = fit_power_law(reference.evals, estimator="hill", hill_k=k).alpha
            assert alpha == pytest.approx(expected, rel=1e-9, abs=0)
    nan = torch.full((20, 30), float("nan"))
    assert pooled_esds([nan, torch.ones(20, 30)], "linear", "cpu")[0] is None
