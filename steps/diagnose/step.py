"""The diagnose step: loss-landscape features of trained models, and the MD tree on a zoo.

Modes:

- ``features`` (default): inputs ``model`` (a plain factory MLP / CNN), optional ``model_b``
  (the same configuration trained from another seed: connectivity and CKA) and optional
  ``tree`` (an MD tree JSON, as the ``fit`` mode writes it). Outputs ``features`` (Parquet,
  one row: the columns of ``steps.diagnose.features`` plus the model's width, size, the
  training fraction and any ``tags``) and, with a tree, ``diagnosis`` (JSON: the question,
  the answer, the features and the path of comparisons with the tree's thresholds).
  ``fraction`` and ``data_seed`` must be the finetune step's ``fraction`` and ``seed``, so
  the train error is measured on the subset the model was trained on.
- ``collect``: inputs ``features_0`` ... ``features_<n>`` (feature rows) -> ``zoo``
  (Parquet, one row per input, in input order).
- ``cell``: inputs ``retrained_0`` ... ``retrained_<n>`` (n >= 1: the seeds of a pruned model
  retrained on one mask, ``finetune`` with ``keep_mask``) -> ``features`` (Parquet, one row:
  the mean pairwise LMC barrier and output CKA, their worst pair, the seeds' test accuracy
  and measured density, plus ``tags``, e.g. knob, knob_value and density; see
  ``steps.diagnose.regimes.measure_cell``). ``fraction`` / ``data_seed`` pick the training
  data of the LMC as in ``features``.
- ``regimes``: input ``cells`` (cell rows, e.g. ``collect`` of ``cell`` outputs, with the
  knob, knob_value and density columns) -> ``regimes`` (Parquet: the cells with regime I /
  II-A / II-B by ``lmc_threshold`` and ``cka_threshold``, and the advice), ``advice``
  (Parquet: per density the pick of the family and the temperature effect) and ``phase_map``
  (plots: phase_map.png); see ``steps.diagnose.regimes``.
- ``fit``: input ``zoo`` (a table with width, batch_size, fraction and the feature columns,
  e.g. from ``collect`` with the hyperparameters as tags) -> ``labels`` (the grid, seeds
  averaged, with its RFI scores and labels), ``tree`` (the MD tree fitted on the training
  part, JSON) and ``report`` (Parquet: train and test accuracy of the MD tree, the
  hyperparameter tree, the validation tree and the majority class).

Transfer split of ``fit`` (the labels come from the whole grid first, since RFI compares a
configuration with its neighbours; then the rows are split):

- ``cells`` (default): a seeded ``train_share`` of the (fraction, width) cells, each with its
  whole batch-size sweep, is the training part; the other cells are the test part (the
  reference's 'cells' sampling, tested on held-out cells instead of a second collection);
- ``scale``: configurations with fraction <= ``scale_fraction`` (default: the lower half of
  the fractions) train, the larger-data ones test (scale transfer);
- ``all``: train and test on every configuration (in-sample accuracy).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_validator

from steps.core.errors import ParamsError
from steps.core.step import Output, Step, StepContext

Question = Literal["bs_failure", "width_vs_batch", "data_vs_batch"]
Dataset = Literal["digits", "iris", "wine", "breast_cancer"]
MAX_COLLECT = 256  # features_0 .. features_255: a full-size zoo grid has ~100 configurations
COLLECT_INPUTS = tuple(f"features_{i}" for i in range(MAX_COLLECT))
MAX_SEEDS = 8  # retrained_0 .. retrained_7: the paper retrains 3
RETRAINED_INPUTS = tuple(f"retrained_{i}" for i in range(MAX_SEEDS))
GRID_KEYS = ("width", "batch_size", "fraction")
PARQUET = "application/vnd.apache.parquet"


class DiagnoseError(ParamsError):
    """Inputs the diagnose step cannot use (a bad tree, a zoo without its columns, ...)."""


class DiagnoseParams(BaseModel):
    mode: Literal["features", "collect", "fit", "cell", "regimes"] = Field(
        "features", description="features: one model's row (+ diagnosis with a tree); "
        "collect: feature rows -> a zoo table; fit: zoo -> MD tree and report; cell: "
        "retrained seeds of a pruned model -> LMC / CKA row; regimes: cell rows -> "
        "prunability regimes, advice and phase map.")
    dataset: Dataset = Field("digits", description="features: the scikit-learn set the "
                             "model was trained on.")
    split_seed: int = Field(0, ge=0, description="features: seed of its train/test split.")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="features: share of the train "
                            "split the model was trained on (finetune's fraction).")
    data_seed: int = Field(0, ge=0, description="features: seed of that subset (finetune's "
                           "seed).")
    question: Question | None = Field(None, description="features: the tree's question, "
                                      "checked if given; fit: the question (default "
                                      "bs_failure).")
    similarity: bool = Field(False, description="fit bs_failure: the CKA variant of the tree "
                             "(similarity instead of sharpness).")
    tags: dict[str, float | int | str] = Field(default_factory=dict, description="features: "
                                               "extra columns of the row (a zoo's "
                                               "hyperparameters, e.g. batch_size, seed).")
    hessian_samples: int = Field(200, ge=1, description="Training samples of the Hessian.")
    trace_probes: int = Field(32, ge=2, description="Hutchinson probes (a fixed count, so "
                              "cost and result are known in advance; PyHessian stops at a "
                              "1e-3 relative change, up to 100).")
    eigen_iterations: int = Field(30, ge=1, description="Power iterations, at most (top "
                                  "eigenvalue; stops at a 1e-3 relative change as PyHessian, "
                                  "whose cap is 100; not a tree feature).")
    curve_epochs: int | None = Field(None, ge=1, description="Epochs training the Bezier "
                                     "bend (default: the released data's 50 / fraction).")
    curve_lr: float = Field(0.01, gt=0.0, description="SGD lr of the bend (reference 0.01).")
    curve_batch_size: int = Field(128, ge=1)
    curve_weight_decay: float = Field(5e-4, ge=0.0, description="l2 on the curve's point "
                                      "(reference) or SGD weight decay (cosine).")
    curve_schedule: Literal["reference", "cosine"] = Field(
        "reference", description="Bend training: the reference's step-down lr and l2 penalty, "
        "or the shared trainer's cosine lr.")
    curve_points: int = Field(5, ge=3, description="Points on the curve, 0 to 1.")
    line_points: int = Field(11, ge=3, description="Points on the straight line (LMC).")
    seed: int = Field(0, ge=0, description="Seed of probes, Hessian subset and curve.")
    split: Literal["cells", "scale", "all"] = Field("cells", description="fit: the transfer "
                                                    "split (see the module doc).")
    train_share: float = Field(0.5, gt=0.0, lt=1.0, description="fit cells: share of the "
                               "(fraction, width) cells in the training part.")
    scale_fraction: float | None = Field(None, gt=0.0, le=1.0, description="fit scale: "
                                         "largest training fraction (default: lower half).")
    fit_seed: int = Field(0, ge=0, description="fit: draw of the cells, baseline ties.")
    bounds: Literal["reference", "data"] = Field("data", description="fit: threshold ranges "
                                                 "of the reference (ResNet-18 / CIFAR-10) or "
                                                 "of this zoo's features.")
    lmc_threshold: float = Field(0.0, allow_inf_nan=False, description="regimes: an LMC "
                                 "barrier (train error, % points) above it is regime I "
                                 "(default 0: any barrier, mc < 0).")
    cka_threshold: float | None = Field(None, ge=0.0, le=1.0, description="regimes: "
                                        "connected cells with output CKA below it are II-A, "
                                        "the others II-B (default: fitted from the cells).")

    @model_validator(mode="after")
    def _reference_curve_epochs(self) -> DiagnoseParams:
        """The bend's default epochs resolved here, so the manifest records the number."""
        if self.mode == "features" and self.curve_epochs is None:
            from steps.diagnose.features import reference_curve_epochs

            self.curve_epochs = reference_curve_epochs(self.fraction)
        return self


