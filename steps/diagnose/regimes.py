"""Prunability regimes: where a pruned model sits in the temperature x load phase map.

    row = measure_cell(retrained_models, data, train)         # LMC, CKA, accuracy of a cell
    regime(row["lmc_barrier"], row["cka"], Thresholds())      # "I", "II-A" or "II-B"
    cells = classify_cells(rows, Thresholds())                # + regime and advice per cell
    summary = density_summary(cells)                          # per density: the pick
    plot_phase_map(cells, summary, Thresholds(), "phase_map.png")

The three-regime model of pruning (METHODS.md section 4, "Prunability regimes"): a dense
model is trained at some value of a temperature-like knob (epochs, batch size, learning
rate), magnitude-pruned to a density (the load-like knob), and retrained from the pruned
weights with several seeds on the same mask. The retrained seeds of one (knob, density)
cell place it in

- regime I (poorly connected): the mean pairwise linear-mode-connectivity barrier on the
  training data is above ``Thresholds.lmc_barrier`` (train error, percentage points);
- regime II-A (connected, dissimilar outputs): not I, and the mean pairwise CKA of the
  seeds' softmax outputs on training inputs is below ``Thresholds.cka``;
- regime II-B (connected, similar outputs): neither.

A value exactly at a threshold counts as connected (LMC) and as similar (CKA).

Measured as the reference measures it (YefanZhou/ThreeRegimePruning,
``loss_landscape_measure/cka_simi.py`` and ``lmc.py``): CKA is the biased linear CKA of the
softmax outputs of the first 101 training batches of 64, in order, without augmentation
(``--CKA-batches 100`` with its ``batch_idx > num_batches`` stop, ``--train-batch 64``,
``trainset_shuffle=False``), averaged over seed pairs; LMC is mc on an 11-point line in train
error, averaged over pairs.

Where the thresholds come from. The released code has no thresholds: its notebook plots raw
LMC and CKA maps, and the paper separates the regimes qualitatively (Figure 1: "LMC
identifies regime I versus II; the similarity of outputs between models in well-connected
regimes then identifies II-A and II-B", "relatively dissimilar" vs "relatively similar").
So: the LMC threshold is 0, the sign of mc (METHODS.md section 4: mc < 0 is a barrier; a
linear path with a barrier is not linearly connected, as in Frankle et al.); the CKA
threshold is fitted from the cells themselves, the paper's "relatively": the best split of
the connected cells' CKA values into two groups (least within-group sum of squares, the
1-D two-cluster optimum), at the midpoint of the gap (``fit_cka_threshold``). Either can be
given instead.

Advice per cell (the paper's favourable transitions, I -> II-A -> II-B): in I raise the
temperature, in II-A lower it, in II-B keep it. The knob says what that means: more epochs
or a larger learning rate is a higher temperature, a larger batch size a lower one
(``TEMPERATURE_SIGN``), so "raise the temperature" is "raise epochs" or "lower batch_size".

Picking the best model of a family to prune (one pick per target density): among the cells
in II-B, the one with the best mean retrained test accuracy (II-B is where a pruned model is
best and stable across retraining seeds); when no cell of that density is in II-B, the one
with the best accuracy overall. The accuracy argmax is reported beside the pick, and so is
the rank correlation of accuracy with temperature at each density: its sign flips at the
load threshold the paper describes (temperature helps at some densities, hurts at others).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steps.core.errors import ParamsError
from steps.core.sparsity import density as weight_density
from steps.core.training import PlainData, evaluate
from steps.diagnose.cka import output_cka
from steps.diagnose.connectivity import linear_path
from steps.diagnose.hessian import eval_mode

__all__ = ["CELL_COLUMNS", "CKA_BATCHES", "CKA_BATCH_SIZE", "REGIMES", "TEMPERATURE_SIGN",
           "RegimeError", "Thresholds", "classify_cells", "density_summary",
           "fit_cka_threshold", "knob_advice", "measure_cell", "plot_phase_map", "regime",
           "resolve_thresholds", "temperature_advice"]

REGIMES = ("I", "II-A", "II-B")
# +1: a larger value is a higher temperature (more noise, longer training); -1: lower.
TEMPERATURE_SIGN = {"epochs": 1, "lr": 1, "batch_size": -1}
ADVICE = {"I": "raise", "II-A": "lower", "II-B": "keep"}  # what to do with the temperature
CELL_COLUMNS = ("knob", "knob_value", "density", "lmc_barrier", "cka", "test_accuracy")
COLOURS = {"I": "#d95f02", "II-A": "#7570b3", "II-B": "#1b9e77"}

Batch = tuple[Any, Any]


class RegimeError(ParamsError):
    """Inputs the regime classification cannot use (bad thresholds, cells or values)."""


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RegimeError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RegimeError(f"{what}: expected a finite number, got {value!r}")
    return number


# ThreeRegimePruning cka_simi.py: batches 0..100 of the unshuffled training loader, 64 each.
CKA_BATCHES = 101
CKA_BATCH_SIZE = 64


@dataclass(frozen=True)
class Thresholds:
    """Regime boundaries: LMC barrier (train error, % points; 0 = the sign of mc) and output
    CKA (None: fitted from the cells, see the module doc)."""

    lmc_barrier: float = 0.0
    cka: float | None = None

    def __post_init__(self) -> None:
        _finite(self.lmc_barrier, "lmc_threshold")
        if self.cka is not None and not 0.0 <= _finite(self.cka, "cka_threshold") <= 1.0:
            raise RegimeError(f"cka_threshold: CKA lies in [0, 1], got {self.cka}")


def fit_cka_threshold(rows: Sequence[Mapping[str, Any]], lmc_barrier: float) -> float:
    """The CKA threshold that best splits the connected cells (barrier <= ``lmc_barrier``)
    into relatively dissimilar and relatively similar ones: over every cut of their sorted
    CKA values, the one with the least within-group sum of squares, at the midpoint of its
    gap. With fewer than two distinct values there is nothing relative to split: 0.0
    (every connected cell counts as similar)."""
    values = np.unique([_finite(r["cka"], "cka") for r in rows
                        if _finite(r["lmc_barrier"], "lmc_barrier") <= lmc_barrier])
    if len(values) < 2:
        return 0.0
    costs = [values[:cut].var() * cut + values[cut:].var() * (len(values) - cut)
             for cut in range(1, len(values))]
    cut = int(np.argmin(costs)) + 1
    return float((values[cut - 1] + values[cut]) / 2)


def resolve_thresholds(rows: Sequence[Mapping[str, Any]], thresholds: Thresholds) -> Thresholds:
    """``thresholds`` with a fitted CKA threshold where none was given."""
    if thresholds.cka is not None:
        return thresholds
    return Thresholds(thresholds.lmc_barrier, fit_cka_threshold(rows, thresholds.lmc_barrier))


# ----------------------------------------------------------------- classification


def regime(lmc_barrier: float, cka: float, thresholds: Thresholds) -> str:
    """"I" above the LMC threshold, else "II-A" below the CKA threshold, else "II-B"."""
    barrier = _finite(lmc_barrier, "lmc_barrier")
    similarity = _finite(cka, "cka")
    if thresholds.cka is None:
        raise RegimeError("cka_threshold: one cell cannot fit it; give it, or classify "
                          "the cells together (classify_cells)")
    if barrier > thresholds.lmc_barrier:
        return "I"
    return "II-A" if similarity < thresholds.cka else "II-B"


def _check_regime(name: str) -> str:
    if name not in REGIMES:
        raise RegimeError(f"regime: unknown regime {name!r}; one of {', '.join(REGIMES)}")
    return name


def temperature_advice(name: str) -> str:
    """What to do with the temperature before pruning: raise (I), lower (II-A), keep (II-B)."""
    return ADVICE[_check_regime(name)]


def _check_knob(knob: str) -> str:
    if knob not in TEMPERATURE_SIGN:
        raise RegimeError(f"knob: unknown temperature-like knob {knob!r}; one of "
                          f"{', '.join(TEMPERATURE_SIGN)}")
    return knob


def knob_advice(name: str, knob: str) -> str:
    """The advice in the knob's own terms, e.g. "raise epochs" or "lower batch_size"."""
    direction = temperature_advice(name)
    if direction != "keep" and TEMPERATURE_SIGN[_check_knob(knob)] < 0:
        direction = "lower" if direction == "raise" else "raise"
    return f"{direction} {_check_knob(knob)}"


