"""Linear centred kernel alignment (CKA) between two sets of representations of N samples.

    cka = linear_cka(x, y)                     # x (N, p), y (N, q); any trailing shape is flattened
    reps = collect_representations(model, inputs, ["layers.1", "layers.3"])
    output_cka(model_a, model_b, inputs)       # between two models' softmax outputs

Linear CKA with the biased HSIC estimator on the full batch (Kornblith et al. 2019):
CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) for column-centred X, Y, equal to
<HKH, HLH> / (||HKH|| ||HLH||) for the Gram matrices K = X X^T, L = Y Y^T. It is 1 for
X = Y, and invariant to orthogonal transforms and isotropic scaling of either side. The pip
CKA packages compute a minibatch estimator instead; this is the full-batch one METHODS.md
asks for. Computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from steps.core.errors import ParamsError
from steps.diagnose.hessian import eval_mode

__all__ = ["collect_representations", "linear_cka", "output_cka"]


class CKAError(ParamsError):
    """Bad input to CKA (mismatched sample counts, constant representations, unknown module)."""


def _centred(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2:
        raise CKAError(f"{name}: expected (samples, features...), got shape {tuple(x.shape)}")
    x = x.detach().reshape(len(x), -1).to(torch.float64)
    return x - x.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor, form: str = "auto") -> float:
    """Linear CKA of representations x (N, ...) and y (N, ...) of the same N samples.

    form: "feature" (cost N p q), "gram" (centred Gram matrices, cost N^2 (p + q)) or
    "auto", the cheaper of the two; they give the same number.
    """
    if len(x) != len(y):
        raise CKAError(f"representations: {len(x)} vs {len(y)} samples")
    if len(x) < 2:
        raise CKAError(f"representations: need >= 2 samples, got {len(x)}")
    if form not in ("auto", "feature", "gram"):
        raise CKAError(f"form must be 'auto', 'feature' or 'gram', got {form!r}")
    xc, yc = _centred(x, "x"), _centred(y, "y")
    n, p, q = len(xc), xc.shape[1], yc.shape[1]
    if form == "feature" or (form == "auto" and p * q <= n * (p + q)):
        cross = (yc.T @ xc).square().sum()
        norm_x, norm_y = torch.linalg.norm(xc.T @ xc), torch.linalg.norm(yc.T @ yc)
    else:
        gram_x, gram_y = xc @ xc.T, yc @ yc.T  # centred columns give centred Gram matrices
        cross = (gram_x * gram_y).sum()  # tr(K H L H) with H the centring matrix
        norm_x, norm_y = torch.linalg.norm(gram_x), torch.linalg.norm(gram_y)
    if norm_x == 0 or norm_y == 0:
        raise CKAError("representations: one side is constant over the samples; CKA is "
                       "undefined")
    return float(cross / (norm_x * norm_y))


@torch.no_grad()
def collect_representations(model: nn.Module, inputs: torch.Tensor, names: Sequence[str], *,
                            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Outputs of the named modules (as in ``model.named_modules()``) for every input.

    Forward hooks record each module's output (the first element of a tuple output) batch by
    batch, in eval mode (restored afterwards); returns name -> (N, ...) tensor.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise CKAError(f"modules {unknown} not in the model; known: {sorted(modules)[:20]}")
    if batch_size < 1:
        raise CKAError(f"batch_size must be >= 1, got {batch_size}")
    records: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name: str):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            out = output[0] if isinstance(output, tuple | list) else output
            records[name].append(out.detach())
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        with eval_mode(model):
            for batch in inputs.split(batch_size):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in records.items()}


@torch.no_grad()
def output_cka(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor) -> float:
    """Linear CKA between two models' softmax outputs on ``inputs`` (eval mode)."""
    probs = []
    for model in (model_a, model_b):
        with eval_mode(model):
            probs.append(torch.softmax(model(inputs), dim=-1))
    return linear_cka(probs[0], probs[1])
