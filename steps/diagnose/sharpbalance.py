"""SharpBalance: deep ensembles that trade member flatness against ensemble diversity.

Members train with SAM on all data until T0 (half the epochs). Then every member scores
every training sample by its per-sample gradient norm squared and selects k (50 %) of them;
member i from then on uses SAM on the union of the OTHER members' selections plus its share
of the samples nobody selected, and plain SGD on the rest, in one combined step per minibatch.
Which k % a member selects is ``direction``: "flattest" (lowest scores, the released code:
the default, as its numbers come from it) or "sharpest" (highest, the paper's figure).

The released code has two split rules and picks by dataset (main.py): CIFAR-10 uses
``boosting_sam_split_boost`` ("boost": SAM also on every unselected sample except the
member's own round-robin share, which it trains with SGD), CIFAR-100 ``boosting_sam_split``
("share": SAM on its own share of the unselected samples). ``EnsembleConfig.split_rule``
None picks as the reference does from ``EnsembleConfig.dataset``.

The combined step follows the released code's weighting: the minibatch loss is the sum of
per-sample losses over the whole minibatch size B, SAM-part terms evaluated at the perturbed
weights, SGD-part terms at the current ones, and the perturbation comes from the SAM part's
gradient alone. An empty SAM part is therefore plain SGD, an empty SGD part plain SAM.

BatchNorm running statistics are updated by every forward pass, the perturbed one included.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> (B,)
Direction = Literal["sharpest", "flattest"]
SplitRule = Literal["share", "boost"]
Method = Literal["sharpbalance", "sam", "deep"]

GRAD_NORM_EPS = 1e-12  # keeps the SAM perturbation finite when the gradient vanishes


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


# ---------------------------------------------------------------------------------- SAM


class SAM:
    """Sharpness-aware minimisation around any torch optimiser (Foret et al. 2021).

    The perturbation is e = rho * g / ||g||, or with ``adaptive`` (ASAM, Kwon et al. 2021)
    e = rho * w^2 g / || |w| g ||; the base optimiser then steps with the gradient at w + e.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.base, self.rho, self.adaptive = base, rho, adaptive
        self.params = [p for group in base.param_groups for p in group["params"]]
        self._backup: list[torch.Tensor] | None = None

    @torch.no_grad()
    def perturb(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Move the parameters to w + e for the gradient ``grads`` (one per parameter)."""
        scaled = [g * p.abs() if self.adaptive else g
                  for p, g in zip(self.params, grads, strict=True) if g is not None]
        norm = torch.linalg.vector_norm(torch.stack([s.norm() for s in scaled])) if scaled else 0
        scale = self.rho / (norm + GRAD_NORM_EPS)
        # Restoring from a copy (not by subtracting e) gives back w bit for bit.
        self._backup = [p.detach().clone() for p in self.params]
        for p, g in zip(self.params, grads, strict=True):
            if g is not None:
                p.add_(g * p.square() * scale if self.adaptive else g * scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Move the parameters back to w."""
        for p, saved in zip(self.params, self._backup, strict=True):
            p.copy_(saved)
        self._backup = None

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """One SAM step on ``loss_fn()`` (a closure that runs the forward pass); returns the
        loss at w."""
        loss = loss_fn()
        self.perturb(_grads(loss, self.params))
        adversarial = _grads(loss_fn(), self.params)
        self.restore()
        _set_grads(self.params, adversarial)
        self.base.step()
        return float(loss.detach())


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _set_grads(params: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def combined_step(model: nn.Module, sam: SAM, x: torch.Tensor, y: torch.Tensor,
                  sam_mask: torch.Tensor, criterion: Criterion = per_sample_cross_entropy
                  ) -> float:
    """One optimiser step on a minibatch: SAM on the rows where ``sam_mask`` is True, SGD on
    the others (see the module docstring for the weighting); returns the loss at w."""
    size, normal = len(y), ~sam_mask
    grads: list[torch.Tensor | None] = [None] * len(sam.params)
    total = 0.0
    if normal.any():
        loss = criterion(model(x[normal]), y[normal]).sum() / size
        grads = [_add(a, b) for a, b in zip(grads, _grads(loss, sam.params), strict=True)]
        total += float(loss.detach())
    if sam_mask.any():
        def sam_loss() -> torch.Tensor:
            return criterion(model(x[sam_mask]), y[sam_mask]).sum() / size

        loss = sam_loss()
        sam.perturb(_grads(loss, sam.params))
        adversarial = _grads(sam_loss(), sam.params)
        sam.restore()
        grads = [_add(a, b) for a, b in zip(grads, adversarial, strict=True)]
        total += float(loss.detach())
    _set_grads(sam.params, grads)
    sam.base.step()
    return total


# --------------------------------------------------------------------- sample scores


def per_sample_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      criterion: Criterion = per_sample_cross_entropy,
                      batch_size: int = 256) -> np.ndarray:
    """Per-sample gradient norm squared ||grad_w loss(x_i, y_i)||^2, (N,), by vmap over grad.

    Runs in eval mode (BatchNorm cannot normalise a batch of one); the mode is restored.
    """
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return criterion(out, yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    try:
        scores = [sum(g.flatten(1).square().sum(1) for g in per_sample(params, xb, yb).values())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)]
    finally:
        model.train(was_training)
    return torch.cat(scores).detach().cpu().numpy()


def select_subset(scores: np.ndarray, fraction: float = 0.5,
                  direction: Direction = "flattest") -> np.ndarray:
    """Sorted indices of the int(N * fraction) highest ("sharpest") or lowest ("flattest")
    scores; ties go to the lower index."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if direction not in ("sharpest", "flattest"):
        raise ValueError(f"direction must be 'sharpest' or 'flattest', got {direction!r}")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores if direction == "sharpest" else scores, kind="stable")
    return np.sort(order[: int(len(scores) * fraction)])


@dataclass(frozen=True)
class MemberSplit:
    """Sorted training-set indices a member trains with SAM and with plain SGD."""

    sam: np.ndarray
    normal: np.ndarray


def reference_split_rule(dataset: str) -> SplitRule:
    """The released code's choice: "boost" for CIFAR-10, "share" for anything else."""
    return "boost" if dataset.lower() == "cifar10" else "share"


def sharpbalance_splits(scores: Sequence[np.ndarray], fraction: float = 0.5,
                        direction: Direction = "flattest",
                        rule: SplitRule = "share") -> list[MemberSplit]:
    """Member i: SAM on the other members' selections plus, of the samples no member
    selected, its round-robin share ("share") or all but its share ("boost"); SGD on the
    remainder. Each split partitions the data."""
    if rule not in ("share", "boost"):
        raise ValueError(f"split rule must be 'share' or 'boost', got {rule!r}")
    n = len(scores[0])
    chosen = [select_subset(s, fraction, direction) for s in scores]
    unselected = np.setdiff1d(np.arange(n), np.concatenate(chosen))
    splits = []
    for i in range(len(scores)):
        others = [c for j, c in enumerate(chosen) if j != i]
        share = unselected[i :: len(scores)]
        flat = share if rule == "share" else np.setdiff1d(unselected, share)
        sam = np.unique(np.concatenate([*others, flat])).astype(np.int64)
        split = MemberSplit(sam, np.setdiff1d(np.arange(n), sam))
        check_partition(split, n)
        splits.append(split)
    return splits


def check_partition(split: MemberSplit, n: int) -> None:
    """Raise AssertionError unless split.sam and split.normal are disjoint and cover 0..n-1."""
    both = np.concatenate([split.sam, split.normal])
    if len(both) != n or not np.array_equal(np.sort(both), np.arange(n)):
        raise AssertionError(f"SAM / SGD index sets do not partition the {n} training samples")


# ------------------------------------------------------------------------- training


@dataclass(frozen=True)
class EnsembleConfig:
    """``method``: "sharpbalance", "sam" (SAM on all data throughout) or "deep" (plain SGD,
    the classic deep ensemble). ``sam_epochs`` is T0, default half of ``epochs``.
    ``split_rule`` None: the reference's choice for ``dataset`` (its default is CIFAR-10)."""

    members: int = 3
    epochs: int = 10
    sam_epochs: int | None = None
    method: Method = "sharpbalance"
    rho: float = 0.2
    adaptive: bool = False
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    fraction: float = 0.5
    direction: Direction = "flattest"  # the released code's selection
    dataset: str = "cifar10"
    split_rule: SplitRule | None = None
    seed: int = 0


@dataclass(frozen=True)
class Ensemble:
    models: list[nn.Module]
    scores: list[np.ndarray] | None  # per-member sample scores at T0 (sharpbalance only)
    splits: list[MemberSplit] | None


def train_ensemble(factory: Callable[[int], nn.Module], x: torch.Tensor, y: torch.Tensor,
                   config: EnsembleConfig, criterion: Criterion = per_sample_cross_entropy
                   ) -> Ensemble:
    """Train ``config.members`` models ``factory(seed + i)`` on (x, y) by ``config.method``.

    Member i shuffles with its own generator seeded seed + i: the run is deterministic.
    """
    if config.method not in ("sharpbalance", "sam", "deep"):
        raise ValueError(f"unknown method {config.method!r}")
    t0 = config.epochs // 2 if config.sam_epochs is None else config.sam_epochs
    if config.method == "sharpbalance" and not 0 <= t0 < config.epochs:
        raise ValueError(f"sam_epochs (T0) must be in [0, epochs), got {t0}")
    n = len(y)
    models = [factory(config.seed + i) for i in range(config.members)]
    optimisers = [SAM(torch.optim.SGD(m.parameters(), lr=config.lr, momentum=config.momentum,
                                      weight_decay=config.weight_decay), config.rho,
                      config.adaptive) for m in models]
    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(config.members)]
    masks = [torch.full((n,), config.method != "deep") for _ in models]
    scores = splits = None
    for epoch in range(config.epochs):
        if config.method == "sharpbalance" and epoch == t0:
            scores = [per_sample_scores(m, x, y, criterion=criterion) for m in models]
            rule = config.split_rule or reference_split_rule(config.dataset)
            splits = sharpbalance_splits(scores, config.fraction, config.direction, rule)
            masks = [torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.from_numpy(s.sam), True)
                     for s in splits]
        for model, sam, gen, mask in zip(models, optimisers, generators, masks, strict=True):
            model.train()
            for idx in torch.randperm(n, generator=gen).split(config.batch_size):
                combined_step(model, sam, x[idx], y[idx], mask[idx], criterion)
    for model in models:
        model.eval()
    return Ensemble(models, scores, splits)