def classify_cells(rows: Sequence[Mapping[str, Any]],
                   thresholds: Thresholds = Thresholds()) -> list[dict]:
    """The cells (one row per knob value x density) with regime and advice columns added
    (a CKA threshold not given is fitted from these cells; ``resolve_thresholds``).

    Rows are sorted by density, then knob value. Every row needs ``CELL_COLUMNS``; all share
    one knob, and no (knob_value, density) appears twice.
    """
    if not rows:
        raise RegimeError("cells: no rows to classify")
    missing = sorted({c for row in rows for c in CELL_COLUMNS if c not in row})
    if missing:
        raise RegimeError(f"cells: missing columns {missing} (each row needs "
                          f"{', '.join(CELL_COLUMNS)})")
    knobs = sorted({str(row["knob"]) for row in rows})
    if len(knobs) != 1:
        raise RegimeError(f"cells: one temperature-like knob per phase map, got {knobs}")
    knob = _check_knob(knobs[0])
    thresholds = resolve_thresholds(rows, thresholds)
    seen: set[tuple[float, float]] = set()
    out = []
    for i, row in enumerate(rows):
        value = _finite(row["knob_value"], f"cells row {i} knob_value")
        load = _finite(row["density"], f"cells row {i} density")
        if not 0.0 < load <= 1.0:
            raise RegimeError(f"cells row {i} density: expected (0, 1], got {load}")
        if (value, load) in seen:
            raise RegimeError(f"cells: {knob}={value:g} at density {load:g} appears twice")
        seen.add((value, load))
        name = regime(row["lmc_barrier"], row["cka"], thresholds)
        _finite(row["test_accuracy"], f"cells row {i} test_accuracy")
        out.append(dict(row) | {"regime": name, "temperature_advice": temperature_advice(name),
                                "knob_advice": knob_advice(name, knob),
                                "lmc_threshold": thresholds.lmc_barrier,
                                "cka_threshold": thresholds.cka})
    return sorted(out, key=lambda r: (float(r["density"]), float(r["knob_value"])))


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 0 .. n-1, equal values sharing their mean rank."""
    v = np.asarray(values, dtype=float)
    ranks = np.empty(len(v))
    ranks[np.argsort(v, kind="stable")] = np.arange(len(v))
    for value in np.unique(v):
        ranks[v == value] = ranks[v == value].mean()
    return ranks


def _rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho; None with fewer than 2 points or a constant side (undefined)."""
    rx, ry = _ranks(x), _ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _pick(cells: list[dict]) -> tuple[dict, str]:
    best_b = [c for c in cells if c["regime"] == "II-B"]
    pool, rule = (best_b, "best II-B") if best_b else (cells, "best accuracy (no II-B cell)")
    # max keeps the first of equals: the lowest knob value, as cells are sorted.
    return max(pool, key=lambda c: float(c["test_accuracy"])), rule


