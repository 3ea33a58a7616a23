"""Mode connectivity: loss and error along paths between two trained models' weights.

    path = linear_path(model_a, model_c, (x, y), points=11, bn_data=(x, y))
    path.mc                    # (E0 + E1) / 2 - E(t*), E = train error %; < 0 is a barrier
    curve = BezierCurve(model_a, model_c)          # bend b at the endpoints' midpoint
    train_bezier(curve, (x, y), epochs=20, lr=0.05, seed=0)
    curve_path = evaluate_curve(curve, (x, y), bn_data=(x, y))   # t in {0, .25, .5, .75, 1}
    curve_path.peak            # mode_connectivity_peak = -max over interior t of error %

Definitions (METHODS.md section 4): on the straight line (11 points) mc = (E0 + E1) / 2 -
E(t*) with t* = argmax over the path's t of |(E0 + E1) / 2 - E(t)|; mc < 0 is a barrier, so
the barrier height is -mc. ``PathResult.mc_loss`` is the same formula on the loss. The
Bezier curve phi(t) = (1-t)^2 a + 2t(1-t) b + t^2 c has its bend b trained by SGD with
t ~ U(0, 1) per batch; a bend at (a + c) / 2 gives exactly the straight line.

BatchNorm: with ``bn_data`` the running statistics of every point on a path are re-estimated
from it (``reestimate_bn``); without it, float buffers are interpolated linearly between the
endpoints (the bend has no buffers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from steps.core.errors import ParamsError
from steps.core.training import batches, evaluate, train, weighted_mean

__all__ = [
    "BezierCurve",
    "PathResult",
    "evaluate_curve",
    "interpolate_state",
    "linear_path",
    "mode_connectivity",
    "permute_mlp_hidden",
    "reestimate_bn",
    "train_bezier",
]

State = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
Data = Batch | Sequence[Batch] | DataLoader
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CURVE_TS = (0.0, 0.25, 0.5, 0.75, 1.0)


class ConnectivityError(ParamsError):
    """Bad input to a mode-connectivity computation (mismatched models, bad t grid)."""


# ------------------------------------------------------------------------ weights


def _check_compatible(a: nn.Module, c: nn.Module) -> None:
    sa, sc = a.state_dict(), c.state_dict()
    if sa.keys() != sc.keys():
        raise ConnectivityError("models: their state dicts have different entries")
    for key, value in sa.items():
        if value.shape != sc[key].shape or value.dtype != sc[key].dtype:
            raise ConnectivityError(f"models: entry {key!r} is {tuple(value.shape)} "
                                    f"{value.dtype} vs {tuple(sc[key].shape)} {sc[key].dtype}")


def interpolate_state(a: State, c: State, t: float) -> State:
    """(1 - t) a + t c for floating-point entries (exact at t = 0 and 1); others from a."""
    return {k: (1 - t) * v + t * c[k] if v.is_floating_point() else v.clone()
            for k, v in a.items()}


def _with_state(template: nn.Module, state: State) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def permute_mlp_hidden(model: nn.Module, seed: int = 0) -> nn.Module:
    """A functionally identical copy of an MLP with each hidden layer's units permuted.

    The model's ``nn.Linear`` layers, in module order, must form a chain (each one's
    out_features is the next one's in_features) with elementwise activations between them:
    hidden layer l's rows (weight and bias) and layer l+1's columns get the same seeded
    permutation. The output layer is not permuted.
    """
    permuted = copy.deepcopy(model)
    linears = [m for m in permuted.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ConnectivityError(f"permute_mlp_hidden: need >= 2 Linear layers, got "
                                f"{len(linears)}")
    for first, second in zip(linears, linears[1:], strict=False):
        if first.out_features != second.in_features:
            raise ConnectivityError(f"permute_mlp_hidden: Linear layers do not chain "
                                    f"({first.out_features} outputs -> "
                                    f"{second.in_features} inputs)")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, following in zip(linears, linears[1:], strict=False):
            order = torch.randperm(layer.out_features, generator=gen)
            layer.weight.copy_(layer.weight[order])
            if layer.bias is not None:
                layer.bias.copy_(layer.bias[order])
            following.weight.copy_(following.weight[:, order])
    return permuted


# -------------------------------------------------------------------- BatchNorm


def _inputs(data: Data, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, tuple | DataLoader):
        return (x for x, _ in batches(data, batch_size, None))
    return (x for x, _ in data)


@torch.no_grad()
def reestimate_bn(model: nn.Module, data: Data, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from ``data``, in place.

    The statistics are reset and ``momentum`` set to None (a cumulative average over the
    batches); the BatchNorm layers run in train mode under no_grad while every other module
    stays in its mode (dropout off when the model is in eval mode, so the result is
    deterministic). Batches are taken in order; momenta and modes are restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum, m.training) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        for x in _inputs(data, batch_size):
            model(x)
            seen += 1
        if seen == 0:
            raise ConnectivityError("bn_data: no batches to re-estimate BatchNorm from")
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return model


# ------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class PathResult:
    """Mean loss and error (%) at each t along a path between two models."""

    ts: tuple[float, ...]
    losses: tuple[float, ...]
    errors: tuple[float, ...]  # 100 * (1 - accuracy)

    @property
    def mc(self) -> float:
        """METHODS.md's mode connectivity on the error: < 0 is a barrier of height -mc."""
        return mode_connectivity(self.errors)

    @property
    def mc_loss(self) -> float:
        """The same formula on the loss."""
        return mode_connectivity(self.losses)

    @property
    def peak(self) -> float:
        """mode_connectivity_peak: -max over interior t of the error (%)."""
        interior = [e for t, e in zip(self.ts, self.errors, strict=True) if 0.0 < t < 1.0]
        if not interior:
            raise ConnectivityError("path: no interior point (0 < t < 1) for the peak")
        return -max(interior)