# -------------------------------------------------------------------------- metrics


SharpnessKind = Literal["worst", "average"]
PerturbationNorm = Literal["l2", "linf"]

APGD_MOMENTUM = 0.75  # weight of the new point against the previous perturbation
APGD_MIN_UPDATE_RATIO = 0.75  # share of improving steps a checkpoint interval needs
APGD_STEP_DECAY = 0.5  # step-size factor when a checkpoint finds the ascent stalled
LOGIT_NORM_FLOOR = 1e-10
ELLIPSOID_TOLERANCE = 1e-5  # the adaptive l2 projection's bisection stops this close to rho


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, *,
              kind: SharpnessKind = "worst", norm: PerturbationNorm = "l2",
              adaptive: bool = True, normalize_logits: bool = True,
              n_iters: int | None = None, batch_size: int = 5, max_batches: int = 100,
              generator: torch.Generator | None = None,
              criterion: Criterion = per_sample_cross_entropy) -> float:
    """Sharpness as SharpBalance measures it (measure_sharpness.py, after Andriushchenko et
    al. 2023, "A modern look at the relationship between sharpness and generalization").

    (x, y) is cut, in its order, into batches of ``batch_size`` (the reference: 5 shuffled
    training samples), the first ``max_batches`` (100) used; the result is the mean over
    batches of L(w + delta) - L(w) for the mean loss of the batch.

    ``kind`` "worst": max over ||delta|| <= rho by APGD on the weights, ``n_iters`` 20 (the
    reference's eval_APGD_sharpness); "average": the mean over ``n_iters`` 100 random delta
    (eval_average_sharpness: Gaussian N(0, rho^2) per weight for "l2", uniform in [-rho, rho]
    for "linf", drawn from ``generator``). ``adaptive``: delta scaled by |w| (the ball is
    ||delta / |w| || <= rho). ``normalize_logits``: the logits are centred and divided by
    their norm before the loss (LogitNormalizationWrapper). The model is not modified
    (eval mode, functional calls).
    """
    if kind not in ("worst", "average"):
        raise ValueError(f"sharpness kind must be 'worst' or 'average', got {kind!r}")
    if norm not in ("l2", "linf"):
        raise ValueError(f"perturbation norm must be 'l2' or 'linf', got {norm!r}")
    iters = n_iters if n_iters is not None else (20 if kind == "worst" else 100)
    w0 = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    scale = {k: p.abs() if adaptive else torch.ones_like(p) for k, p in w0.items()}
    was_training = model.training
    model.eval()
    try:
        values = []
        for xb, yb in itertools.islice(zip(x.split(batch_size), y.split(batch_size),
                                           strict=True), max_batches):
            def loss_at(w: dict[str, torch.Tensor], xb=xb, yb=yb) -> torch.Tensor:
                out = functional_call(model, (w, buffers), (xb,))
                return criterion(_normalised(out) if normalize_logits else out, yb).mean()

            if kind == "worst":
                values.append(_apgd_worst_case(loss_at, w0, scale, rho, norm, adaptive, iters))
            else:
                values.append(_average_case(loss_at, w0, scale, rho, norm, iters, generator))
    finally:
        model.train(was_training)
    return float(np.mean(values))


