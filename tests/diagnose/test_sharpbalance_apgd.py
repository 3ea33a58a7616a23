"""SharpBalance's sharpness against a float64 port of its reference (SharpBalance
sharpness_utils.py: eval_APGD_sharpness, weight_ascent_step_momentum, eval_average_sharpness;
models LogitNormalizationWrapper), written from the reference code and sharing nothing with
steps/: the port perturbs a copy of the model in place, as the reference does."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from steps.diagnose.sharpbalance import apgd_checkpoints, sharpness

BATCH, N_BATCHES = 5, 4


class _LogitNormalised(nn.Module):
    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.normalize:
            out = out - out.mean(dim=-1, keepdim=True)
            norms = out.norm(dim=-1, keepdim=True)
            out = out / torch.max(norms, 1e-10 * torch.ones_like(norms))
        return out


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="mean")


def _port_checkpoints(n_iters: int) -> list[int]:
    p, w = [0, 0.22], [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    return w[1:]


def _port_ascent_step(model, x, y, orig, delta, prev, step, rho, adaptive, norm):
    backup = {p: delta[p].clone() for p in delta}
    for p in model.parameters():
        p.grad = None
    _loss(model, x, y).backward()
    with torch.no_grad():
        if norm == "l2":
            gnorm = sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5
            for p in model.parameters():
                delta[p] += step / (gnorm + 1e-12) * p.grad * (orig[p].abs() if adaptive else 1)
        else:
            for p in model.parameters():
                delta[p] += step * p.grad.sign() * (orig[p].abs() if adaptive else 1)
        if norm == "l2":
            def wnorm(d):
                return sum(((d[p] / (orig[p].abs() if adaptive else 1)) ** 2).sum()
                           for p in d) ** 0.5
            if not adaptive:
                n = wnorm(delta)
                if n > rho:
                    for p in delta:
                        delta[p] *= rho / n
            else:
                lmbd, lo, hi, limit = 0.1, 0.0, 10.0, 10.0
                tmp = {p: delta[p].clone() for p in delta}
                new = wnorm(tmp)
                if new > rho:
                    while (new - rho).abs() > 1e-5:
                        for p in delta:
                            c = 1 / orig[p].abs()
                            tmp[p] = delta[p] / (1 + 2 * lmbd * c**2)
                        new = wnorm(tmp)
                        if new > rho:
                            lmbd, lo = (lmbd + hi) / 2, lmbd
                        else:
                            lmbd, hi = (lo + lmbd) / 2, lmbd
                        if limit - hi < 1e-2:
                            limit, hi = limit * 2, hi * 2
                delta = {p: tmp[p].clone() for p in tmp}
        else:
            for p in delta:
                bound = orig[p].abs() if adaptive else torch.ones_like(orig[p])
                delta[p] = torch.max(torch.min(delta[p], bound * rho), -bound * rho)
        for p in model.parameters():
            delta[p] = 0.75 * delta[p] + 0.25 * prev[p]
        for p in model.parameters():
            p.data = orig[p] + delta[p]
        for p in model.parameters():
            prev[p] = backup[p]
    return delta, prev


def _port_worst(model, batches, rho, n_iters, adaptive, norm):
    orig_state = copy.deepcopy(model.state_dict())
    orig = {p: p.clone() for p in model.parameters()}
    w = _port_checkpoints(n_iters)
    total_worst, total_init = 0.0, 0.0
    for x, y in batches:
        with torch.no_grad():
            init = _loss(model, x, y).item()
        total_init += init
        delta = {p: torch.zeros_like(p) for p in model.parameters()}
        prev = {p: delta[p].clone() for p in delta}
        worst_state = copy.deepcopy(model.state_dict())
        prev_worst = worst = init
        step = prev_step = 2 * rho
        prev_cp, updates = 0, 0
        for i in range(n_iters):
            delta, prev = _port_ascent_step(model, x, y, orig, delta, prev, step, rho,
                                            adaptive, norm)
            with torch.no_grad():
                curr = _loss(model, x, y).item()
                if curr > worst:
                    worst, updates = curr, updates + 1
                    worst_state = copy.deepcopy(model.state_dict())
                if i in w:
                    cond1 = updates < 0.75 * (i - prev_cp)
                    cond2 = prev_step == step and prev_worst == worst
                    prev_step, prev_worst, prev_cp, updates = step, worst, i, 0
                    if cond1 or cond2:
                        step *= 0.5
                        model.load_state_dict(worst_state)
        total_worst += worst
        model.load_state_dict(orig_state)
    return (total_worst - total_init) / len(batches)


def _port_average(model, batches, rho, n_iters, adaptive, norm, gen):
    orig = {name: p.clone() for name, p in model.named_parameters()}
    noisy = copy.deepcopy(model)
    total, total_init = 0.0, 0.0
    with torch.no_grad():
        for x, y in batches:
            total_init += _loss(model, x, y).item()
            batch = 0.0
            for _ in range(n_iters):
                for name, p in noisy.named_parameters():
                    if norm == "l2":
                        d = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                    else:
                        d = 2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1
                    d *= rho * (orig[name].abs() if adaptive else 1)
                    p.data = orig[name] + d
                batch += _loss(noisy, x, y).item()
            total += batch / n_iters
    return (total - total_init) / len(batches)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = BATCH * N_BATCHES + 3  # a tail batch the measure must leave out (max_batches)
    return (torch.randn(n, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=gen))


def _batches(x, y):
    return list(zip(x.split(BATCH), y.split(BATCH), strict=True))[:N_BATCHES]


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("normalize_logits", [True, False])
def test_worst_case_sharpness_equals_the_reference_port(norm, adaptive, normalize_logits):
    model, (x, y) = _mlp(), _data()
    rho = 0.5 if norm == "l2" else 0.05
    before = [p.clone() for p in model.parameters()]
    got = sharpness(model, x, y, rho, norm=norm, adaptive=adaptive,
                    normalize_logits=normalize_logits, batch_size=BATCH, max_batches=N_BATCHES)
    port = _port_worst(_LogitNormalised(copy.deepcopy(model), normalize_logits),
                       _batches(x, y), rho, 20, adaptive, norm)
    assert port > 0
    assert got == pytest.approx(port, rel=1e-9, abs=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_average_sharpness_equals_the_reference_port(norm, adaptive):
    model, (x, y) = _mlp(), _data()
    got = sharpness(model, x, y, 0.1, kind="average", norm=norm, adaptive=adaptive,
                    batch_size=BATCH, max_batches=N_BATCHES,
                    generator=torch.Generator().manual_seed(7))
    port = _port_average(_LogitNormalised(copy.deepcopy(model), True), _batches(x, y), 0.1,
                         100, adaptive, norm, torch.Generator().manual_seed(7))
    assert got == pytest.approx(port, rel=1e-9, abs=1e-12)


def test_checkpoints_are_the_reference_schedule():
    for n in (5, 20, 100):
        assert apgd_checkpoints(n) == _port_checkpoints(n)
    # Fractions 0.22, 0.41, 0.57, 0.70, ...; 0.70 * 20 rounds up to 15 in floating point.
    assert apgd_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19, 20]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_worst_case_sharpness_is_zero_at_rho_zero_and_grows_with_rho(norm):
    model, (x, y) = _mlp(seed=3), _data(seed=4)
    values = [sharpness(model, x, y, rho, norm=norm, batch_size=BATCH, max_batches=N_BATCHES)
              for rho in (0.0, 0.01, 0.05, 0.2)]
    assert values[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(values))


def test_bad_kind_or_norm_is_refused():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(ValueError, match="kind"):
        sharpness(model, x, y, 0.1, kind="best")
    with pytest.raises(ValueError, match="norm"):
        sharpness(model, x, y, 0.1, norm="l1")
