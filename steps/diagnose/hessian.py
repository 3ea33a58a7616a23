"""Hessian of a loss w.r.t. a model's parameters, matrix-free, built on ``torch.func``.

    op = hessian_operator(model, (x, y))                  # or a list of (x, y) batches
    top = top_eigenvalue(op, max_iter=100, tol=1e-3, seed=0)   # largest |eigenvalue|, signed
    tr = hutchinson_trace(op, probes=100, seed=0)         # mean and standard error
    slq = spectral_density(op, runs=3, steps=50, seed=0)  # nodes and weights per run
    grid, density = slq.density(points=1000)              # Gaussian-smoothed density

The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off),
as in the reference (PyHessian); its mode is restored after every call. Over a list of
batches the loss (and so the Hessian) is the mean over batches weighted by batch size, i.e.
the mean-reduced loss over all the samples.

Hessian-vector products are reverse-over-reverse: ``vjp(grad(loss))`` builds the gradient's
graph once, and each product is then one backward pass through it (the Hessian is symmetric,
so the vector-Jacobian product of the gradient is H v). Forward-over-reverse
(``jvp(grad(loss))``) redoes the forward and backward pass, with dual numbers, for every
product; bench/diagnose.py measures both: re-using the graph is the faster of the two on CPU
for the power, Hutchinson and Lanczos loops, which ask for many products at one point.
The price is memory: the gradient graph of every batch stays alive (``reuse_graph=False``
rebuilds it per product instead and keeps one batch's graph at a time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from steps.core.errors import ParamsError

__all__ = [
    "EigenResult",
    "HessianOperator",
    "SpectralDensity",
    "TraceEstimate",
    "gaussian_density",
    "hessian_operator",
    "hutchinson_trace",
    "lanczos",
    "spectral_density",
    "top_eigenvalue",
]

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> scalar
Vector = torch.Tensor | Mapping[str, torch.Tensor]


class HessianError(ParamsError):
    """Bad input to a Hessian computation (shapes, counts, tolerances)."""


# ------------------------------------------------------------------------ the operator


class HessianOperator:
    """H = sum_i w_i * Hessian of losses[i] at ``params``, applied to vectors.

    losses: functions of a parameter dict returning a scalar, e.g. one per batch.
    weights: w_i (default 1 / len(losses)), e.g. batch size / total size.
    mode: "vjp" (reverse-over-reverse, re-uses each gradient graph when ``reuse_graph``)
        or "jvp" (forward-over-reverse, recomputes everything per product).
    """

    def __init__(self, losses: Sequence[Callable[[Params], torch.Tensor]],
                 params: Mapping[str, torch.Tensor], weights: Sequence[float] | None = None,
                 *, mode: str = "vjp", reuse_graph: bool = True):
        if not losses:
            raise HessianError("HessianOperator: no loss functions (no batches) given")
        if not params:
            raise HessianError("HessianOperator: no parameters given")
        if weights is not None and len(weights) != len(losses):
            raise HessianError(f"HessianOperator: {len(weights)} weights for "
                               f"{len(losses)} losses")
        if mode not in ("vjp", "jvp"):
            raise HessianError(f"HessianOperator: mode must be 'vjp' or 'jvp', got {mode!r}")
        self.losses = list(losses)
        self.params: Params = {k: p.detach() for k, p in params.items()}
        self.weights = ([1.0 / len(losses)] * len(losses) if weights is None
                        else [float(w) for w in weights])
        self.mode, self.reuse_graph = mode, reuse_graph
        self.shapes = {k: p.shape for k, p in self.params.items()}
        self.dim = sum(p.numel() for p in self.params.values())
        self.products = 0  # Hessian-vector products computed so far
        self._vjp_fns: list[Callable] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def flatten(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A dict shaped like ``params`` as one flat vector (in ``params`` order)."""
        if set(v) != set(self.shapes):
            raise HessianError("vector dict: keys differ from the parameter names")
        return torch.cat([v[k].reshape(-1) for k in self.shapes])

    def unflatten(self, flat: torch.Tensor) -> Params:
        """A flat vector of length ``dim`` as a dict shaped like ``params``."""
        if flat.dim() != 1 or flat.numel() != self.dim:
            raise HessianError(f"vector: expected a flat vector of {self.dim} entries, "
                               f"got shape {tuple(flat.shape)}")
        sizes = [math.prod(s) for s in self.shapes.values()]
        pieces = flat.split(sizes)
        return {k: t.view(s) for (k, s), t in zip(self.shapes.items(), pieces, strict=True)}

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the weighted loss at ``params``."""
        total = sum(w * self.flatten(grad(f)(self.params))
                    for f, w in zip(self.losses, self.weights, strict=True))
        return total.detach()

    def loss(self) -> float:
        """The weighted loss at ``params``."""
        with torch.no_grad():
            return float(sum(w * f(self.params) for f, w in
                             zip(self.losses, self.weights, strict=True)))

    def hvp(self, v: Vector) -> torch.Tensor | Params:
        """H v for a flat vector (returns a flat vector) or a parameter-shaped dict (a dict)."""
        if isinstance(v, Mapping):
            return self.unflatten(self._hvp_flat(self.flatten(v)))
        return self._hvp_flat(v)

    __call__ = hvp

    def _hvp_flat(self, flat: torch.Tensor) -> torch.Tensor:
        v = self.unflatten(flat.to(self.dtype))
        total = None
        for i, (f, w) in enumerate(zip(self.losses, self.weights, strict=True)):
            hv = self.flatten(self._product(i, f, v)) * w
            total = hv if total is None else total + hv
        self.products += 1
        return total.detach()

    def _product(self, i: int, f: Callable[[Params], torch.Tensor], v: Params) -> Params:
        if self.mode == "jvp":
            return jvp(grad(f), (self.params,), (v,))[1]
        if not self.reuse_graph:
            return vjp(grad(f), self.params)[1](v)[0]
        if self._vjp_fns is None:
            self._vjp_fns = [vjp(grad(g), self.params)[1] for g in self.losses]
        return self._vjp_fns[i](v)[0]

    def release(self) -> None:
        """Free the cached gradient graphs (they are rebuilt on the next product)."""
        self._vjp_fns = None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block; its previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _as_batches(data: Batch | Sequence[Batch]) -> list[Batch]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [data]
    batches = list(data)
    if not batches:
        raise HessianError("data: no batches given")
    for x, y in batches:
        if len(x) != len(y):
            raise HessianError(f"data: a batch has {len(x)} inputs but {len(y)} targets")
    return batches


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss_fn: LossFn = F.cross_entropy) -> Callable[[Params], torch.Tensor]:
    """loss_fn(model(x), y) as a function of the model's trainable parameters (eval mode)."""
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(params: Params) -> torch.Tensor:
        with eval_mode(model):
            return loss_fn(functional_call(model, (params, frozen, buffers), (x,)), y)

    return loss


