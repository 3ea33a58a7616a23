"""Loss-landscape features of a trained plain classifier, as the MD-tree paper measures them.

    data = plain_data("digits", model)
    train = training_subset(data, fraction=0.5, seed=0)      # what the model was trained on
    row = landscape_features(model, data, train, model_b=other_seed, options=FeatureOptions())

Columns (METHODS.md section 4; names as in the released MD-tree data where it has them):

- ``train_error`` / ``train_loss`` on the model's training subset, ``test_error`` /
  ``test_loss`` on the test split (errors in %);
- ``hessian_t``: log of the mean over the seeds given (the model, and model_b when given) of
  the Hutchinson Hessian trace (Rademacher probes) on a fixed, seeded subset of the training
  data (``hessian_samples``, PyHessian's one batch of 200), eval mode: the released data's
  ``log(mean(trace over its 5 seeds))``; ``hessian_t_stderr`` its standard error (delta
  method), ``hessian_trace`` and ``hessian_trace_stderr`` unlogged, ``hessian_seeds`` how
  many seeds; ``hessian_top``: the model's top eigenvalue by power iteration. The log is NaN
  when the estimated trace is not positive.

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
- ``CKA``: linear CKA of the two models' softmax outputs on mixup training inputs, averaged
  over the ordered pairs (a, b) and (b, a), each with its own draw, as the released data's
  ``CKA_mixup_alpha_16.0`` (loss_landscape_taxonomy ``CKA_utils.all_latent``: 6 shuffled
  training batches of 128, each mixed with a permutation of itself by lam ~ Beta(16, 16);
  ModelDiagnosis averages ``representation_similarity[i][j]`` over i != j).

How the released data computed its features differs from what a run here can do (5 seeds,
ResNet-18 on CIFAR-10, curves trained 50 / fraction epochs with a step-down lr schedule and
l2 5e-4): ``protocol_differences`` names every difference of a feature row, and the
diagnose step says so when it applies a tree fitted on the released data to such a row.

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
from steps.diagnose.connectivity import (
    BezierCurve,
    evaluate_curve,
    linear_path,
    train_bezier,
    train_bezier_reference,
)
from steps.diagnose.hessian import hessian_operator, hutchinson_trace, top_eigenvalue

__all__ = ["PAIR_COLUMNS", "SINGLE_COLUMNS", "FeatureError", "FeatureOptions",
           "check_same_architecture", "curve_ts", "landscape_features", "mixup_cka_inputs",
           "model_description", "ordered_pair_cka", "protocol_differences",
           "reference_curve_epochs"]

Batch = tuple[torch.Tensor, torch.Tensor]
# The columns one model gives, and those a second seed adds.
SINGLE_COLUMNS = ("train_error", "train_loss", "test_error", "test_loss", "train_examples",
                  "hessian_t", "hessian_t_stderr", "hessian_trace", "hessian_trace_stderr",
                  "hessian_seeds", "hessian_top")
# The released MD-tree data (ModelDiagnosis, via loss_landscape_taxonomy).
REFERENCE_SEEDS = 5
CKA_MIXUP_ALPHA = 16.0
CKA_BATCHES = 6  # --CKA-batches 5 with its "batch_idx > num_batches" stop
CKA_BATCH_SIZE = 128
REFERENCE_CURVE_EPOCHS = 50  # at training fraction 1; the reference trains 50 / fraction
PAIR_COLUMNS = ("mode_connectivity_peak", "mode_connectivity", "curve_barrier", "lmc",
                "lmc_barrier", "CKA", "curve_schedule", "curve_epochs")


class FeatureError(ParamsError):
    """Inputs the landscape features cannot be measured on."""


@dataclass(frozen=True)
class FeatureOptions:
    """What the features cost: probes, iterations, curve training and points; the seed."""

    hessian_samples: int = 200
    trace_probes: int = 32
    eigen_iterations: int = 30
    eigen_tol: float = 1e-3
    curve_epochs: int = REFERENCE_CURVE_EPOCHS  # the reference: 50 / training fraction
    curve_lr: float = 0.01
    curve_batch_size: int = 128
    curve_weight_decay: float = 5e-4
    curve_schedule: str = "reference"  # or "cosine": the shared trainer's cosine lr
    curve_points: int = 5  # 0, .25, .5, .75, 1 as in the reference
    line_points: int = 11
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hessian_samples", "trace_probes", "eigen_iterations", "curve_epochs",
                     "curve_batch_size"):
            if getattr(self, name) < 1:
                raise FeatureError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.curve_schedule not in ("reference", "cosine"):
            raise FeatureError(f"curve_schedule must be 'reference' or 'cosine', got "
                               f"{self.curve_schedule!r}")
        if self.curve_points < 3 or self.line_points < 3:
            raise FeatureError(f"curve_points and line_points must be >= 3 (an interior "
                               f"point), got {self.curve_points} and {self.line_points}")


def reference_curve_epochs(fraction: float) -> int:
    """Epochs the released data trained a Bezier bend for, on a ``fraction`` of the data."""
    return round(REFERENCE_CURVE_EPOCHS / fraction)


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


def hessian_features(models: list[nn.Module], train: Batch,
                     options: FeatureOptions) -> dict[str, float]:
    """Log of the mean Hutchinson trace over the seeds ``models`` (with standard errors) and
    the first model's top eigenvalue, eval mode."""
    subset = hessian_subset(train, options.hessian_samples, options.seed)
    traces, stderrs = [], []
    for i, model in enumerate(models):
        op = hessian_operator(model, subset)
        trace = hutchinson_trace(op, probes=options.trace_probes, seed=options.seed)
        if i == 0:
            top = top_eigenvalue(op, max_iter=options.eigen_iterations, tol=options.eigen_tol,
                                 seed=options.seed)
        op.release()
        traces.append(trace.mean)
        stderrs.append(trace.stderr)
    mean = float(np.mean(traces))
    stderr = math.sqrt(sum(e * e for e in stderrs)) / len(stderrs)
    positive = mean > 0
    return {"hessian_t": math.log(mean) if positive else float("nan"),
            "hessian_t_stderr": stderr / mean if positive else float("nan"),
            "hessian_trace": mean, "hessian_trace_stderr": stderr,
            "hessian_seeds": len(models), "hessian_top": top.value}