def density_summary(cells: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per density of classified cells: the pick (see the module doc) and the evidence."""
    out = []
    for load in sorted({float(c["density"]) for c in cells}):
        group = sorted((dict(c) for c in cells if float(c["density"]) == load),
                       key=lambda c: float(c["knob_value"]))
        knob = str(group[0]["knob"])
        pick, rule = _pick(group)
        best = max(group, key=lambda c: float(c["test_accuracy"]))
        temperature = [TEMPERATURE_SIGN[knob] * float(c["knob_value"]) for c in group]
        rho = _rank_correlation(temperature, [float(c["test_accuracy"]) for c in group])
        out.append({
            "density": load, "knob": knob, "cells": len(group),
            **{f"cells_{name}": sum(c["regime"] == name for c in group) for name in REGIMES},
            "pick_knob_value": float(pick["knob_value"]), "pick_regime": pick["regime"],
            "pick_test_accuracy": float(pick["test_accuracy"]), "pick_rule": rule,
            "best_knob_value": float(best["knob_value"]),
            "best_test_accuracy": float(best["test_accuracy"]),
            "accuracy_temperature_corr": rho,
            "temperature_effect": None if rho is None else
            ("helps" if rho > 0 else "hurts" if rho < 0 else "none")})
    return out


# ---------------------------------------------------------------------- measuring


def _accuracy(model: nn.Module, data: Batch) -> tuple[float, float]:
    loss, accuracy = evaluate(model, data, "classification", F.cross_entropy)
    return loss, accuracy


def measure_cell(models: Sequence[nn.Module], data: PlainData, train: Batch, *,
                 line_points: int = 11) -> dict[str, float | int]:
    """LMC barrier and output CKA over every pair of retrained seeds, and their accuracy.

    ``lmc_barrier`` is the mean over pairs of -mc on the straight line between two seeds
    (train error %, on ``train``; BatchNorm re-estimated at every point from it),
    ``cka`` the mean linear CKA of their softmax outputs on the reference's CKA inputs: the
    first 101 x 64 training inputs, in order (all of them when there are fewer); ``_max`` /
    ``_min`` give the worst pair. ``test_accuracy`` is the seeds' mean (``_std`` their
    spread), ``density`` the measured share of non-zero prunable weights of the first seed.
    A seed whose outputs are the same for every CKA input (its training collapsed) has no
    defined CKA; its pairs count 0 (no shared structure) and ``collapsed_seeds`` counts it.
    """
    if len(models) < 2:
        raise RegimeError(f"retrained models: need >= 2 seeds for pairs, got {len(models)}")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for m in models[0].modules())
    cka_inputs = data.x_train[:CKA_BATCHES * CKA_BATCH_SIZE]
    collapsed = [_collapsed(m, cka_inputs) for m in models]
    barriers, similarities = [], []
    for (i, a), (j, b) in itertools.combinations(enumerate(models), 2):
        path = linear_path(a, b, train, points=line_points, bn_data=train if has_bn else None)
        barriers.append(-path.mc)
        # CKA is undefined for constant outputs; a collapsed seed shares no structure.
        similarities.append(0.0 if collapsed[i] or collapsed[j]
                            else output_cka(a, b, cka_inputs))
    scores = [_accuracy(m, data.test) for m in models]
    accuracies = [accuracy for _, accuracy in scores]
    return {"lmc_barrier": float(np.mean(barriers)), "lmc_barrier_max": float(max(barriers)),
            "cka": float(np.mean(similarities)), "cka_min": float(min(similarities)),
            "cka_samples": len(cka_inputs),
            "test_accuracy": float(np.mean(accuracies)),
            "test_accuracy_std": float(np.std(accuracies)),
            "test_loss": float(np.mean([loss for loss, _ in scores])),
            "measured_density": weight_density(models[0]), "seeds": len(models),
            "pairs": len(barriers), "collapsed_seeds": sum(collapsed)}


@torch.no_grad()
def _collapsed(model: nn.Module, inputs: torch.Tensor) -> bool:
    """True when the model's softmax outputs do not vary over the inputs (a dead network)."""
    with eval_mode(model):
        probs = torch.softmax(model(inputs), dim=-1).to(torch.float64)
    return bool((probs - probs.mean(0)).abs().max() == 0)