def _normalised(logits: torch.Tensor) -> torch.Tensor:
    centred = logits - logits.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(LOGIT_NORM_FLOOR)


def apgd_checkpoints(n_iters: int) -> list[int]:
    """Iterations at which APGD checks its progress (Croce and Hein 2020): at fractions
    0.22, then intervals shrinking by 0.03 down to 0.06, of ``n_iters``."""
    fractions, points = [0.0, 0.22], [0, math.ceil(n_iters * 0.22)]
    while points[-1] < n_iters and points[-1] != points[-2]:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
        points.append(math.ceil(fractions[-1] * n_iters))
    return points[1:]


Params = dict[str, torch.Tensor]


def _apgd_worst_case(loss_at: Callable[[Params], torch.Tensor], w0: Params, scale: Params,
                     rho: float, norm: PerturbationNorm, adaptive: bool, n_iters: int
                     ) -> float:
    """Largest loss increase APGD finds in the ball, starting from delta = 0.

    As the reference, a stalled checkpoint halves the step and takes the next gradient at
    the best point so far, while the perturbation itself carries on from the last iterate.
    """
    checkpoints = set(apgd_checkpoints(n_iters))
    init = float(loss_at(w0))
    delta = {k: torch.zeros_like(v) for k, v in w0.items()}
    previous, at, best_at = delta, w0, w0
    worst = prev_worst = init
    step = prev_step = 2.0 * rho
    last_checkpoint = improvements = 0
    for i in range(n_iters):
        grads = _gradient(loss_at, at)
        ascended = _project(_ascend(delta, grads, scale, step, norm), scale, rho, norm,
                            adaptive)
        delta, previous = ({k: APGD_MOMENTUM * ascended[k] + (1 - APGD_MOMENTUM) * previous[k]
                            for k in delta}, delta)
        at = {k: w0[k] + delta[k] for k in w0}
        loss = float(loss_at(at))
        if loss > worst:
            worst, best_at, improvements = loss, at, improvements + 1
        if i in checkpoints:
            too_few = improvements < APGD_MIN_UPDATE_RATIO * (i - last_checkpoint)
            no_progress = prev_step == step and prev_worst == worst
            prev_step, prev_worst, last_checkpoint, improvements = step, worst, i, 0
            if too_few or no_progress:
                step *= APGD_STEP_DECAY
                at = best_at
    return worst - init