def hessian_operator(model: nn.Module, data: Batch | Sequence[Batch],
                     loss_fn: LossFn = F.cross_entropy, *, mode: str = "vjp",
                     reuse_graph: bool = True) -> HessianOperator:
    """The Hessian of ``loss_fn(model(x), y)`` w.r.t. the trainable parameters, in eval mode.

    data: one (x, y) batch or a list of batches; over a list the loss is the
        batch-size-weighted mean (the mean loss over all samples for a mean-reduced loss).
    """
    batches = _as_batches(data)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    total = sum(len(x) for x, _ in batches)
    return HessianOperator([model_loss(model, x, y, loss_fn) for x, y in batches], params,
                           [len(x) / total for x, _ in batches], mode=mode,
                           reuse_graph=reuse_graph)


# --------------------------------------------------------------------- top eigenvalue


@dataclass(frozen=True)
class EigenResult:
    """The eigenvalue of largest magnitude (signed), its unit eigenvector, iterations used."""

    value: float
    vector: torch.Tensor
    iterations: int
    converged: bool


def _rademacher(n: int, generator: torch.Generator, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


def _check_iterations(name: str, value: int) -> None:
    if value < 1:
        raise HessianError(f"{name} must be >= 1, got {value}")


def top_eigenvalue(op: HessianOperator, *, max_iter: int = 100, tol: float = 1e-3,
                   seed: int = 0) -> EigenResult:
    """Power iteration for the eigenvalue of largest magnitude, with its sign.

    The estimate is the Rayleigh quotient v^T H v of the current unit vector (its sign is the
    eigenvalue's: a negative dominant eigenvalue flips v each step but not the quotient).
    Stops when |change| <= tol * |estimate| or after ``max_iter`` products. Seeded start.
    """
    _check_iterations("max_iter", max_iter)
    if not tol > 0:
        raise HessianError(f"tol must be > 0, got {tol}")
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    v = v / v.norm()
    previous: float | None = None
    for iteration in range(1, max_iter + 1):
        hv = op.hvp(v)
        estimate = float(v @ hv)
        norm = hv.norm()
        if norm == 0:  # H v = 0: v is an eigenvector for 0
            return EigenResult(estimate, v, iteration, True)
        v = hv / norm
        if previous is not None and abs(estimate - previous) <= tol * abs(estimate):
            return EigenResult(estimate, v, iteration, True)
        previous = estimate
    return EigenResult(estimate, v, max_iter, False)


# ------------------------------------------------------------------------------ trace


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate: the mean of z^T H z over Rademacher probes z, its standard
    error (sample std / sqrt(probes); nan with one probe) and the per-probe samples."""

    mean: float
    stderr: float
    probes: int
    samples: tuple[float, ...]

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The normal confidence interval mean +- z * stderr."""
        return self.mean - z * self.stderr, self.mean + z * self.stderr


def _estimate(samples: list[float]) -> TraceEstimate:
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return TraceEstimate(mean, float("nan"), n, tuple(samples))
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return TraceEstimate(mean, math.sqrt(var / n), n, tuple(samples))


def hutchinson_trace(op: HessianOperator, *, probes: int | None = 100,
                     rtol: float | None = None, z: float = 1.96, min_probes: int = 10,
                     max_probes: int = 1000, seed: int = 0) -> TraceEstimate:
    """tr(H) ~ mean of z^T H z over Rademacher probes z (seeded).

    Either a fixed number of ``probes`` (rtol None), or, with ``rtol``, probes until the
    confidence-interval half-width z * stderr is <= rtol * |mean| (at least ``min_probes``,
    at most ``max_probes``). The error shrinks as 1 / sqrt(probes), so a "relative change"
    stop would quit early; this one does not.
    """
    if rtol is None:
        if probes is None or probes < 1:
            raise HessianError(f"probes must be >= 1 without rtol, got {probes}")
        limit, floor = probes, probes
    else:
        if not rtol > 0:
            raise HessianError(f"rtol must be > 0, got {rtol}")
        if not 2 <= min_probes <= max_probes:
            raise HessianError(f"need 2 <= min_probes <= max_probes, got {min_probes} and "
                               f"{max_probes}")
        limit, floor = max_probes, min_probes
    gen = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    while len(samples) < limit:
        probe = _rademacher(op.dim, gen, op.dtype, op.device)
        samples.append(float(probe @ op.hvp(probe)))
        if rtol is not None and len(samples) >= floor:
            estimate = _estimate(samples)
            if z * estimate.stderr <= rtol * abs(estimate.mean):
                return estimate
    return _estimate(samples)


# ------------------------------------------------------------------ spectral density


def lanczos(op: HessianOperator, steps: int, start: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """``steps`` Lanczos iterations with full reorthogonalisation from ``start``.

    Returns the tridiagonal matrix's diagonal (alpha) and off-diagonal (beta), float64; it
    stops early (fewer steps) when the Krylov space becomes invariant (beta ~ 0).
    Every Lanczos vector is kept (steps x dim entries) for the reorthogonalisation.
    """
    _check_iterations("steps", steps)
    steps = min(steps, op.dim)  # a Krylov space has at most dim dimensions
    basis = torch.empty(steps, op.dim, dtype=op.dtype, device=op.device)
    v = start.to(op.dtype) / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        basis[j] = v
        w = op.hvp(v)
        alpha = float(w @ v)
        alphas.append(alpha)
        if j + 1 == steps:
            break
        # Classical Gram-Schmidt against every earlier vector, twice ("twice is enough").
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if beta <= 1e-10 * max(scale, 1e-30):  # invariant subspace: the spectrum is exact
            break
        betas.append(beta)
        v = w / beta
    return (torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64))


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: per run, Ritz values (nodes) and weights summing to 1."""

    nodes: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]

    def density(self, points: int = 1000, sigma: float | None = None,
                pad: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid, density) on ``points`` points spanning the nodes (plus ``pad`` of the range
        either side); sigma defaults to 1 % of the range (see ``gaussian_density``)."""
        low = min(float(n.min()) for n in self.nodes)
        high = max(float(n.max()) for n in self.nodes)
        width = max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
        grid = torch.linspace(low - pad * width, high + pad * width, points,
                              dtype=torch.float64)
        return grid, gaussian_density(self.nodes, self.weights, grid,
                                      0.01 * width if sigma is None else sigma)


def spectral_density(op: HessianOperator, *, runs: int = 3, steps: int = 50,
                     seed: int = 0) -> SpectralDensity:
    """SLQ: ``runs`` Lanczos runs of ``steps`` from seeded Rademacher starts.

    Each run's nodes are the eigenvalues of its tridiagonal matrix, its weights the squared
    first components of their eigenvectors (they sum to 1). The weighted mean of a run's
    nodes is v^T H v for its unit start v, whose expectation is tr(H) / dim.
    """
    _check_iterations("runs", runs)
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(runs):
        alpha, beta = lanczos(op, steps, _rademacher(op.dim, gen, op.dtype, op.device))
        tridiagonal = torch.diag(alpha)
        if len(beta):
            tridiagonal += torch.diag(beta, 1) + torch.diag(beta, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        nodes.append(values)
        weights.append(vectors[0].square())
    return SpectralDensity(tuple(nodes), tuple(weights))


def gaussian_density(nodes: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                     grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """The runs' mean of sum_k w_k N(grid; node_k, sigma^2): a density on ``grid``."""
    if not sigma > 0:
        raise HessianError(f"sigma must be > 0, got {sigma}")
    if len(nodes) != len(weights) or not nodes:
        raise HessianError(f"gaussian_density: {len(nodes)} node sets, {len(weights)} weights")
    grid = grid.to(torch.float64)
    total = torch.zeros_like(grid)
    for n, w in zip(nodes, weights, strict=True):
        diff = (grid[:, None] - n.to(torch.float64)[None, :]) / sigma
        kernel = torch.exp(-0.5 * diff.square()) / (sigma * math.sqrt(2 * math.pi))
        total += kernel @ w.to(torch.float64)
    return total / len(nodes)
