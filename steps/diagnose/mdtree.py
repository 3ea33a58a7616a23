"""MD tree: diagnose why a trained model fails from its loss landscape.

Zhou et al., "MD tree: a model-diagnostic tree grown on loss landscape" (ICML 2024); reference
code and data YefanZhou/ModelDiagnosis (MIT). Three questions about a model trained with some
width, batch size and amount of data:

- Q1 ``bs_failure``: is the temperature (lr / batch size) too small or too large?
- Q2a ``width_vs_batch``: would a wider model help more than another batch size?
- Q2b ``data_vs_batch``: would more data help more than another batch size?

The labels come from "room for improvement" (RFI) on a grid of trained configurations. The MD
tree answers from train error, mode connectivity and Hessian trace (or output CKA) with a
fixed-shape tree whose thresholds are fitted one at a time, each by a bounded scalar search of
training accuracy. Baselines are depth-4 decision trees on hyperparameters or on validation
metrics; the protocols (dataset transfer, scale transfer) follow the reference code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from sklearn.tree import DecisionTreeClassifier

Columns = pa.Table | Mapping[str, ArrayLike]

OPTIMAL = "optimal"  # label of ties: no knob helps more than the other; never trained on
SEEDS = (42, 90, 38, 18, 72)  # the reference's seeds
HYPERPARAMETER_FEATURES = ("log_data_amount", "log_para_amount")
VALIDATION_FEATURES = ("train_error", "train_loss", "test_loss", "test_error")
DEFAULT_FEATURES = {  # tree role -> column of the released data
    "train_error": "train_error",  # %
    "connectivity": "mode_connectivity_peak",  # %, minus the peak train error on the curve
    "sharpness": "hessian_t",  # log Hessian trace
    "similarity": "CKA",  # output CKA between two seeds
}


def _column(data: Columns, name: str) -> np.ndarray:
    if isinstance(data, pa.Table):
        return data[name].to_numpy(zero_copy_only=False)
    return np.asarray(data[name])


def _matrix(data: Columns, names: Sequence[str]) -> np.ndarray:
    return np.column_stack([_column(data, n).astype(float) for n in names])


RELEASED_KEY = b"tailwise.md_collection"


def read_collection(path: str | Path) -> pa.Table:
    """A collection of trained configurations (the released CSV layout) as a table, marked
    as released data: a tree fitted on it records so (``MDTree.fitted_on``)."""
    table = pacsv.read_csv(path)
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          RELEASED_KEY: b"released"})


def _fitted_on(data: Columns) -> str:
    """"released" for a table from ``read_collection`` (or rows of one), else "zoo"."""
    metadata = getattr(getattr(data, "schema", None), "metadata", None) or {}
    return "released" if metadata.get(RELEASED_KEY) == b"released" else "zoo"


# --- labels from room for improvement ---------------------------------------------------------


def _best_along(others: np.ndarray, axis: np.ndarray, accuracy: np.ndarray,
                upwards: bool) -> np.ndarray:
    """Per configuration, the best accuracy over those with the same ``others`` whose ``axis``
    value is >= its own (``upwards``) or <= it: itself included, so RFI >= 0."""
    _, group = np.unique(others, axis=0, return_inverse=True)
    best = np.empty_like(accuracy)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        order = members[np.argsort(axis[members], kind="stable")]
        if upwards:
            best[order] = np.maximum.accumulate(accuracy[order][::-1])[::-1]
        else:
            best[order] = np.maximum.accumulate(accuracy[order])
    return best


def room_for_improvement(width: ArrayLike, batch_size: ArrayLike, data: ArrayLike,
                         accuracy: ArrayLike) -> dict[str, np.ndarray]:
    """RFI of each configuration of a (width, batch size, data) grid, in accuracy points.

    rfi_inc_temp = best accuracy at a smaller batch size (higher temperature) - accuracy,
    rfi_dec_temp = best at a larger batch size, rfi_width = best at a larger width, rfi_data =
    best with more data; the other two knobs held. ``accuracy`` is the seed-averaged test
    accuracy (100 - test error). A knob's sweep may be partial, but each configuration once.
    """
    w, b, d = (np.asarray(x, dtype=float) for x in (width, batch_size, data))
    acc = np.asarray(accuracy, dtype=float)
    knobs = np.column_stack([w, b, d])
    if len(np.unique(knobs, axis=0)) != len(knobs):
        raise ValueError("room_for_improvement: a (width, batch size, data) configuration "
                         "appears twice; average its seeds first")
    wd, bd, wb = knobs[:, [0, 2]], knobs[:, [1, 2]], knobs[:, [0, 1]]
    return {
        "rfi_inc_temp": _best_along(wd, b, acc, upwards=False) - acc,
        "rfi_dec_temp": _best_along(wd, b, acc, upwards=True) - acc,
        "rfi_width": _best_along(bd, w, acc, upwards=True) - acc,
        "rfi_data": _best_along(wb, d, acc, upwards=True) - acc,
    }


def _compare(a: np.ndarray, b: np.ndarray, above: str, below: str) -> np.ndarray:
    return np.where(a > b, above, np.where(a < b, below, OPTIMAL))


def failure_labels(rfi: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """The three diagnosis labels from the RFI columns; exact ties are 'optimal'.

    bs_failure: 'small' (temperature too small: a smaller batch helps more) if rfi_inc_temp >
    rfi_dec_temp, 'large' if lower. width_vs_batch / data_vs_batch: 'width' / 'data' if that
    RFI exceeds both temperature RFIs, 'batch' if below the larger one. Ties are 'optimal' in
    Q2 too, as in the released data (e.g. a best-of-grid model where all RFIs are 0).
    """
    inc, dec, width, data = (np.asarray(rfi[k], dtype=float) for k in
                             ("rfi_inc_temp", "rfi_dec_temp", "rfi_width", "rfi_data"))
    temperature = np.maximum(inc, dec)
    return {
        "bs_failure": _compare(inc, dec, "small", "large"),
        "width_vs_batch": _compare(width, temperature, "width", "batch"),
        "data_vs_batch": _compare(data, temperature, "data", "batch"),
    }


def label_grid(table: pa.Table, accuracy: str = "test_acc") -> pa.Table:
    """``table`` (columns width, bs, data and ``accuracy``) with its rfi_* and label columns
    computed, replacing any it had."""
    rfi = room_for_improvement(_column(table, "width"), _column(table, "bs"),
                               _column(table, "data"), _column(table, accuracy))
    for name, values in {**rfi, **failure_labels(rfi)}.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(values))
    return table


# --- the fixed-shape tree ----------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    label: str


@dataclass(frozen=True)
class Split:
    """``role <= thresholds[index]`` goes to ``le``, otherwise (NaN too) to ``gt``."""

    index: int
    role: str
    le: Leaf | Split
    gt: Leaf | Split


@dataclass(frozen=True)
class Shape:
    """A tree shape: its splits, and per threshold (in fitting order) a start and bounds."""

    question: str
    root: Leaf | Split
    initial: tuple[float, ...]
    bounds: tuple[tuple[float, float], ...]

    @property
    def threshold_roles(self) -> tuple[str, ...]:
        """The role each threshold is compared with, in threshold order."""
        found: dict[int, str] = {}
        stack: list[Leaf | Split] = [self.root]
        while stack:
            node = stack.pop()
            if isinstance(node, Split):
                found[node.index] = node.role
                stack += [node.gt, node.le]
        return tuple(found[i] for i in range(len(self.initial)))

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles the splits read, each once."""
        return tuple(dict.fromkeys(self.threshold_roles))