def _gradient(loss_at: Callable[[Params], torch.Tensor], at: Params) -> Params:
    leaves = {k: v.detach().requires_grad_() for k, v in at.items()}
    return dict(zip(leaves, torch.autograd.grad(loss_at(leaves), list(leaves.values())),
                    strict=True))


def _ascend(delta: Params, grads: Params, scale: Params, step: float,
            norm: PerturbationNorm) -> Params:
    """One ascent step: the l2-normalised gradient, or its sign for linf, times |w| if
    adaptive."""
    if norm == "linf":
        return {k: delta[k] + step * grads[k].sign() * scale[k] for k in delta}
    size = step / (_norm(grads) + GRAD_NORM_EPS)
    return {k: delta[k] + size * grads[k] * scale[k] for k in delta}


def _project(delta: Params, scale: Params, rho: float, norm: PerturbationNorm,
             adaptive: bool) -> Params:
    """Back into {||delta / scale|| <= rho}: clipping for linf; for l2 a rescaling onto the
    ball, or if adaptive the Euclidean projection onto the ellipsoid by bisection."""
    if norm == "linf":
        return {k: torch.maximum(torch.minimum(v, rho * scale[k]), -rho * scale[k])
                for k, v in delta.items()}
    if not adaptive:
        length = _norm(delta)
        return {k: v * (rho / length) for k, v in delta.items()} if length > rho else delta
    return _project_ellipsoid(delta, scale, rho)


