"""Prunability regimes: a temperature x load phase map of train -> prune -> retrain.

For every value of a temperature-like knob (``epochs``, ``batch_size`` or ``lr`` of the
dense training; SAM rho is not offered: the plain trainer has no SAM) one plain factory model
(MLP or CNN, ``build_model`` seed ``init_seed``) is trained (``finetune`` on a scikit-learn
set, batch order ``data_seed``). At every density it is magnitude-pruned (``prune``, global
magnitude over the Linear / Conv weights) and retrained ``seeds`` times from the pruned
weights on the same mask (``finetune`` with ``keep_mask``; the seed is the batch order; the
retraining schedule, ``retrain_lr`` with cosine decay over ``retrain_epochs``, restarts from
its peak: learning-rate rewinding, the same for every cell). ``diagnose`` mode ``cell``
measures each cell's pairwise LMC barrier and output CKA over the seeds and their test
accuracy; ``collect`` and mode ``regimes`` classify the cells (regime I / II-A / II-B by
``lmc_threshold`` and ``cka_threshold``), advise per cell whether to raise or lower the
knob before pruning, pick the best model of the family per density and draw the phase map.
The result is the classified cells, the per-density picks and the digests of the table and
the phase map; the cells are also a Prefect table artifact.

The defaults (3 epoch counts x 3 densities x 3 seeds of a digits MLP: 51 steps) take about
two minutes inline on a shared 2-core CPU (~10 s of it training; the rest is per-step store
and Prefect work); their thresholds were set on that grid, so its map shows all three
regimes. It is a toy: PreResNet-20 / CIFAR-10 as in the paper needs a GPU worker and
thresholds set anew (the barrier and CKA scales depend on model and data).
"""

from __future__ import annotations

from typing import Literal

import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field, model_validator

from flows.common import FlowRun, RunSettings, flow_run_context

Knob = Literal["epochs", "batch_size", "lr"]


class PrunabilityParams(BaseModel):
    model: Literal["mlp", "cnn"] = Field("mlp", description="Plain factory model.")
    width: int | None = Field(None, ge=1, description="Hidden width (mlp) or first channel "
                              "count (cnn); None: the factory default.")
    dataset: Literal["digits", "iris", "wine", "breast_cancer"] = "digits"
    knob: Knob = Field("epochs", description="Temperature-like knob of the dense training "
                       "(more epochs or a larger lr: hotter; a larger batch size: colder).")
    knob_values: list[float] = Field([2, 8, 32], min_length=1, description="Values of the "
                                     "knob, one dense model each.")
    densities: list[float] = Field([0.02, 0.05, 0.2], min_length=1, description="Shares of "
                                   "the Linear / Conv weights kept by pruning (the load).")
    seeds: list[int] = Field([0, 1, 2], min_length=2, max_length=8, description="Batch-order "
                             "seeds of the retraining (pairs give LMC and CKA).")
    init_seed: int = Field(0, ge=0, description="Initialisation seed of the dense model.")
    data_seed: int = Field(0, ge=0, description="Batch-order seed of the dense training.")
    epochs: int = Field(8, ge=1, description="Dense training epochs (unless the knob).")
    batch_size: int = Field(32, ge=1, description="Batch size of dense training (unless the "
                            "knob) and of retraining.")
    lr: float = Field(0.05, gt=0, description="Dense training lr (unless the knob).")
    retrain_epochs: int = Field(4, ge=1)
    retrain_lr: float = Field(0.25, gt=0, description="Peak lr of the retraining (SGD, "
                              "cosine): large enough that seeds can leave the pruned basin.")
    lmc_threshold: float = Field(0.0, allow_inf_nan=False, description="LMC barrier (train "
                                 "error, % points) above which a cell is in regime I "
                                 "(0: any barrier, mc < 0).")
    cka_threshold: float | None = Field(None, ge=0, le=1, description="Output CKA below "
                                        "which a connected cell is in II-A (else II-B); "
                                        "default: fitted from the cells.")
    line_points: int = Field(11, ge=3, description="Points on the line between two seeds.")

    @model_validator(mode="after")
    def _check(self) -> PrunabilityParams:
        for name in ("knob_values", "densities", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} {values} has repeated values")
        bad = [d for d in self.densities if not 0 < d <= 1]
        if bad:
            raise ValueError(f"densities {bad} are outside (0, 1]")
        if self.knob in ("epochs", "batch_size"):
            bad = [v for v in self.knob_values if v != int(v) or v < 1]
            if bad:
                raise ValueError(f"knob_values {bad}: {self.knob} takes positive integers")
        elif any(v <= 0 for v in self.knob_values):
            raise ValueError(f"knob_values {self.knob_values}: lr must be positive")
        return self