# ------------------------------------------------------------------------ plotting


def _axis(values: Iterable[float]) -> list[float]:
    return sorted({float(v) for v in values})


def plot_phase_map(cells: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]],
                   thresholds: Thresholds, path: str | Path) -> Path:
    """The phase map: knob value (x) x density (y), each cell coloured by its regime and
    annotated with accuracy, LMC barrier and CKA; the pick of each density is outlined."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if not cells:
        raise RegimeError("cells: nothing to plot")
    thresholds = resolve_thresholds(cells, thresholds)
    knob = str(cells[0]["knob"])
    xs, ys = _axis(c["knob_value"] for c in cells), _axis(c["density"] for c in cells)
    fig, ax = plt.subplots(figsize=(1.9 * len(xs) + 2.6, 1.2 * len(ys) + 1.8))
    for c in cells:
        x, y = xs.index(float(c["knob_value"])), ys.index(float(c["density"]))
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, color=COLOURS[c["regime"]],
                               alpha=0.85))
        ax.text(x, y, f"{c['regime']}\nacc {100 * float(c['test_accuracy']):.1f}%\n"
                f"LMC {float(c['lmc_barrier']):.2f}  CKA {float(c['cka']):.3f}",
                ha="center", va="center", fontsize=8, color="white")
    for row in summary:
        x, y = xs.index(float(row["pick_knob_value"])), ys.index(float(row["density"]))
        ax.add_patch(Rectangle((x - 0.47, y - 0.47), 0.94, 0.94, fill=False,
                               edgecolor="black", linewidth=2.5))
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_ylim(-0.5, len(ys) - 0.5)
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    warmer = "right" if TEMPERATURE_SIGN.get(knob, 1) > 0 else "left"
    ax.set_xlabel(f"{knob} of the dense model (temperature rises to the {warmer})")
    ax.set_ylabel("density of the pruned model (load)")
    ax.set_title(f"Prunability regimes: I if LMC barrier > {thresholds.lmc_barrier:g} %, "
                 f"else II-A if CKA < {thresholds.cka:g}; outlined: pick", fontsize=9)
    ax.legend(handles=[Patch(color=COLOURS[name], label=label) for name, label in (
        ("I", "I: poorly connected"), ("II-A", "II-A: connected, dissimilar"),
        ("II-B", "II-B: connected, similar"))], loc="upper left", bbox_to_anchor=(1.01, 1),
        fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