# --------------------------------------------------------------------------- features


def read_tree(path: Path, question: str | None):
    """The MD tree in a JSON file; a DiagnoseError if it is not one (or answers another
    question than ``question``)."""
    from steps.diagnose.mdtree import MDTree

    try:
        tree = MDTree.from_json(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DiagnoseError(f"tree: cannot read {Path(path).name}: {exc}") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DiagnoseError(f"tree: not an MD tree JSON ({reason})") from exc
    if question is not None and tree.question != question:
        raise DiagnoseError(f"tree: it answers {tree.question!r}, not the question "
                            f"{question!r}")
    return tree


def _check_tree_columns(tree, has_pair: bool) -> None:
    from steps.diagnose.features import PAIR_COLUMNS, SINGLE_COLUMNS

    known = set(SINGLE_COLUMNS) | (set(PAIR_COLUMNS) if has_pair else set())
    missing = sorted(set(tree.features.values()) - known)
    if missing:
        hint = " (give model_b, a second seed)" if set(missing) <= set(PAIR_COLUMNS) else ""
        raise DiagnoseError(f"tree: it reads {missing}, which the features do not "
                            f"include{hint}")


def _options(params: DiagnoseParams):
    from steps.diagnose.features import FeatureOptions

    return FeatureOptions(hessian_samples=params.hessian_samples,
                          trace_probes=params.trace_probes,
                          eigen_iterations=params.eigen_iterations,
                          curve_epochs=params.curve_epochs, curve_lr=params.curve_lr,
                          curve_batch_size=params.curve_batch_size,
                          curve_weight_decay=params.curve_weight_decay,
                          curve_schedule=params.curve_schedule,
                          curve_points=params.curve_points, line_points=params.line_points,
                          seed=params.seed)


def features_row(params: DiagnoseParams, inputs: dict[str, Path]) -> dict:
    """The features row of the model input (with model_b's pair columns when given)."""
    from steps.core.factory import load_model
    from steps.core.training import plain_data, plain_kind, training_subset
    from steps.diagnose.features import (
        check_same_architecture,
        landscape_features,
        model_description,
    )

    model = load_model(inputs["model"])
    plain_kind(model)
    model_b = load_model(inputs["model_b"]) if "model_b" in inputs else None
    if model_b is not None:
        check_same_architecture(model, model_b)
    data = plain_data(params.dataset, model, params.split_seed)
    train = training_subset(data, params.fraction, params.data_seed)
    row: dict = {"dataset": params.dataset, "fraction": params.fraction,
                 **model_description(model)}
    measured = landscape_features(model, data, train, model_b=model_b,
                                  options=_options(params))
    clash = sorted(set(params.tags) & (set(row) | set(measured)))
    if clash:
        raise DiagnoseError(f"tags: {clash} would overwrite measured columns")
    return row | params.tags | measured


def diagnosis(tree, row: dict) -> dict:
    """The tree's answer for one features row, with the comparisons that led to it, and how
    the row's features differ from the released data's (a note, and a warning, when the
    tree was fitted on the released data: its thresholds then do not carry over)."""
    from steps.diagnose.features import protocol_differences

    answer, path = tree.predict_path(row)
    differences = protocol_differences(row)
    note = None
    if tree.fitted_on == "released" and differences:
        note = ("this tree was fitted on the released MD-tree data, but these features were "
                "computed differently: " + "; ".join(differences))
        warnings.warn(note, stacklevel=2)
    return {"question": tree.question, "answer": answer, "shape": tree.shape,
            "tree_fitted_on": tree.fitted_on, "features_as_released_data": not differences,
            "feature_differences": differences, "note": note,
            "path": [{"column": c.column, "value": c.value, "threshold": c.threshold,
                      "le": c.le, "text": str(c)} for c in path],
            "features": {k: v for k, v in row.items()}, "tree": json.loads(tree.to_json())}


def _json_safe(value):
    # NaN is not JSON; a diagnosis must be readable by any JSON parser.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def features_mode(ctx: StepContext, params: DiagnoseParams, inputs: dict[str, Path]) -> dict:
    if "model" not in inputs:
        raise DiagnoseError("diagnose features: the model input is required")
    # Check the tree before any measuring: a bad tree must cost nothing.
    tree = read_tree(inputs["tree"], params.question) if "tree" in inputs else None
    if tree is not None:
        _check_tree_columns(tree, "model_b" in inputs)
    row = features_row(params, inputs)
    path = ctx.workdir / "features.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    ctx.log_metrics({k: v for k, v in row.items()
                     if isinstance(v, int | float) and math.isfinite(v)})
    outputs = {"features": Output(path, "landscape-features", PARQUET)}
    if tree is not None:
        result = _json_safe(diagnosis(tree, row))
        out = ctx.workdir / "diagnosis.json"
        out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        outputs["diagnosis"] = Output(out, "diagnosis", "application/json")
    return outputs