def mixup_cka_inputs(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference's CKA inputs: ``CKA_BATCHES`` shuffled training batches of
    ``CKA_BATCH_SIZE``, each mixed with a permutation of itself by lam ~ Beta(16, 16)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = torch.randperm(len(x), generator=gen)[: CKA_BATCHES * CKA_BATCH_SIZE]
    mixed = []
    for idx in order.split(CKA_BATCH_SIZE):
        batch = x[idx]
        lam = float(rng.beta(CKA_MIXUP_ALPHA, CKA_MIXUP_ALPHA))
        mixed.append(lam * batch + (1.0 - lam) * batch[torch.randperm(len(idx), generator=gen)])
    return torch.cat(mixed)


def ordered_pair_cka(model: nn.Module, model_b: nn.Module, x: torch.Tensor, seed: int) -> float:
    """Output CKA averaged over the ordered pairs (a, b) and (b, a), each on its own mixup
    draw of the training inputs ``x``."""
    return float(np.mean([output_cka(model, model_b, mixup_cka_inputs(x, seed)),
                          output_cka(model_b, model, mixup_cka_inputs(x, seed + 1))]))


def protocol_differences(row: dict) -> list[str]:
    """How a feature row was computed differently from the released MD-tree data (empty when
    it was computed the same way)."""
    seeds = int(row.get("hessian_seeds", 1))
    out = []
    if seeds != REFERENCE_SEEDS:
        out.append(f"hessian_t and CKA average over {seeds} seed(s); the released data over "
                   f"{REFERENCE_SEEDS}")
    if "mode_connectivity_peak" in row:
        schedule, epochs = row.get("curve_schedule"), row.get("curve_epochs")
        fraction = float(row.get("fraction", 1.0))
        if schedule != "reference":
            out.append(f"the Bezier bend trained with a {schedule} lr; the released data's "
                       "with the step-down schedule, batch 128, l2 5e-4")
        if epochs != reference_curve_epochs(fraction):
            out.append(f"the Bezier bend trained {epochs} epochs; the released data's "
                       f"50 / fraction = {reference_curve_epochs(fraction)}")
    out.append(f"a {row.get('model_kind', 'plain')} model on {row.get('dataset', 'its data')}; "
               "the released data: ResNet-18 on CIFAR-10")
    return out


def pair_features(model: nn.Module, model_b: nn.Module, train: Batch,
                  options: FeatureOptions) -> dict[str, float]:
    """Curve and line connectivity, and output CKA on mixup inputs, from the training data."""
    check_same_architecture(model, model_b)
    bn_data = train if _has_batchnorm(model) else None
    curve = BezierCurve(model, model_b, seed=options.seed)
    fit = train_bezier_reference if options.curve_schedule == "reference" else train_bezier
    fit(curve, train, epochs=options.curve_epochs, lr=options.curve_lr,
        weight_decay=options.curve_weight_decay, batch_size=options.curve_batch_size,
        seed=options.seed)
    on_curve = evaluate_curve(curve, train, ts=curve_ts(options.curve_points), bn_data=bn_data)
    line = linear_path(model, model_b, train, points=options.line_points, bn_data=bn_data)
    ends = (on_curve.errors[0] + on_curve.errors[-1]) / 2
    return {"mode_connectivity_peak": on_curve.peak, "mode_connectivity": on_curve.mc,
            "curve_barrier": -on_curve.peak - ends, "lmc": line.mc, "lmc_barrier": -line.mc,
            "CKA": ordered_pair_cka(model, model_b, train[0], options.seed),
            "curve_schedule": options.curve_schedule, "curve_epochs": options.curve_epochs}


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
    if model_b is not None:
        model_b.eval()
    row |= hessian_features([m for m in (model, model_b) if m is not None], train, options)
    if model_b is not None:
        row |= pair_features(model, model_b, train, options)
    return row