def mode_connectivity(values: Sequence[float]) -> float:
    """(v0 + v1) / 2 - v(t*), t* = argmax_t |(v0 + v1) / 2 - v(t)| (first on ties).

    ``values`` run along the path from t = 0 to t = 1; a model with itself gives 0.
    """
    if len(values) < 2:
        raise ConnectivityError(f"path: need >= 2 values, got {len(values)}")
    v = np.asarray(values, dtype=np.float64)
    middle = (v[0] + v[-1]) / 2
    return float(middle - v[int(np.argmax(np.abs(middle - v)))])


def _check_ts(ts: Sequence[float]) -> tuple[float, ...]:
    ts = tuple(float(t) for t in ts)
    if len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0 or any(b <= a for a, b in zip(
            ts, ts[1:], strict=False)):
        raise ConnectivityError(f"ts: need increasing values from 0 to 1, got {ts}")
    return ts


def _evaluate_state(template: nn.Module, state: State, eval_data: Data,
                    bn_data: Data | None, loss_fn: LossFn,
                    batch_size: int) -> tuple[float, float]:
    model = _with_state(template, state)
    if bn_data is not None:
        reestimate_bn(model, bn_data, batch_size)
    if isinstance(eval_data, tuple | DataLoader):
        loss, accuracy = evaluate(model, eval_data, "classification", loss_fn, batch_size)
    else:  # a list of batches: means weighted by batch size
        results = [(evaluate(model, b, "classification", loss_fn, batch_size), len(b[0]))
                   for b in eval_data]
        loss = weighted_mean([(r[0], n) for r, n in results])
        accuracy = weighted_mean([(r[1], n) for r, n in results])
    return loss, 100.0 * (1.0 - accuracy)


def linear_path(model_a: nn.Module, model_c: nn.Module, eval_data: Data, *,
                points: int = 11, bn_data: Data | None = None,
                loss_fn: LossFn = F.cross_entropy, batch_size: int = 256) -> PathResult:
    """Loss and error on ``eval_data`` at ``points`` evenly spaced t on the straight line
    (1 - t) a + t c between two models of one architecture (LMC).

    eval_data: (x, y), a list of such batches (mean weighted by size) or a DataLoader.
    bn_data: data to re-estimate BatchNorm statistics from at every t (see the module doc).
    """
    if points < 2:
        raise ConnectivityError(f"points must be >= 2, got {points}")
    _check_compatible(model_a, model_c)
    sa, sc = model_a.state_dict(), model_c.state_dict()
    ts = tuple(float(t) for t in np.linspace(0.0, 1.0, points))
    values = [_evaluate_state(model_a, interpolate_state(sa, sc, t), eval_data, bn_data,
                              loss_fn, batch_size) for t in ts]
    return PathResult(ts, tuple(v[0] for v in values), tuple(v[1] for v in values))


# ----------------------------------------------------------------- Bezier curve