def _temperature_tree(third: str, below: str, above: str) -> Split:
    # A model that fits its training data is taken to be too cold; otherwise a poorly connected
    # landscape (low connectivity peak) is split by sharpness / similarity, and a well
    # connected one is too hot.
    return Split(0, "train_error", Leaf("small"),
                 Split(1, "connectivity", Split(2, third, Leaf(below), Leaf(above)),
                       Leaf("large")))


def _data_tree() -> Split:
    def sharp(index: int) -> Split:
        return Split(index, "sharpness", Leaf("data"), Leaf("batch"))

    return Split(0, "train_error",
                 Split(1, "connectivity", sharp(4), sharp(2)),
                 Split(3, "connectivity", Leaf("batch"), sharp(5)))


SHAPES: dict[str, Shape] = {
    "bs_failure": Shape("bs_failure", _temperature_tree("sharpness", "large", "small"),
                        (0.5, -10.0, 7.0), ((0, 1), (-30, 0), (4, 9))),
    "bs_failure_cka": Shape("bs_failure", _temperature_tree("similarity", "small", "large"),
                            (0.5, -10.0, 0.5), ((0, 1), (-30, 0), (0.2, 0.8))),
    "width_vs_batch": Shape(
        "width_vs_batch",
        Split(0, "train_error",
              Split(1, "connectivity", Leaf("width"), Leaf("batch")),
              Split(2, "connectivity", Leaf("width"), Leaf("batch"))),
        (0.5, -10.0, -10.0), ((0, 1), (-30, 0), (-30, 0))),
    "data_vs_batch": Shape("data_vs_batch", _data_tree(), (0.5, -10.0, 7.0, -10.0, 7.0, 7.0),
                           ((0, 1), (-30, 0), (4, 9), (-30, 0), (4, 9), (4, 9))),
}


