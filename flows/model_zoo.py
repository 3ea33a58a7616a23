"""A model zoo and the MD tree grown on it: train a grid, measure landscapes, fit, report.

For every width x batch size x data fraction, two seeds of a plain factory model (MLP or
CNN) are built (``build_model`` seed = initialisation) and trained on the same seeded
low-data subset (``finetune`` with a scikit-learn ``dataset``; ``data_seed`` draws the
subset and the batch order); ``diagnose`` measures the first seed's landscape and its
connectivity and output CKA with the second; ``diagnose`` mode ``collect`` gathers the rows
into one zoo table (the hyperparameters ride along as tags) and mode ``fit`` labels the
grid by room for improvement, fits the MD tree and its baselines on one part of the grid
and tests them on the other (``split``). The result is the report rows (train and test
accuracy of MD tree, hyperparameter tree, validation tree and majority class), also a
Prefect table artifact.

The defaults (2 widths x 2 batch sizes x 2 fractions x 2 seeds on digits, 4 epochs) run on
a CPU in a few minutes: enough to exercise every step, too small for the accuracies to mean
much (a 2-batch-size sweep gives one labelled configuration per cell). A full-size run, on
a GPU worker (``diagnose`` and ``finetune`` ask for one in containers/steps.yaml):

    ModelZooParams(widths=[4, 8, 16, 32, 64, 128], batch_sizes=[8, 16, 32, 64, 128, 256],
                   fractions=[0.1, 0.2, 0.4, 0.6, 0.8, 1.0], epochs=60, lr=0.05,
                   trace_probes=100, curve_epochs=None, hessian_samples=200)

(216 configurations, 432 trainings; at most 256 configurations fit one ``collect``).
"""

from __future__ import annotations

from itertools import product
from typing import Literal

import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.common import FlowRun, RunSettings, flow_run_context


class ModelZooParams(BaseModel):
    model: Literal["mlp", "cnn"] = Field("mlp", description="Plain factory model.")
    dataset: Literal["digits", "iris", "wine", "breast_cancer"] = "digits"
    widths: list[int] = Field([8, 32], min_length=1, description="Hidden widths (mlp) or "
                              "first channel counts (cnn).")
    batch_sizes: list[int] = Field([16, 128], min_length=2, description="Batch sizes: the "
                                   "temperature knob (lr / batch size).")
    fractions: list[float] = Field([0.25, 1.0], min_length=1,
                                   description="Shares of the training split.")
    seeds: tuple[int, int] = Field((0, 1), description="Initialisation seeds of the two "
                                   "models per configuration (connectivity, CKA).")
    data_seed: int = Field(0, ge=0, description="Seed of the training subset and batch order.")
    epochs: int = Field(4, ge=1)
    lr: float = Field(0.05, gt=0)
    question: Literal["bs_failure", "width_vs_batch", "data_vs_batch"] = "bs_failure"
    split: Literal["cells", "scale", "all"] = Field("cells", description="Transfer split of "
                                                    "the fit (see the diagnose step).")
    hessian_samples: int = Field(200, ge=1)
    trace_probes: int = Field(16, ge=2)
    eigen_iterations: int = Field(20, ge=1)
    curve_epochs: int | None = Field(4, ge=1, description="Epochs training each Bezier bend "
                                     "(null: the released data's 50 / fraction).")


def trained_model(run: FlowRun, params: ModelZooParams, width: int, batch_size: int,
                  fraction: float, seed: int) -> str:
    """The digest of one zoo member: built with ``seed``, trained on the shared subset."""
    name = f"w{width}-b{batch_size}-f{fraction:g}-s{seed}"
    built = run.step("build_model", {"name": params.model, "width": width, "seed": seed},
                     label=f"build-w{width}-s{seed}").digests()["model"]
    trained = run.step("finetune", {"dataset": params.dataset, "batch_size": batch_size,
                                    "fraction": fraction, "seed": params.data_seed,
                                    "epochs": params.epochs, "lr": params.lr,
                                    "optimizer": "sgd"},
                       {"model": built}, label=f"finetune-{name}")
    return trained.digests()["model"]


def measure(run: FlowRun, params: ModelZooParams, width: int, batch_size: int,
            fraction: float):
    """Start the diagnose step of one configuration (its two seeds); returns its future."""
    first, second = (trained_model(run, params, width, batch_size, fraction, seed)
                     for seed in params.seeds)
    options = {"dataset": params.dataset, "fraction": fraction, "data_seed": params.data_seed,
               "hessian_samples": params.hessian_samples, "trace_probes": params.trace_probes,
               "eigen_iterations": params.eigen_iterations,
               "curve_epochs": params.curve_epochs,
               "tags": {"batch_size": batch_size, "seed": params.seeds[0],
                        "seed_b": params.seeds[1]}}
    return run.submit("diagnose", options, {"model": first, "model_b": second},
                      label=f"diagnose-w{width}-b{batch_size}-f{fraction:g}")


@flow(name="model_zoo", log_prints=True)
def model_zoo(params: ModelZooParams = ModelZooParams(),
              settings: RunSettings = RunSettings()) -> list[dict]:
    """Train the grid, measure every configuration, fit the MD tree; returns the report."""
    with flow_run_context("model_zoo", settings, params.model_dump()) as run:
        grid = list(product(params.widths, params.batch_sizes, params.fractions))
        futures = [measure(run, params, *config) for config in grid]
        rows = {f"features_{i}": f.result().digests()["features"]
                for i, f in enumerate(futures)}
        zoo = run.step("diagnose", {"mode": "collect"}, rows,
                       label="collect").digests()["zoo"]
        fitted = run.step("diagnose", {"mode": "fit", "question": params.question,
                                       "split": params.split}, {"zoo": zoo}, label="fit")
        digests = fitted.digests()
        path = run.store.get(digests["report"], run.scratch / "report.parquet")
        report = pq.read_table(path).to_pylist()
        get_run_logger().info("model zoo: %d configurations, zoo %s, tree %s", len(grid),
                              zoo[:12], digests["tree"][:12])
    create_table_artifact(report, key="model-zoo-report",
                          description=f"{params.question} on {len(grid)} {params.model} "
                          f"configurations ({params.split} split); tree {digests['tree']}, "
                          f"zoo {zoo}")
    return report
