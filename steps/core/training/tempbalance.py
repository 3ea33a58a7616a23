"""TempBalance during training: per-layer learning rates from each layer's ESD alpha.

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    tb = TempBalance(model, optimizer, scheduler=scheduler)  # regroups the optimiser per layer
    tb.step()                       # factors from the initial weights (as the reference)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        scheduler.step()
        tb.step()                   # recompute alpha; lr = eta_t * factor per layer

Param groups: TempBalance sets one lr per layer, so it needs one param group per layer. An
optimiser built over ``model.parameters()`` (one group, or groups not by layer, e.g. weight
decay on / off) is regrouped in place: each group is split by layer (``layer_param_groups``'
assignment), every part keeping its group's hyperparameters, and the optimiser state (keyed
by parameter) is kept; a scheduler passed in gets its per-group lists expanded the same way.
An optimiser built from ``layer_param_groups(model, lr)`` is used as it is.

Each ``tb.step()`` recomputes the ``hill`` alpha of every balanced layer: the ESD as the
spectral step defines it (float64 eigenvalues of the smaller Gram matrix, conv slices pooled)
but computed by torch (``torch.linalg.eigvalsh``), same-shape matrices batched, on the
training device. On CPU that keeps the ESD in torch's own thread pool: numpy's OpenBLAS
threads keep spinning after each call and slowed the next training passes ~2.4x for about a
second (bench/tempbalance.py). Alphas equal the numpy path's to ~1e-12. Factors come from
the TempBalance rule (``steps.core.balance``, METHODS.md section 2): ``linear`` onto
``lr_range`` per layer, or ``sigmoid`` (TB_Sigmoid) 10^phi on block means. With
``every_steps=K``, call ``tb.step()`` after every optimiser step instead: alpha is recomputed
on the first call and every K calls after it (``sigmoid_interval`` gives TB_Sigmoid's K).

FARMS (``farms=FarmsOptions(...)``; ``IMAGE_CLASSIFICATION_OPTIONS`` is the setting of the
FARMS reference's TempBalance runs): a layer's alpha is the mean hill alpha of its FARMS
ESDs (``steps.core.farms``: the pooled ESD of fixed-aspect-ratio windows, one per row band
of a conv), as the reference's ``Tempbalance_FARMS`` measures with ``use_sliding_window``.

Learning rates: every param group keeps the global schedule's value eta_t in
``group["schedule_lr"]`` and holds ``group["lr"] = eta_t * factor`` at all times. A scheduler
passed to TempBalance is wrapped so that it always reads and writes eta_t (torch schedulers
such as CosineAnnealingLR update the current lr recursively, so they must never see the
factored value); the factor is applied again as soon as it returns. Changing a group's lr
behind TempBalance's back (an unwrapped scheduler) is detected at the next ``tb.step()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from steps.core.balance import TempBalanceOptions, lr_factors
from steps.core.devices import resolve_device
from steps.core.errors import TailwiseError
from steps.core.esd import eigenvalue_scale, gram_eigenvalues_batched, kernel_slices
from steps.core.farms import FarmsOptions, farms_spectra
from steps.core.fits import fit_power_law
from steps.core.naming import BLOCK_PATTERN
from steps.core.weights import MatrixInfo, module_layer_type, open_weights

__all__ = [
    "TempBalance",
    "TempBalanceError",
    "TempBalanceRecord",
    "layer_param_groups",
    "pooled_esds",
    "reference_param_groups",
    "regroup_by_layer",
    "sigmoid_interval",
    "with_default_interval",
]

Rule = Literal["linear", "sigmoid"]
Grouping = Literal["layer", "reference"]
REST_GROUP = "rest"  # the reference grouping's group of parameters outside its layers
_REFERENCE_TYPES = ("linear", "conv2d")  # the reference measures nn.Linear and nn.Conv2d
_BATCH_BYTES = 1 << 30  # float64 bytes of same-shape matrices in one eigvalsh call


class TempBalanceError(TailwiseError, ValueError):
    """TempBalance cannot run with these settings, this model or this optimiser."""


@dataclass(frozen=True)
class TempBalanceRecord:
    """One ESD recomputation: alpha and lr factor per layer, in model order."""

    step: int  # number of tb.step() calls so far (1 = the first)
    alphas: dict[str, float]  # hill alpha; NaN for layers left out (not analysed) or unfittable
    factors: dict[str, float]  # 1.0 for layers left out
    seconds: float  # ESD + fit + mapping time


def layer_param_groups(model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
    """One optimiser param group per layer (Linear, Conv1d/2d, HF Conv1D, Embedding).

    Parameters of other modules (BatchNorm, LayerNorm, custom weights) follow the layer
    before them in ``named_modules`` order (those before the first layer join the first);
    a layer's bias is in its group. Frozen and already-listed (tied) parameters are skipped,
    so every trainable parameter is in exactly one group. Each group has ``name`` (the
    layer's module name, as in the spectral step) and ``lr = base_lr``.
    """
    groups: list[dict[str, Any]] = []
    before_first: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        params = [
            p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen
        ]
        seen.update(id(p) for p in params)
        weight = getattr(module, "weight", None)
        if module_layer_type(module) is not None and any(p is weight for p in params):
            groups.append({"params": params, "lr": base_lr, "name": name or type(module).__name__})
        elif groups:
            groups[-1]["params"].extend(params)
        else:
            before_first.extend(params)
    if not groups:
        raise TempBalanceError(
            f"{type(model).__name__}: no trainable Linear, Conv1d/Conv2d, Conv1D or Embedding layer"
        )
    groups[0]["params"][:0] = before_first
    return groups


def reference_param_groups(model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
    """The TempBalance reference's grouping (YefanZhou/TempBalance, ``batchnorm_type="name"``).

    One group per nn.Conv2d / nn.Linear layer (its own parameters); a BatchNorm2d whose name
    with "bn" replaced by "conv" names such a layer joins that layer's group; every other
    trainable parameter (embeddings, LayerNorm, unmatched BatchNorm, ...) is in one group
    named ``REST_GROUP`` whose lr factor is always 1.
    """
    layers = {name: [] for name, module in model.named_modules()
              if module_layer_type(module) in _REFERENCE_TYPES}
    rest: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False)
                  if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        follows = name.replace("bn", "conv") if isinstance(module, nn.BatchNorm2d) else None
        if name in layers:
            layers[name].extend(params)
        elif follows in layers:
            layers[follows].extend(params)
        else:
            rest.extend(params)
    groups = [{"params": params, "lr": base_lr, "name": name}
              for name, params in layers.items() if params]
    if not groups:
        raise TempBalanceError(f"{type(model).__name__}: no trainable Linear or Conv2d layer")
    if rest:
        groups.append({"params": rest, "lr": base_lr, "name": REST_GROUP})
    return groups


def sigmoid_interval(steps_per_epoch: int) -> int:
    """TB_Sigmoid's ESD interval in optimiser steps: min(100, steps_per_epoch / 10), >= 1."""
    return max(1, min(100, steps_per_epoch // 10))


def with_default_interval(options: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """TempBalance options with TB_Sigmoid's interval when they name none (the linear rule
    stays per epoch, as its reference)."""
    if options.get("rule") == "sigmoid" and options.get("every_steps") is None:
        return options | {"every_steps": sigmoid_interval(steps_per_epoch)}
    return options


class TempBalance:
    """Sets each layer's learning rate to eta_t * factor(alpha); see the module docstring.

    model / optimizer: any torch optimiser (SGD, Adam, AdamW, ...) over the model's
        parameters; regrouped per layer in place unless its groups are already named by
        layer (``layer_param_groups``).
    scheduler: the global LR schedule, if any, and wrapped (create it after TempBalance, or
        pass it here).
    rule: "linear" (TB: alpha's range mapped onto lr_range) or "sigmoid" (TB_Sigmoid).
    lr_range: (low, high) factors of the linear rule, 0 < low < high.
    hill_k: xmin at n / hill_k of the sorted ESD; default 2 (linear) or 1.5 (sigmoid).
    scale_low / scale_high: s of the sigmoid rule for blocks below / above the mean alpha
        (the reference's sigmoid_min 2 and sigmoid_max 1: factors in [10^-1, 10^0.5]);
        ``scale`` sets both (factors span 10^(+-s/2)).
    by_block: factors from block means (default: True for sigmoid, False for linear).
    every_steps: recompute every K calls of step() instead of on every call.
    exclude_first_last / min_evals: the first and last layers, and layers whose ESD has fewer
        eigenvalues (min side x kernel size), keep factor 1.0 and are not analysed.
    groups: "layer" (default, METHODS.md section 2's rule: it also balances transformers'
        Embedding / Conv1D layers and their LayerNorms, which the reference's CNN grouping
        leaves at the global lr): every
        Linear / Conv / Conv1D / Embedding is a layer and the parameters of other modules
        (norms) follow the layer before them (``layer_param_groups``); "reference": the
        TempBalance reference's grouping
        (``reference_param_groups``): only Linear and Conv2d are layers (first and last
        among them excluded), BatchNorm follows its conv by name, LayerNorm and the rest
        keep the global lr.
    device: where the ESD is computed; None = on each weight's own (training) device.
    farms: alpha from FARMS windows (``IMAGE_CLASSIFICATION_OPTIONS``: the reference's
        image-classification setting, whose 'median' fit with xmin_pos 2 is hill_k = 2);
        None (default): from the whole matrix's ESD. min_evals still counts the whole
        matrix's eigenvalues.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any = None,
        rule: Rule = "linear",
        lr_range: tuple[float, float] = (0.5, 1.5),
        hill_k: float | None = None,
        scale: float | None = None,
        scale_low: float = 2.0,
        scale_high: float = 1.0,
        by_block: bool | None = None,
        every_steps: int | None = None,
        exclude_first_last: bool = True,
        min_evals: int = 50,
        device: str | None = None,
        groups: Grouping = "layer",
        farms: FarmsOptions | None = None,
    ):
        self.options = _options(rule, lr_range, (scale, scale_low, scale_high), by_block)
        self.hill_k = float(hill_k if hill_k is not None else (2.0 if rule == "linear" else 1.5))
        if self.hill_k < 1.0:
            raise TempBalanceError(f"hill_k must be >= 1, got {hill_k}")
        if every_steps is not None and every_steps < 1:
            raise TempBalanceError(f"every_steps must be a positive integer, got {every_steps}")
        self.model = model
        self.optimizer = optimizer
        self.every_steps = every_steps
        self.device = str(resolve_device(device)) if device is not None else None
        if farms is not None and farms.problem():
            raise TempBalanceError(farms.problem())
        self.farms = farms
        if groups not in GROUPINGS:
            raise TempBalanceError(f"unknown groups {groups!r}; choose 'layer' or 'reference'")
        self.grouping = groups
        infos = open_weights(model).infos()
        if groups == "reference":
            infos = [info for info in infos if info.layer_type in _REFERENCE_TYPES]
        self.layers = [info.name for info in infos]
        self.included = _included(infos, exclude_first_last, min_evals)
        if not self.included.any():
            raise TempBalanceError(
                f"{type(model).__name__}: no layer left to balance among {len(infos)} after "
                f"excluding first/last (={exclude_first_last}) and those with < {min_evals} "
                "eigenvalues"
            )
        self._balanced_names = {self.layers[i] for i in np.flatnonzero(self.included)}
        self.blocks = _block_ids(self.layers, self.included, self.options.blockwise)
        self.factors = dict.fromkeys(self.layers, 1.0)
        self.history: list[TempBalanceRecord] = []
        self.calls = 0
        names = set(self.layers) | ({REST_GROUP} if groups == "reference" else set())
        if not all(group.get("name") in names for group in optimizer.param_groups):
            regroup_by_layer(optimizer, model, scheduler, groups=groups)
        self._groups = optimizer.param_groups
        for group in self._groups:
            group["schedule_lr"] = group["lr"]
        if scheduler is not None:
            self._wrap(scheduler)

    @property
    def esd_seconds(self) -> float:
        """Total time spent recomputing ESDs and factors (for the training-time overhead)."""
        return sum(record.seconds for record in self.history)

    def step(self) -> bool:
        """Count a call; recompute alphas and factors when due; set lr = eta_t * factor.

        Returns whether the ESD was recomputed. Raises TempBalanceError when a group's lr
        was changed outside TempBalance since the last call (pass the scheduler to it).
        """
        self._check_untouched()
        self.calls += 1
        due = self.every_steps is None or (self.calls - 1) % self.every_steps == 0
        if due:
            self._recompute()
        self._apply()
        return due

    def lrs(self) -> dict[str, float]:
        """The learning rate of each param group, by layer name."""
        return {group["name"]: group["lr"] for group in self._groups}

    # --- internals ---------------------------------------------------------------------

    def _recompute(self) -> None:
        start = time.perf_counter()
        alphas = self._alphas()
        balanced = self.included & np.isfinite(alphas)
        factors = np.ones(len(self.layers))
        if balanced.any():
            _, factors = lr_factors(alphas, self.blocks, balanced, self.options)
        self.factors = dict(zip(self.layers, factors.tolist(), strict=True))
        self.history.append(
            TempBalanceRecord(
                step=self.calls,
                alphas=dict(zip(self.layers, alphas.tolist(), strict=True)),
                factors=dict(self.factors),
                seconds=time.perf_counter() - start,
            )
        )

    def _alphas(self) -> np.ndarray:
        """hill alpha of every included layer (NaN elsewhere), from the current weights."""
        source = open_weights(self.model)
        infos = [info for info in source.infos() if info.name in self._balanced_names]
        alphas = np.full(len(self.layers), np.nan)
        position = {name: i for i, name in enumerate(self.layers)}
        for batch in _same_shape_batches(infos):
            tensors = [source.load(info) for info in batch]  # detached views, no copies
            device = self.device or str(tensors[0].device)
            batch_alphas = self._batch_alphas(tensors, batch[0].layer_type, device)
            for info, alpha in zip(batch, batch_alphas, strict=True):
                alphas[position[info.name]] = alpha
        return alphas

    def _batch_alphas(self, tensors: list[torch.Tensor], layer_type: str,
                      device: str) -> list[float]:
        """hill alpha of each same-shape tensor (NaN when not finite): of its pooled ESD,
        or with FARMS the mean over its window groups."""
        if self.farms is not None:
            return [farms_spectra(t, layer_type, self.farms, device=device).alpha(
                        "hill", self.hill_k) if bool(torch.isfinite(t).all()) else math.nan
                    for t in tensors]
        return [math.nan if evals is None
                else fit_power_law(evals, estimator="hill", hill_k=self.hill_k).alpha
                for evals in pooled_esds(tensors, layer_type, device)]

    def _apply(self) -> None:
        for group in self._groups:
            group["lr"] = group["schedule_lr"] * self._factor(group)

    def _factor(self, group: dict[str, Any]) -> float:
        return self.factors.get(group["name"], 1.0)  # the reference's rest group: 1.0

    def _restore(self) -> None:
        for group in self._groups:
            group["lr"] = group["schedule_lr"]

    def _capture(self) -> None:
        for group in self._groups:
            group["schedule_lr"] = group["lr"]

    def _wrap(self, scheduler: Any) -> None:
        """Make ``scheduler.step()`` read and write the unfactored schedule lr eta_t."""
        original = scheduler.step

        def step(*args: Any, **kwargs: Any) -> None:
            self._check_untouched()
            self._restore()
            try:
                original(*args, **kwargs)
            finally:
                self._capture()
                self._apply()

        scheduler.step = step

    def _check_untouched(self) -> None:
        for group in self._groups:
            expected = group["schedule_lr"] * self._factor(group)
            if group["lr"] != expected:
                raise TempBalanceError(
                    f"param group {group['name']!r}: lr is {group['lr']:g}, TempBalance set "
                    f"{expected:g}; something else changed it (pass the LR scheduler as "
                    "TempBalance(..., scheduler=...) so that it sees the global schedule)"
                )


def _options(
    rule: str,
    lr_range: tuple[float, float],
    scales: tuple[float | None, float, float],
    by_block: bool | None,
) -> TempBalanceOptions:
    if rule not in ("linear", "sigmoid"):
        raise TempBalanceError(f"unknown rule {rule!r}; choose 'linear' or 'sigmoid'")
    low, high = (float(v) for v in lr_range)
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        raise TempBalanceError(f"lr_range must be (low, high) with 0 < low < high, got {lr_range}")
    scale, scale_low, scale_high = scales
    for name, value in (("scale", scale), ("scale_low", scale_low), ("scale_high", scale_high)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise TempBalanceError(f"{name} must be > 0, got {value}")
    sigmoid = ({"scale": scale} if scale is not None
               else {"scale_low": scale_low, "scale_high": scale_high})
    return TempBalanceOptions(variant=rule, lr_min=low, lr_max=high, by_block=by_block, **sigmoid)


def _included(infos: list[MatrixInfo], exclude_first_last: bool, min_evals: int) -> np.ndarray:
    """Layers to balance: not first/last, and at least min_evals pooled eigenvalues."""
    # Pooled ESD size, as the spectral step counts it (and the TB code's eigs_num).
    evals = [min(info.shape[:2]) * math.prod(info.shape[2:]) for info in infos]
    included = np.array([n >= min_evals for n in evals], dtype=bool)
    if exclude_first_last:
        included[[0, -1]] = False
    return included


def _block_ids(names: list[str], included: np.ndarray, blockwise: bool) -> np.ndarray:
    """Block index per layer (from names like ``layers.3.``), or one group per layer."""
    if not blockwise:
        return np.arange(len(names))
    matches = [BLOCK_PATTERN.search(name) for name in names]
    missing = [n for n, m, keep in zip(names, matches, included, strict=True) if keep and not m]
    if missing:
        raise TempBalanceError(
            f"by_block needs a block index in every balanced layer's name (layers.3, h.3, "
            f"blocks.3, ...); none in {', '.join(missing[:3])}: pass by_block=False"
        )
    return np.array([int(m.group(1)) if m else -1 for m in matches], dtype=np.int64)


def regroup_by_layer(optimizer: torch.optim.Optimizer, model: nn.Module,
                     scheduler: Any = None, *, groups: Grouping = "layer") -> None:
    """Split the optimiser's param groups in place into one group per (group, layer).

    Each part keeps its group's hyperparameters and is named by its layer (the assignment
    of ``layer_param_groups``, or of ``reference_param_groups`` with groups="reference");
    the state, keyed by parameter, is untouched. A frozen parameter of a group stays with
    that group's first part. A scheduler's per-group lists (base_lrs, ...) are expanded to
    the new groups.
    """
    by_layer = GROUPINGS[groups](model, 0.0)
    layer_of = {id(p): (i, g["name"]) for i, g in enumerate(by_layer) for p in g["params"]}
    parts: dict[tuple[int, int], dict[str, Any]] = {}  # (layer index, group index) -> group
    for index, group in enumerate(optimizer.param_groups):
        frozen = []
        for p in group["params"]:
            if id(p) in layer_of:
                position, name = layer_of[id(p)]
                part = parts.setdefault((position, index), {**group, "params": [], "name": name})
                part["params"].append(p)
            elif p.requires_grad:
                raise TempBalanceError(
                    f"optimizer param group {group.get('name', index)!r} holds a parameter "
                    f"({tuple(p.shape)}) that is not a trainable parameter of the "
                    f"{type(model).__name__} given to TempBalance")
            else:
                frozen.append(p)
        if frozen:
            first = min((key for key in parts if key[1] == index), default=None)
            if first is None:
                raise TempBalanceError(f"optimizer param group {group.get('name', index)!r} "
                                       "holds only frozen parameters: leave it out")
            parts[first]["params"].extend(frozen)
    keys = sorted(parts)
    origin = [index for _, index in keys]
    optimizer.param_groups[:] = [parts[key] for key in keys]
    if scheduler is not None:
        _expand_per_group(scheduler, origin)


GROUPINGS = {"layer": layer_param_groups, "reference": reference_param_groups}
_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "min_lrs")  # torch schedulers'


def _expand_per_group(scheduler: Any, origin: list[int]) -> None:
    """Give a scheduler's per-group lists one entry per new group (its origin group's)."""
    old_count = max(origin) + 1
    for attribute in _PER_GROUP:
        values = getattr(scheduler, attribute, None)
        if isinstance(values, list) and len(values) == old_count:
            setattr(scheduler, attribute, [values[i] for i in origin])


def pooled_esds(tensors: list[torch.Tensor], layer_type: str,
                device: str) -> list[np.ndarray | None]:
    """Pooled ESD of each same-shape weight tensor (None when not finite), with torch.

    The spectral step's ESD (``steps.core.esd``: float64 eigenvalues of the smaller Gram
    matrix per kernel slice, pooled, conv2d scaled) by one batched ``torch.linalg.eigvalsh``
    on ``device``, CPU included, so that it runs in torch's thread pool.
    """
    slices = [kernel_slices(t) for t in tensors]
    todo = [i for i, t in enumerate(tensors) if bool(torch.isfinite(t).all())]
    out: list[np.ndarray | None] = [None] * len(tensors)
    if todo:
        evals = gram_eigenvalues_batched(torch.cat([slices[i] for i in todo]), device)
        scale = eigenvalue_scale(layer_type, slices[0].shape[0], per_slice=False)
        for i, part in zip(todo, np.split(evals, len(todo)), strict=True):
            out[i] = np.sort(part.ravel() * scale)
    return out


def _same_shape_batches(infos: list[MatrixInfo]) -> Iterator[list[MatrixInfo]]:
    """Runs of same (shape, layer type) matrices, each under the GPU byte budget."""
    by_kind: dict[tuple, list[MatrixInfo]] = {}
    for info in infos:
        by_kind.setdefault((info.shape, info.layer_type), []).append(info)
    for (shape, _), members in by_kind.items():
        per_batch = max(1, _BATCH_BYTES // (8 * math.prod(shape)))
        for start in range(0, len(members), per_batch):
            yield members[start : start + per_batch]