@dataclass(frozen=True)
class Comparison:
    """One step of a decision path: ``column = value`` compared with ``threshold``."""

    column: str
    value: float
    threshold: float
    le: bool

    def __str__(self) -> str:
        return f"{self.column} = {self.value:.4g} {'<=' if self.le else '>'} {self.threshold:.4g}"


@dataclass(frozen=True)
class MDTree:
    """A fitted MD tree: a shape name, its thresholds, and the column of each role."""

    shape: str
    thresholds: tuple[float, ...]
    features: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_FEATURES))
    fitted_on: str = "zoo"  # "released": the released MD-tree data, whose features were
    # computed as ModelDiagnosis computed them (see steps.diagnose.features)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"MD tree: unknown shape {self.shape!r}; known: {sorted(SHAPES)}")
        spec = SHAPES[self.shape]
        if len(self.thresholds) != len(spec.initial):
            raise ValueError(f"MD tree {self.shape!r}: {len(spec.initial)} thresholds expected, "
                             f"got {len(self.thresholds)}")
        missing = [r for r in spec.roles if r not in self.features]
        if missing:
            raise ValueError(f"MD tree {self.shape!r}: no column given for roles {missing}")
        # Keep only the roles this shape reads, so the JSON says exactly what it needs.
        object.__setattr__(self, "features", {r: self.features[r] for r in spec.roles})
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))

    @property
    def question(self) -> str:
        return SHAPES[self.shape].question

    def predict(self, data: Columns) -> np.ndarray:
        """The label of every row of ``data`` (a table or a mapping of column arrays)."""
        values = {r: _column(data, c).astype(float) for r, c in self.features.items()}
        return _predict(SHAPES[self.shape].root, values, self.thresholds)

    def predict_path(self, row: Mapping[str, float]) -> tuple[str, list[Comparison]]:
        """The label of one model (column -> value) and the comparisons that led to it."""
        node, path = SHAPES[self.shape].root, []
        while isinstance(node, Split):
            column, threshold = self.features[node.role], self.thresholds[node.index]
            value = float(row[column])
            path.append(Comparison(column, value, threshold, bool(value <= threshold)))
            node = node.le if path[-1].le else node.gt
        return node.label, path

    def score(self, data: Columns, labels: ArrayLike) -> float:
        """Accuracy on ``data`` against ``labels``."""
        return float(np.mean(self.predict(data) == np.asarray(labels)))

    def to_json(self) -> str:
        return json.dumps({"method": "md_tree", "question": self.question, "shape": self.shape,
                           "features": dict(self.features), "thresholds": list(self.thresholds),
                           "fitted_on": self.fitted_on})

    @classmethod
    def from_json(cls, text: str) -> MDTree:
        spec = json.loads(text)
        if spec.get("method") != "md_tree":
            raise ValueError("MD tree JSON: 'method' is not 'md_tree'")
        tree = cls(spec["shape"], tuple(spec["thresholds"]), spec["features"],
                   str(spec.get("fitted_on", "zoo")))
        if spec.get("question") != tree.question:
            raise ValueError(f"MD tree JSON: question {spec.get('question')!r} does not match "
                             f"shape {tree.shape!r} ({tree.question!r})")
        return tree


def _predict(node: Leaf | Split, values: Mapping[str, np.ndarray],
             thresholds: Sequence[float]) -> np.ndarray:
    n = len(next(iter(values.values())))
    if isinstance(node, Leaf):
        return np.full(n, node.label, dtype=object)
    return np.where(values[node.role] <= thresholds[node.index],
                    _predict(node.le, values, thresholds), _predict(node.gt, values, thresholds))