# ---------------------------------------------------------------------------- collect


def collect_mode(ctx: StepContext, params: DiagnoseParams, inputs: dict[str, Path]) -> dict:
    names = sorted((n for n in inputs if n.startswith("features_")),
                   key=lambda n: int(n.rsplit("_", 1)[1]))
    if not names or set(inputs) - set(names):
        raise DiagnoseError(f"diagnose collect: takes only features_0 ... features_"
                            f"{MAX_COLLECT - 1} inputs, got {sorted(inputs)}")
    tables = []
    for name in names:
        try:
            tables.append(pq.read_table(inputs[name]))
        except (OSError, pa.ArrowException) as exc:
            raise DiagnoseError(f"{name}: not a Parquet features table ({exc})") from exc
    try:
        zoo = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:
        raise DiagnoseError(f"diagnose collect: the feature tables do not combine ({exc})") \
            from exc
    path = ctx.workdir / "zoo.parquet"
    pq.write_table(zoo, path)
    ctx.log_metrics({"configurations": zoo.num_rows})
    return {"zoo": Output(path, "model-zoo", PARQUET)}


# -------------------------------------------------------------------------------- fit


def _numeric(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(float)


def zoo_grid(zoo: pa.Table) -> pa.Table:
    """One row per (width, batch_size, fraction), numeric columns averaged over seeds, in
    mdtree's layout (width, bs, data, test_acc, log_data_amount, log_para_amount)."""
    needed = {*GRID_KEYS, "test_error"}
    missing = sorted(needed - set(zoo.column_names))
    if missing:
        raise DiagnoseError(f"zoo: missing columns {missing}")
    if zoo.num_rows == 0:
        raise DiagnoseError("zoo: the table has no rows")
    numeric = [n for n in zoo.column_names if n not in GRID_KEYS
               and (pa.types.is_integer(zoo.schema.field(n).type)
                    or pa.types.is_floating(zoo.schema.field(n).type))]
    keys = np.column_stack([_numeric(zoo, k) for k in GRID_KEYS])
    cells, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    counts = np.bincount(group, minlength=len(cells))
    columns = {k: cells[:, i] for i, k in enumerate(GRID_KEYS)}
    for name in numeric:
        values = _numeric(zoo, name)
        with np.errstate(invalid="ignore"):
            columns[name] = np.bincount(group, weights=values, minlength=len(cells)) / counts
    columns["seeds"] = counts.astype(np.int64)
    columns["bs"], columns["data"] = columns["batch_size"], columns["fraction"]
    columns["test_acc"] = 100.0 - columns["test_error"]
    amount = columns.get("train_examples", columns["fraction"])
    columns["log_data_amount"] = np.log(amount)
    columns["log_para_amount"] = np.log(columns.get("parameters", columns["width"]))
    return pa.table(columns)


def split_grid(grid: pa.Table, params: DiagnoseParams) -> tuple[np.ndarray, np.ndarray]:
    """(train mask, test mask) over the grid's rows; see the module doc."""
    fraction, width = _numeric(grid, "fraction"), _numeric(grid, "width")
    everything = np.ones(grid.num_rows, dtype=bool)
    if params.split == "all":
        return everything, everything
    if params.split == "scale":
        fractions = np.unique(fraction)
        limit = params.scale_fraction
        if limit is None:
            limit = fractions[max(0, len(fractions) // 2 - 1)]
        train = fraction <= limit
    else:
        cells = np.unique(np.column_stack([fraction, width]), axis=0)
        if len(cells) < 2:
            raise DiagnoseError("zoo: the cells split needs >= 2 (fraction, width) cells")
        take = min(len(cells) - 1, max(1, round(params.train_share * len(cells))))
        chosen = cells[np.random.RandomState(params.fit_seed).choice(len(cells), take,
                                                                      replace=False)]
        train = np.array([any((f, w) == tuple(c) for c in chosen)
                          for f, w in zip(fraction, width, strict=True)])
    if train.all() or not train.any():
        raise DiagnoseError(f"zoo: the {params.split} split leaves an empty part")
    return train, ~train


# An empty part (no labelled configuration) has no accuracy: None (null), not NaN.
def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float | None:
    return float(np.mean(predicted == labels)) if len(labels) else None


def _majority_share(labels: np.ndarray) -> float | None:
    if not len(labels):
        return None
    return float(np.max(np.unique(labels, return_counts=True)[1]) / len(labels))


def fit_report(grid: pa.Table, train: np.ndarray, test: np.ndarray,
               params: DiagnoseParams):
    """(MD tree fitted on the training part, report rows of every method)."""
    from steps.diagnose.mdtree import (
        CASES,
        OPTIMAL,
        VALIDATION_FEATURES,
        fit_baseline_tree,
        fit_mdtree,
    )

    question = params.question or "bs_failure"
    shape = "bs_failure_cka" if params.similarity and question == "bs_failure" else question
    hyperparameters = next(c.hyperparameters for c in CASES.values() if c.shape == shape)
    needed = _shape_columns(shape) | set(VALIDATION_FEATURES) | set(hyperparameters)
    missing = sorted(needed - set(grid.column_names))
    if missing:
        raise DiagnoseError(f"zoo: missing feature columns {missing} for the {shape} tree")
    labels = grid[question].to_numpy(zero_copy_only=False)
    labelled = labels != OPTIMAL
    parts = {"train": train & labelled, "test": test & labelled}
    if not parts["train"].any():
        raise DiagnoseError(f"zoo: no labelled ({question} != optimal) configuration in the "
                            f"training part; grow the grid")
    rows_of = {part: grid.filter(pa.array(mask)) for part, mask in parts.items()}
    y = {part: labels[mask] for part, mask in parts.items()}
    tree = fit_mdtree(rows_of["train"], y["train"], shape, bounds=params.bounds)
    predictors = {"md_tree": tree}
    for method, columns in (("hyperparameter_tree", hyperparameters),
                            ("validation_tree", VALIDATION_FEATURES)):
        predictors[method] = fit_baseline_tree(rows_of["train"], y["train"], columns,
                                               params.fit_seed)
    report = []
    for method, predictor in predictors.items():
        report.append({"method": method, **{
            f"{part}_accuracy": _accuracy(predictor.predict(rows_of[part]) if len(y[part])
                                          else np.array([]), y[part]) for part in parts}})
    report.append({"method": "majority",
                   **{f"{part}_accuracy": _majority_share(y[part]) for part in parts}})
    for row in report:
        row |= {"question": question, "shape": shape, "split": params.split,
                "train_size": int(parts["train"].sum()), "test_size": int(parts["test"].sum())}
    return tree, report


def _shape_columns(shape: str) -> set[str]:
    from steps.diagnose.mdtree import DEFAULT_FEATURES, SHAPES

    return {DEFAULT_FEATURES[r] for r in SHAPES[shape].roles}


def fit_mode(ctx: StepContext, params: DiagnoseParams, inputs: dict[str, Path]) -> dict:
    from steps.diagnose.mdtree import label_grid

    if set(inputs) != {"zoo"}:
        raise DiagnoseError(f"diagnose fit: takes the zoo input only, got {sorted(inputs)}")
    try:
        zoo = pq.read_table(inputs["zoo"])
    except (OSError, pa.ArrowException) as exc:
        raise DiagnoseError(f"zoo: not a Parquet table ({exc})") from exc
    grid = label_grid(zoo_grid(zoo))
    train, test = split_grid(grid, params)
    grid = grid.append_column("part", pa.array(np.where(train & test, "both",
                                                        np.where(train, "train", "test"))))
    tree, report = fit_report(grid, train, test, params)
    labels_path, tree_path = ctx.workdir / "labels.parquet", ctx.workdir / "tree.json"
    report_path = ctx.workdir / "report.parquet"
    pq.write_table(grid, labels_path)
    tree_path.write_text(tree.to_json() + "\n")
    pq.write_table(pa.Table.from_pylist(report), report_path)
    ctx.log_metrics({f"{r['method']}_{part}": r[f"{part}_accuracy"] for r in report
                     for part in ("train", "test") if r[f"{part}_accuracy"] is not None})
    return {"labels": Output(labels_path, "zoo-labels", PARQUET),
            "tree": Output(tree_path, "md-tree", "application/json"),
            "report": Output(report_path, "diagnosis-report", PARQUET)}


# ----------------------------------------------------------------- cell and regimes


def _numbered(inputs: dict[str, Path], prefix: str) -> list[str]:
    return sorted((n for n in inputs if n.startswith(prefix)),
                  key=lambda n: int(n.rsplit("_", 1)[1]))


def cell_mode(ctx: StepContext, params: DiagnoseParams, inputs: dict[str, Path]) -> dict:
    from steps.core.factory import load_model
    from steps.core.training import plain_data, plain_kind, training_subset
    from steps.diagnose.features import check_same_architecture
    from steps.diagnose.regimes import measure_cell

    names = _numbered(inputs, "retrained_")
    if len(names) < 2:
        raise DiagnoseError(f"diagnose cell: needs >= 2 retrained seeds (retrained_0, "
                            f"retrained_1, ...), got {sorted(inputs)}")
    models = [load_model(inputs[name]) for name in names]
    for name, model in zip(names, models, strict=True):
        plain_kind(model, name)
        check_same_architecture(models[0], model)
    data = plain_data(params.dataset, models[0], params.split_seed)
    train = training_subset(data, params.fraction, params.data_seed)
    measured = measure_cell(models, data, train, line_points=params.line_points)
    clash = sorted(set(params.tags) & set(measured))
    if clash:
        raise DiagnoseError(f"tags: {clash} would overwrite measured columns")
    row = {"dataset": params.dataset} | params.tags | measured
    path = ctx.workdir / "cell.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    ctx.log_metrics({k: v for k, v in measured.items() if math.isfinite(v)})
    return {"features": Output(path, "prunability-cell", PARQUET)}


def regimes_mode(ctx: StepContext, params: DiagnoseParams, inputs: dict[str, Path]) -> dict:
    from steps.diagnose.regimes import (
        Thresholds,
        classify_cells,
        density_summary,
        plot_phase_map,
        resolve_thresholds,
    )

    if set(inputs) != {"cells"}:
        raise DiagnoseError(f"diagnose regimes: takes the cells input only, got "
                            f"{sorted(inputs)}")
    try:
        rows = pq.read_table(inputs["cells"]).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise DiagnoseError(f"cells: not a Parquet table ({exc})") from exc
    given = Thresholds(params.lmc_threshold, params.cka_threshold)
    cells = classify_cells(rows, given)
    thresholds = resolve_thresholds(cells, given)  # the fitted CKA threshold, when fitted
    summary = density_summary(cells)
    plots = ctx.workdir / "plots"
    plot = plot_phase_map(cells, summary, thresholds, plots / "phase_map.png")
    ctx.log_file(plot, "plots")
    regimes_path, advice_path = ctx.workdir / "regimes.parquet", ctx.workdir / "advice.parquet"
    pq.write_table(pa.Table.from_pylist(cells), regimes_path)
    pq.write_table(pa.Table.from_pylist(summary), advice_path)
    ctx.log_metrics({f"cells_{name}": sum(c["regime"] == name for c in cells)
                     for name in ("I", "II-A", "II-B")}
                    | {"lmc_threshold": thresholds.lmc_barrier, "cka_threshold": thresholds.cka})
    return {"regimes": Output(regimes_path, "prunability-regimes", PARQUET),
            "advice": Output(advice_path, "prunability-advice", PARQUET),
            "phase_map": Output(plots, "plots")}


# ------------------------------------------------------------------------------- step


def diagnose_step(ctx: StepContext, params: DiagnoseParams, inputs: dict[str, Path]) -> dict:
    given = set(inputs)
    allowed = {"features": {"model", "model_b", "tree"}, "collect": set(COLLECT_INPUTS),
               "fit": {"zoo"}, "cell": set(RETRAINED_INPUTS), "regimes": {"cells"}}[params.mode]
    if given - allowed:
        raise DiagnoseError(f"diagnose {params.mode}: unexpected inputs "
                            f"{sorted(given - allowed)}; it takes {_describe(params.mode)}")
    return {"features": features_mode, "collect": collect_mode, "fit": fit_mode,
            "cell": cell_mode, "regimes": regimes_mode}[params.mode](ctx, params, inputs)


def _describe(mode: str) -> str:
    return {"features": "model, optional model_b and tree",
            "collect": f"features_0 ... features_{MAX_COLLECT - 1}", "fit": "zoo",
            "cell": f"retrained_0 ... retrained_{MAX_SEEDS - 1} (>= 2)",
            "regimes": "cells"}[mode]


def collect_inputs(digests: list[str]) -> dict[str, str]:
    """The inputs of mode collect for a list of feature artifacts, in order."""
    if len(digests) > MAX_COLLECT:
        raise DiagnoseError(f"diagnose collect: at most {MAX_COLLECT} feature tables, got "
                            f"{len(digests)}")
    return {f"features_{i}": d for i, d in enumerate(digests)}


STEP = Step(name="diagnose", version="1", params=DiagnoseParams, inputs=(), fn=diagnose_step,
            optional_inputs=("model", "model_b", "tree", "zoo", "cells", *COLLECT_INPUTS,
                             *RETRAINED_INPUTS))