def _knob_value(params: PrunabilityParams, value: float) -> float | int:
    return value if params.knob == "lr" else int(value)


def dense_model(run: FlowRun, params: PrunabilityParams, value: float):
    """Start the training of the dense model at one knob value; returns its future."""
    built = run.step("build_model", {"name": params.model, "width": params.width,
                                     "seed": params.init_seed}, label="build").digests()["model"]
    training = {"epochs": params.epochs, "batch_size": params.batch_size, "lr": params.lr,
                params.knob: _knob_value(params, value)}
    return run.submit("finetune", {"dataset": params.dataset, "seed": params.data_seed,
                                   "optimizer": "sgd", **training},
                      {"model": built}, label=f"train-{params.knob}{value:g}")


def retrain_cell(run: FlowRun, params: PrunabilityParams, dense: str, name: str,
                 density: float) -> list:
    """Prune the dense model to ``density`` and start retraining every seed on its mask;
    returns the retraining futures."""
    pruned = run.step("prune", {"method": "magnitude", "sparsity": round(1.0 - density, 12)},
                      {"model": dense}, label=f"prune-{name}").digests()["model"]
    retrain = {"dataset": params.dataset, "epochs": params.retrain_epochs,
               "batch_size": params.batch_size, "lr": params.retrain_lr, "optimizer": "sgd",
               "keep_mask": True}
    return [run.submit("finetune", retrain | {"seed": seed}, {"model": pruned},
                       label=f"retrain-{name}-s{seed}") for seed in params.seeds]


def measure_cell(run: FlowRun, params: PrunabilityParams, retrained: list, name: str,
                 value: float, density: float):
    """Start the diagnose step of one cell (its retrained seeds); returns its future."""
    inputs = {f"retrained_{i}": f.result().digests()["model"] for i, f in enumerate(retrained)}
    tags = {"knob": params.knob, "knob_value": float(value), "density": float(density),
            "model": params.model}
    return run.submit("diagnose", {"mode": "cell", "dataset": params.dataset,
                                   "line_points": params.line_points, "tags": tags},
                      inputs, label=f"cell-{name}")


@flow(name="prunability", log_prints=True)
def prunability(params: PrunabilityParams = PrunabilityParams(),
                settings: RunSettings = RunSettings()) -> dict:
    """Train, prune and retrain the grid, classify every cell, draw the phase map."""
    with flow_run_context("prunability", settings, params.model_dump()) as run:
        # Each stage is started for every cell before the next waits, so a parallel
        # executor runs the dense trainings, then all retrainings, then all cells at once.
        dense = {value: dense_model(run, params, value) for value in params.knob_values}
        grid = [(value, density, f"{params.knob}{value:g}-d{density:g}")
                for value in params.knob_values for density in params.densities]
        retrained = [retrain_cell(run, params, dense[value].result().digests()["model"],
                                  name, density) for value, density, name in grid]
        futures = [measure_cell(run, params, seeds, name, value, density)
                   for seeds, (value, density, name) in zip(retrained, grid, strict=True)]
        rows = {f"features_{i}": f.result().digests()["features"]
                for i, f in enumerate(futures)}
        cells = run.step("diagnose", {"mode": "collect"}, rows,
                         label="collect").digests()["zoo"]
        classified = run.step("diagnose", {"mode": "regimes",
                                           "lmc_threshold": params.lmc_threshold,
                                           "cka_threshold": params.cka_threshold},
                              {"cells": cells}, label="regimes").digests()
        table = pq.read_table(run.store.get(classified["regimes"],
                                            run.scratch / "regimes.parquet")).to_pylist()
        advice = pq.read_table(run.store.get(classified["advice"],
                                             run.scratch / "advice.parquet")).to_pylist()
        get_run_logger().info("prunability: %d cells, regimes %s, phase map %s", len(table),
                              classified["regimes"][:12], classified["phase_map"][:12])
    columns = ("knob_value", "density", "regime", "knob_advice", "test_accuracy",
               "lmc_barrier", "cka")
    create_table_artifact([{k: row[k] for k in columns} for row in table],
                          key="prunability-regimes",
                          description=f"{params.model} on {params.dataset}, {params.knob} x "
                          f"density; phase map {classified['phase_map']}")
    return {"cells": table, "advice": advice, "regimes": classified["regimes"],
            "advice_table": classified["advice"], "phase_map": classified["phase_map"]}