def fit_mdtree(data: Columns, labels: ArrayLike, shape: str = "bs_failure",
               features: Mapping[str, str] | None = None,
               bounds: Literal["reference", "data"] = "reference") -> MDTree:
    """Fit the thresholds of ``shape`` to maximise training accuracy on ``data``.

    From the shape's initial thresholds, each threshold in turn (the others held) is set by a
    bounded scalar search (scipy's bounded Brent) within its bounds, as the reference does.
    Accuracy is a step function of a threshold, so the search settles on some plateau, not
    always the best one: fitted thresholds vary a lot with the training sample.
    ``features`` overrides the column of some roles (role -> column, see DEFAULT_FEATURES).
    ``bounds``: "reference", the ranges fitted on ResNet-18 / CIFAR-10 (as the reference
    code); "data", each threshold searched over its feature's range in ``data``, started at
    its median (for other model families, whose train errors and traces lie elsewhere).
    """
    tree = MDTree(shape, SHAPES[shape].initial, {**DEFAULT_FEATURES, **(features or {})})
    values = {r: _column(data, c).astype(float) for r, c in tree.features.items()}
    y = np.asarray(labels)
    thresholds = list(tree.thresholds)
    ranges = SHAPES[shape].bounds
    if bounds == "data":
        thresholds, ranges = _data_ranges(values, SHAPES[shape].threshold_roles)
    for i, bounds in enumerate(ranges):
        def loss(t: float, i: int = i) -> float:
            trial = thresholds[:i] + [t] + thresholds[i + 1:]
            return -float(np.mean(_predict(SHAPES[shape].root, values, trial) == y))

        thresholds[i] = float(minimize_scalar(loss, bounds=bounds, method="bounded").x)
    return MDTree(shape, tuple(thresholds), tree.features, _fitted_on(data))


def _data_ranges(values: Mapping[str, np.ndarray], roles: Sequence[str]
                 ) -> tuple[list[float], list[tuple[float, float]]]:
    """Per threshold: its feature's median (the start) and (min, max) over the data."""
    starts, ranges = [], []
    for role in roles:
        column = values[role][np.isfinite(values[role])]
        if column.size == 0:
            raise ValueError(f"MD tree: no finite values of the {role} feature to fit on")
        starts.append(float(np.median(column)))
        ranges.append((float(column.min()), float(column.max())))
    return starts, ranges


# --- baselines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineTree:
    """A free-shape sklearn decision tree on named columns."""

    features: tuple[str, ...]
    classifier: DecisionTreeClassifier

    def predict(self, data: Columns) -> np.ndarray:
        return self.classifier.predict(_matrix(data, self.features))

    def score(self, data: Columns, labels: ArrayLike) -> float:
        return float(np.mean(self.predict(data) == np.asarray(labels)))


def fit_baseline_tree(data: Columns, labels: ArrayLike, features: Sequence[str], seed: int,
                      depth: int = 4) -> BaselineTree:
    """A gini decision tree of ``depth`` on ``features``; ``seed`` breaks ties between splits."""
    classifier = DecisionTreeClassifier(criterion="gini", max_depth=depth, random_state=seed)
    classifier.fit(_matrix(data, features), np.asarray(labels))
    return BaselineTree(tuple(features), classifier)


# --- evaluation protocols ----------------------------------------------------------------------

Sampling = Literal["cells", "data", "width", "data_limit"]


@dataclass(frozen=True)
class Case:
    """A transfer experiment: fit on a sample of one collection, test on all of another.

    ``sampling``: 'cells' = ``size`` random (data, width) cells, each with its whole batch-size
    sweep; 'data' / 'width' = ``size`` random data fractions / widths; 'data_limit' = every
    configuration with data fraction <= ``size`` (tenths of CIFAR-10). The reference tests
    every case on the whole other collection (all scales), and so do we.
    """

    name: str
    shape: str
    sampling: Sampling
    size: int
    hyperparameters: tuple[str, ...] = HYPERPARAMETER_FEATURES
    min_width: int = 0  # Q2b studies only models wide enough for data to be the bottleneck

    @property
    def question(self) -> str:
        return SHAPES[self.shape].question


