"""Evaluation metrics: perplexity as the pruning papers measure it, accuracy, sparsity, size.

Perplexity (Wanda/SparseGPT `eval_ppl`): tokenize the whole evaluation text once, cut it into
non-overlapping windows of seqlen tokens (the remainder is dropped), and take exp of the mean
next-token negative log-likelihood over every predicted token of every window.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steps.core.blocks import (
    BlocksNotFoundError,
    find_blocks,
    model_context_length,
    prunable_layers,
    weight_matrix,
)
from steps.core.devices import resolve_device
from steps.core.errors import TailwiseError
from steps.core.progress import progress_bar

DEFAULT_MAX_SEQLEN = 2048  # the papers' evaluation length; longer contexts are capped to it


class EvaluationError(TailwiseError, ValueError):
    """An evaluation input that cannot be used (too short a text, mismatched labels, ...)."""


def default_seqlen(model: nn.Module) -> int:
    """The model's context, capped at 2048 (the papers' setting)."""
    return min(model_context_length(model) or DEFAULT_MAX_SEQLEN, DEFAULT_MAX_SEQLEN)


def tokenize_file(tokenizer, path: str | os.PathLike[str]) -> torch.Tensor:
    """The token ids of a whole text file, as the papers do: one string, default special tokens."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"evaluation text {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    # verbose=False: the text is longer than the model's context on purpose (it is windowed).
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity_of_ids(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seqlen: int | None = None,
    max_windows: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over non-overlapping seqlen windows of a 1-D id tensor.

    max_windows limits the evaluation to the first windows (for quick runs); `progress`: a
    bar of the windows done on stderr, with the time left.
    """
    seqlen = seqlen or default_seqlen(model)
    windows = token_ids.numel() // seqlen
    if windows == 0:
        raise EvaluationError(
            f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}"
        )
    if max_windows is not None:
        windows = min(windows, max_windows)
    device = resolve_device(device)
    home = next(model.parameters()).device
    model.to(device)
    try:
        total_nll = 0.0
        with progress_bar(windows, f"perplexity: {windows} windows of {seqlen}",
                          progress) as advance:
            for i in range(windows):
                window = token_ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
                logits = model(input_ids=window, use_cache=False).logits
                total_nll += F.cross_entropy(
                    logits[0, :-1].float(), window[0, 1:], reduction="sum"
                ).item()
                advance()
    finally:
        model.to(home)
    return math.exp(total_nll / (windows * (seqlen - 1)))


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | os.PathLike[str],
    *,
    seqlen: int | None = None,
    max_windows: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> float:
    """Perplexity of the model on a text file (see perplexity_of_ids)."""
    ids = tokenize_file(tokenizer, text)
    return perplexity_of_ids(model, ids, seqlen=seqlen, max_windows=max_windows, device=device,
                             progress=progress)


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of rows whose arg-max logit is the label. logits (n, classes), labels (n,)."""
    predicted = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(labels)
    if predicted.shape != labels.shape or labels.size == 0:
        raise EvaluationError(
            f"logits {tuple(np.shape(logits))} and labels {labels.shape} do not match"
        )
    return float((predicted == labels).mean())


def _prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks' layers when the model has blocks, else every Linear/Conv1D."""
    try:
        return find_blocks(model).all_layers()
    except BlocksNotFoundError:
        return prunable_layers(model)


def achieved_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the prunable layers' weights (what pruning targets)."""
    layers = _prunable_layers(model).values()
    zeros = sum(int((weight_matrix(layer) == 0).sum()) for layer in layers)
    total = sum(weight_matrix(layer).numel() for layer in layers)
    return zeros / total if total else 0.0


def parameter_count(model: nn.Module) -> int:
    """Number of parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


def size_on_disk(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