def _project_ellipsoid(delta: Params, scale: Params, rho: float) -> Params:
    """delta / (1 + 2 lambda / scale^2) with lambda found by the reference's bisection
    (start 0.1 in [0, 10], the upper end doubled when approached) until the scaled norm is
    within ELLIPSOID_TOLERANCE of rho. A zero weight makes the scaled norm NaN and, as in the
    reference, leaves delta unprojected. Runs on one flat vector (the loop is the cost)."""
    flat = torch.cat([v.flatten() for v in delta.values()])
    inverse = torch.cat([(1 / s).flatten() for s in scale.values()])
    length = float((flat * inverse).norm())
    if not length > rho:
        return delta
    lmbd, low, high, limit = 0.1, 0.0, 10.0, 10.0
    shrunk, inverse_sq = flat, inverse.square()
    while abs(length - rho) > ELLIPSOID_TOLERANCE:
        shrunk = flat / (1 + 2 * lmbd * inverse_sq)
        length = float((shrunk * inverse).norm())
        if length > rho:
            lmbd, low = (lmbd + high) / 2, lmbd
        else:
            lmbd, high = (low + lmbd) / 2, lmbd
        if limit - high < 1e-2:
            limit, high = limit * 2, high * 2
    pieces = shrunk.split([v.numel() for v in delta.values()])
    return {k: piece.view_as(v) for (k, v), piece in zip(delta.items(), pieces, strict=True)}


def _average_case(loss_at: Callable[[Params], torch.Tensor], w0: Params, scale: Params,
                  rho: float, norm: PerturbationNorm, n_iters: int,
                  generator: torch.Generator | None) -> float:
    """Mean loss increase over ``n_iters`` random perturbations, drawn parameter by
    parameter in named_parameters order."""
    init = float(loss_at(w0))
    total = 0.0
    for _ in range(n_iters):
        noisy = {k: w + rho * scale[k] * _noise(w, norm, generator) for k, w in w0.items()}
        total += float(loss_at(noisy))
    return total / n_iters - init


def _noise(like: torch.Tensor, norm: PerturbationNorm,
           generator: torch.Generator | None) -> torch.Tensor:
    if norm == "l2":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype)
    return 2 * torch.rand(like.shape, generator=generator, dtype=like.dtype) - 1


def _norm(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([v.norm() for v in t.values()]))


@torch.no_grad()
def member_probabilities(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """(M, N, C) softmax outputs of every member (eval mode)."""
    out = []
    for model in models:
        was_training = model.training
        model.eval()
        out.append(torch.softmax(model(x), dim=-1))
        model.train(was_training)
    return torch.stack(out)


@dataclass(frozen=True)
class EnsembleMetrics:
    """Ensemble accuracy (argmax of the mean softmax), each member's accuracy, the mean pairwise
    disagreement (share of samples two members label differently), the disagreement-error
    ratio (disagreement / mean member error) and the output variance (across members, of the
    softmax vector: summed over classes, averaged over samples)."""

    ensemble_accuracy: float
    member_accuracies: tuple[float, ...]
    disagreement: float
    disagreement_error_ratio: float
    output_variance: float

    @property
    def member_accuracy(self) -> float:
        return float(np.mean(self.member_accuracies))


def ensemble_metrics(probs: torch.Tensor, y: torch.Tensor) -> EnsembleMetrics:
    """Metrics of (M, N, C) member probabilities against labels y (N,)."""
    labels = probs.argmax(-1)
    member_acc = tuple(float((lab == y).double().mean()) for lab in labels)
    pairs = list(itertools.combinations(range(len(probs)), 2))
    disagreement = (float(np.mean([(labels[i] != labels[j]).double().mean() for i, j in pairs]))
                    if pairs else 0.0)
    error = 1.0 - float(np.mean(member_acc))
    return EnsembleMetrics(
        ensemble_accuracy=float((probs.mean(0).argmax(-1) == y).double().mean()),
        member_accuracies=member_acc,
        disagreement=disagreement,
        # No member error and no disagreement: nothing to trade, the ratio is 0 by convention.
        disagreement_error_ratio=disagreement / error if error > 0 else 0.0,
        output_variance=float(probs.double().var(0, correction=0).sum(-1).mean()),
    )


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """x plus i.i.d. N(0, std^2) noise."""
    return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) images blurred by a separable Gaussian (radius 2 sigma, reflect padding)."""
    radius = max(1, round(2 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def corruption_metrics(models: Sequence[nn.Module], images: torch.Tensor, y: torch.Tensor,
                       generator: torch.Generator, *, noise_std: float = 0.3,
                       blur_sigma: float = 1.0) -> dict[str, EnsembleMetrics]:
    """Ensemble metrics on clean, noisy and blurred copies of (N, C, H, W) images: an offline
    stand-in for CIFAR-10-C. The models must accept image-shaped inputs."""
    inputs = {"clean": images, "gaussian_noise": gaussian_noise(images, noise_std, generator),
              "gaussian_blur": gaussian_blur(images, blur_sigma)}
    return {name: ensemble_metrics(member_probabilities(models, x), y)
            for name, x in inputs.items()}