CASES: dict[str, Case] = {case.name: case for case in (
    # 8 cells x 12 labelled batch sizes = 96 training models (the paper's headline).
    Case("dataset_transfer", "bs_failure", "cells", 8),
    Case("dataset_transfer_cka", "bs_failure_cka", "cells", 8),
    Case("scale_transfer", "bs_failure", "data_limit", 1),  # data <= 5K
    Case("q2a_dataset_transfer", "width_vs_batch", "data", 1, ("log_data_amount",)),
    Case("q2b_dataset_transfer", "data_vs_batch", "width", 1, ("log_para_amount",),
         min_width=32),
)}


def _rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    return table.filter(pa.array(mask))


def labelled_rows(table: pa.Table, case: Case) -> pa.Table:
    """The rows a case uses: labelled (not 'optimal') for its question, wide enough."""
    keep = (_column(table, case.question) != OPTIMAL) & (_column(table, "width") >= case.min_width)
    return _rows(table, keep)


def sample_training_set(table: pa.Table, case: Case, seed: int) -> pa.Table:
    """The training sample of ``case`` from labelled rows, drawn as the reference does."""
    data, width = _column(table, "data"), _column(table, "width")
    if case.sampling == "data_limit":
        return _rows(table, data <= case.size)
    # The legacy RandomState stream, so the draws are the reference's np.random.seed ones.
    rng = np.random.RandomState(seed)
    data_values, width_values = np.unique(data), np.unique(width)
    if case.sampling == "cells":
        cells = [(d, w) for d in data_values for w in width_values]
        chosen = {cells[i] for i in rng.choice(len(cells), size=case.size, replace=False)}
        return _rows(table, np.array([(d, w) in chosen for d, w in zip(data, width, strict=True)]))
    if case.sampling == "data":
        return _rows(table, np.isin(data, rng.choice(data_values, size=case.size, replace=False)))
    if case.sampling == "width":
        return _rows(table, np.isin(width, rng.choice(width_values, size=case.size,
                                                      replace=False)))
    raise ValueError(f"unknown sampling {case.sampling!r}")


METHODS = ("md_tree", "validation_tree", "hyperparameter_tree", "majority")


@dataclass(frozen=True)
class CaseResult:
    """Per-seed test accuracies (fractions) of every method, and the MD-tree thresholds.

    'majority' is the share of the test set's most frequent label (the same for every seed).
    """

    case: Case
    seeds: tuple[int, ...]
    train_sizes: tuple[int, ...]
    test_size: int
    accuracy: dict[str, np.ndarray]  # method -> (seeds,)
    thresholds: np.ndarray  # (seeds, thresholds)
    trees: tuple[MDTree, ...]


def evaluate_case(case: Case, train: pa.Table, test: pa.Table, seeds: Sequence[int] = SEEDS,
                  tree_seed: int | None = None) -> CaseResult:
    """Fit every method on each seed's sample of ``train``; score them on all of ``test``.

    The baseline trees use ``tree_seed``, or the seed of their sample when None. (The
    reference code, by a slip, keeps the first seed, 42, for every sample: pass 42 to match
    its hyperparameter-tree figure.)
    """
    train, test = labelled_rows(train, case), labelled_rows(test, case)
    y_test = _column(test, case.question)
    # The paper's reference line: always answering the test set's most frequent label.
    majority = float(np.max(np.unique(y_test, return_counts=True)[1]) / len(y_test))
    accuracy: dict[str, list[float]] = {m: [] for m in METHODS}
    sizes, trees = [], []
    for seed in seeds:
        sample = sample_training_set(train, case, seed)
        y = _column(sample, case.question)
        tree = fit_mdtree(sample, y, case.shape)
        split_seed = seed if tree_seed is None else tree_seed
        accuracy["md_tree"].append(tree.score(test, y_test))
        for method, features in (("validation_tree", VALIDATION_FEATURES),
                                 ("hyperparameter_tree", case.hyperparameters)):
            baseline = fit_baseline_tree(sample, y, features, split_seed)
            accuracy[method].append(baseline.score(test, y_test))
        accuracy["majority"].append(majority)
        sizes.append(sample.num_rows)
        trees.append(tree)
    return CaseResult(case, tuple(seeds), tuple(sizes), test.num_rows,
                      {m: np.array(a) for m, a in accuracy.items()},
                      np.array([t.thresholds for t in trees]), tuple(trees))