class BezierCurve(nn.Module):
    """phi(t) = (1-t)^2 a + 2t(1-t) b + t^2 c over the parameters of two models.

    Only the bend b (one tensor per parameter, initialised at (a + c) / 2) is trainable.
    ``forward`` runs the template model at phi(t): in training mode t is drawn from U(0, 1)
    on every call (one per batch) with a generator seeded by ``seed``; in eval mode it uses
    ``self.t``. Buffers (BatchNorm statistics) are the template's own during training;
    ``state_at`` interpolates them linearly.
    """

    def __init__(self, model_a: nn.Module, model_c: nn.Module, seed: int = 0):
        super().__init__()
        _check_compatible(model_a, model_c)
        self.template = copy.deepcopy(model_a)
        for p in self.template.parameters():
            p.requires_grad_(False)
        pa, pc = dict(model_a.named_parameters()), dict(model_c.named_parameters())
        if not pa:
            raise ConnectivityError("BezierCurve: the models have no parameters")
        self.names = list(pa)
        self.start = {k: p.detach().clone() for k, p in pa.items()}
        self.end = {k: pc[k].detach().clone() for k in self.names}
        self.bend = nn.ParameterList(
            nn.Parameter((self.start[k] + self.end[k]) / 2) for k in self.names)
        # Copies: training the endpoint models later must not move the curve.
        self.state_a = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
        self.state_c = {k: v.detach().clone() for k, v in model_c.state_dict().items()}
        self.t = 0.5
        self.generator = torch.Generator().manual_seed(seed)

    def params_at(self, t: float) -> State:
        """phi(t) for every parameter (differentiable in the bend)."""
        return {k: (1 - t) ** 2 * self.start[k] + 2 * t * (1 - t) * b + t ** 2 * self.end[k]
                for k, b in zip(self.names, self.bend, strict=True)}

    def state_at(self, t: float) -> State:
        """A full state dict at t: phi(t) for parameters, linear interpolation otherwise."""
        state = interpolate_state(self.state_a, self.state_c, t)
        state.update({k: v.detach().clone() for k, v in self.params_at(t).items()})
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = float(torch.rand((), generator=self.generator)) if self.training else self.t
        self.template.train(self.training)
        return functional_call(self.template, self.params_at(t), (x,), strict=False)


def train_bezier(curve: BezierCurve, train_data: Batch | DataLoader, *, epochs: int,
                 lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0,
                 batch_size: int = 64, seed: int = 0,
                 loss_fn: LossFn = F.cross_entropy) -> list[float]:
    """Train the bend with SGD (t ~ U(0, 1) per batch, cosine lr); returns per-epoch losses.

    Seeded: batch order by ``seed`` (steps.core.training), t by the curve's generator.
    """
    optimizer = torch.optim.SGD(curve.bend.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    history = train(curve, train_data, None, optimizer=optimizer, epochs=epochs,
                    loss_fn=loss_fn, batch_size=batch_size, seed=seed)
    curve.eval()
    return history.train_loss


def reference_lr_factor(epoch: int, epochs: int) -> float:
    """The reference's curve-fitting schedule (loss_landscape_taxonomy Mode_connectivity.py,
    from dnn-mode-connectivity), ``epoch`` counted from 1: the base lr for the first half,
    then linearly down to 1 % of it by 90 %, then 1 %."""
    alpha = epoch / epochs
    if alpha <= 0.5:
        return 1.0
    if alpha <= 0.9:
        return 1.0 - (alpha - 0.5) / 0.4 * 0.99
    return 0.01


def train_bezier_reference(curve: BezierCurve, train_data: Batch, *, epochs: int,
                           lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                           batch_size: int = 128, seed: int = 0,
                           loss_fn: LossFn = F.cross_entropy) -> list[float]:
    """Train the bend as the reference does: SGD with momentum, the step-down schedule of
    ``reference_lr_factor`` set per epoch, one t ~ U(0, 1) per batch, and instead of weight
    decay an l2 penalty 0.5 * weight_decay * ||phi(t)||^2 on the curve's point at t (its
    ``l2_regularizer``). Returns per-epoch mean losses (without the penalty)."""
    x, y = train_data
    optimizer = torch.optim.SGD(curve.bend.parameters(), lr=lr, momentum=momentum)
    order_gen = torch.Generator().manual_seed(seed)
    curve.train()
    curve.template.train()
    losses = []
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * reference_lr_factor(epoch, epochs)
        total = 0.0
        for idx in torch.randperm(len(x), generator=order_gen).split(batch_size):
            t = float(torch.rand((), generator=curve.generator))
            params = curve.params_at(t)
            loss = loss_fn(functional_call(curve.template, params, (x[idx],), strict=False),
                           y[idx])
            penalty = 0.5 * weight_decay * sum(p.square().sum() for p in params.values())
            optimizer.zero_grad()
            (loss + penalty).backward()
            optimizer.step()
            total += float(loss) * len(idx)
        losses.append(total / len(x))
    curve.eval()
    return losses


def evaluate_curve(curve: BezierCurve, eval_data: Data, *, ts: Sequence[float] = CURVE_TS,
                   bn_data: Data | None = None, loss_fn: LossFn = F.cross_entropy,
                   batch_size: int = 256) -> PathResult:
    """Loss and error on ``eval_data`` at each t of ``ts`` (0 first, 1 last) on the curve,
    BatchNorm statistics re-estimated from ``bn_data`` at each t when it is given."""
    ts = _check_ts(ts)
    values = [_evaluate_state(curve.template, curve.state_at(t), eval_data, bn_data,
                              loss_fn, batch_size) for t in ts]
    return PathResult(ts, tuple(v[0] for v in values), tuple(v[1] for v in values))
