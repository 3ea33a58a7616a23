"""Calibration sequences: N windows of L tokens sampled (with a seed) from a text file."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from steps.core.errors import TailwiseError

DEFAULT_NSAMPLES = 128  # the papers' 128 x 2048 tokens (C4 there, any text here)
DEFAULT_SEQLEN = 2048


class CalibrationError(TailwiseError):
    """The calibration text cannot give the requested sequences."""


def tokenize_text(tokenizer, path: Path) -> torch.Tensor:
    """All of a text file's token ids, as one 1-D tensor."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    # verbose=False: the whole file is longer than the model's context, which is expected here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random starts (overlaps allowed, as the papers'
    samplers): shape (nsamples, seqlen)."""
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 1, got {nsamples} x {seqlen}")
    total = token_ids.numel()
    if total < seqlen:
        raise CalibrationError(
            f"calibration text has {total} tokens, fewer than one sequence of {seqlen}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen) for _ in range(nsamples)]
    return torch.stack([token_ids[s : s + seqlen] for s in starts])


def calibration_input_ids(
    tokenizer, path: Path, *, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """(nsamples, seqlen) token ids from the text file at path."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration text {path} does not exist")
    try:
        return sample_windows(tokenize_text(tokenizer, path), nsamples, seqlen, seed)
    except CalibrationError as exc:
        raise CalibrationError(f"calibration text {path}: {exc}") from None
