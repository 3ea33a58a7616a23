"""Loss-landscape features of a trained plain classifier, as the MD-tree paper measures them.

    data = plain_data("digits", model)
    train = training_subset(data, fraction=0.5, seed=0)      # what the model was trained on
    row = landscape_features(model, data, train, model_b=other_seed, options=FeatureOptions())

Columns (METHODS.md section 4; names as in the released MD-tree data where it has them):

- ``train_error`` / ``train_loss`` on the model's training subset, ``test_error`` /
  ``test_loss`` on the test split (errors in %);
- ``hessian_t``: log of the Hutchinson Hessian trace (Rademacher probes) on a fixed, seeded
  subset of the training data (``hessian_samples``, PyHessian's one batch of 200), eval mode;
  ``hessian_t_stderr`` its standard error (delta method: stderr(trace) / trace),
  ``hessian_trace`` and ``hessian_trace_stderr`` unlogged; ``hessian_top``: the top
  eigenvalue by power iteration. The log is NaN when the estimated trace is not positive.

With a second model (another seed of the same configuration):

- ``mode_connectivity_peak``: minus the highest train error (%) at the interior points of a
  quadratic Bezier curve between the two whose bend is trained briefly (SGD, t ~ U(0, 1) per
  batch), BatchNorm statistics re-estimated at every t. This is the released data's column
  and the one the MD tree's thresholds (bounds [-30, 0]) are fitted on;
  ``mode_connectivity``: the mc formula on the same curve's errors (< 0: a barrier);
  ``curve_barrier``: the peak interior train error minus the mean of the endpoints' (> 0: a
  barrier; ~ -mode_connectivity_peak when the endpoints fit their data);
- ``lmc``: mc on the straight line (``line_points`` points); ``lmc_barrier`` = -lmc, the
  barrier height on the line (> 0: a barrier);
- ``CKA``: linear CKA of the two models' softmax outputs on the test split.

Everything is seeded by ``FeatureOptions.seed``: the same models and options give the same
numbers. Cost is bounded by the probe count, iterations, curve epochs and points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steps.core.errors import ParamsError
from steps.core.training import PlainData, evaluate, plain_kind
from steps.diagnose.cka import output_cka
from steps.diagnose.connectivity import BezierCurve, evaluate_curve, linear_path, train_bezier
from steps.diagnose.hessian import hessian_operator, hutchinson_trace, top_eigenvalue

__all__ = ["PAIR_COLUMNS", "SINGLE_COLUMNS", "FeatureError", "FeatureOptions",
           "check_same_architecture", "curve_ts", "landscape_features", "model_description"]

Batch = tuple[torch.Tensor, torch.Tensor]
# The columns one model gives, and those a second seed adds.
SINGLE_COLUMNS = ("train_error", "train_loss", "test_error", "test_loss", "train_examples",
                  "hessian_t", "hessian_t_stderr", "hessian_trace", "hessian_trace_stderr",
                  "hessian_top")
PAIR_COLUMNS = ("mode_connectivity_peak", "mode_connectivity", "curve_barrier", "lmc",
                "lmc_barrier", "CKA")


class FeatureError(ParamsError):
    """Inputs the landscape features cannot be measured on."""


@dataclass(frozen=True)
class FeatureOptions:
    """What the features cost: probes, iterations, curve training and points; the seed."""

    hessian_samples: int = 200
    trace_probes: int = 32
    eigen_iterations: int = 30
    eigen_tol: float = 1e-3
    curve_epochs: int = 10
    curve_lr: float = 0.05
    curve_batch_size: int = 64
    curve_points: int = 5  # 0, .25, .5, .75, 1 as in the reference
    line_points: int = 11
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hessian_samples", "trace_probes", "eigen_iterations", "curve_epochs",
                     "curve_batch_size"):
            if getattr(self, name) < 1:
                raise FeatureError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.curve_points < 3 or self.line_points < 3:
            raise FeatureError(f"curve_points and line_points must be >= 3 (an interior "
                               f"point), got {self.curve_points} and {self.line_points}")


def curve_ts(points: int) -> tuple[float, ...]:
    """``points`` evenly spaced t from 0 to 1."""
    return tuple(float(t) for t in np.linspace(0.0, 1.0, points))


def model_description(model: nn.Module) -> dict[str, int | str]:
    """Kind, width (the zoo knob: MLP hidden width, CNN first channel count) and size."""
    kind = plain_kind(model)
    width = model.config.hidden[0] if kind == "mlp" else model.config.channels[0]
    return {"model_kind": kind, "width": int(width),
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def check_same_architecture(model: nn.Module, model_b: nn.Module) -> None:
    """A FeatureError unless both are the same kind of plain model with the same config."""
    kind, kind_b = plain_kind(model), plain_kind(model_b, "model_b")
    if kind != kind_b or model.config != model_b.config:
        raise FeatureError(f"model_b: a {kind_b} {model_b.config} differs from the model, a "
                           f"{kind} {model.config}; connectivity and CKA need two seeds of "
                           f"one architecture")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _errors(model: nn.Module, data: Batch) -> tuple[float, float]:
    """(mean cross-entropy, error %) on data."""
    loss, accuracy = evaluate(model, data, "classification", F.cross_entropy)
    return loss, 100.0 * (1.0 - accuracy)


def hessian_subset(train: Batch, samples: int, seed: int) -> Batch:
    """A fixed, seeded subset of the training data for the Hessian estimates."""
    x, y = train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    keep = order[: min(samples, len(x))].sort().values
    return x[keep], y[keep]


def hessian_features(model: nn.Module, train: Batch, options: FeatureOptions) -> dict[str, float]:
    """Log Hutchinson trace (with standard errors) and top eigenvalue, eval mode."""
    op = hessian_operator(model, hessian_subset(train, options.hessian_samples, options.seed))
    trace = hutchinson_trace(op, probes=options.trace_probes, seed=options.seed)
    top = top_eigenvalue(op, max_iter=options.eigen_iterations, tol=options.eigen_tol,
                         seed=options.seed)
    op.release()
    positive = trace.mean > 0
    return {"hessian_t": math.log(trace.mean) if positive else float("nan"),
            "hessian_t_stderr": trace.stderr / trace.mean if positive else float("nan"),
            "hessian_trace": trace.mean, "hessian_trace_stderr": trace.stderr,
            "hessian_top": top.value}


def pair_features(model: nn.Module, model_b: nn.Module, train: Batch, test: Batch,
                  options: FeatureOptions) -> dict[str, float]:
    """Curve and line connectivity on the training data, and output CKA on the test data."""
    check_same_architecture(model, model_b)
    bn_data = train if _has_batchnorm(model) else None
    curve = BezierCurve(model, model_b, seed=options.seed)
    train_bezier(curve, train, epochs=options.curve_epochs, lr=options.curve_lr,
                 batch_size=options.curve_batch_size, seed=options.seed)
    on_curve = evaluate_curve(curve, train, ts=curve_ts(options.curve_points), bn_data=bn_data)
    line = linear_path(model, model_b, train, points=options.line_points, bn_data=bn_data)
    ends = (on_curve.errors[0] + on_curve.errors[-1]) / 2
    return {"mode_connectivity_peak": on_curve.peak, "mode_connectivity": on_curve.mc,
            "curve_barrier": -on_curve.peak - ends, "lmc": line.mc, "lmc_barrier": -line.mc,
            "CKA": output_cka(model, model_b, test[0])}


def landscape_features(model: nn.Module, data: PlainData, train: Batch, *,
                       model_b: nn.Module | None = None,
                       options: FeatureOptions | None = None) -> dict[str, float]:
    """The feature row of ``model`` (trained on ``train``, a subset of data's train split).

    Without ``model_b`` the pair columns are absent. The models are not changed (the curve
    works on copies; modes are restored).
    """
    options = options or FeatureOptions()
    if model_b is not None:
        check_same_architecture(model, model_b)
    model.eval()
    train_loss, train_error = _errors(model, train)
    test_loss, test_error = _errors(model, data.test)
    row = {"train_error": train_error, "train_loss": train_loss, "test_error": test_error,
           "test_loss": test_loss, "train_examples": len(train[1])}
    row |= hessian_features(model, train, options)
    if model_b is not None:
        model_b.eval()
        row |= pair_features(model, model_b, train, data.test, options)
    return row

