"""One row of metrics per model, and a Parquet table of rows so runs can be compared."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from steps.core.factory import load_model
from steps.evaluate.metrics import (
    EvaluationError,
    achieved_sparsity,
    default_seqlen,
    parameter_count,
    perplexity,
    size_on_disk,
)


def evaluate_model(
    model: nn.Module,
    tokenizer=None,
    *,
    name: str,
    perplexity_text: str | os.PathLike[str] | None = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of an in-memory model: name, params, sparsity, and perplexity on a text file
    when one is given (None otherwise); `progress`: a bar of the windows on stderr."""
    row: dict[str, Any] = {
        "model": name,
        "params": parameter_count(model),
        "sparsity": achieved_sparsity(model),
        "perplexity": None,
        "perplexity_text": None,
        "seqlen": None,
    }
    if perplexity_text is not None:
        seqlen = seqlen or default_seqlen(model)
        row["perplexity"] = perplexity(
            model,
            tokenizer,
            perplexity_text,
            seqlen=seqlen,
            max_windows=max_windows,
            device=device,
            progress=progress,
        )
        row["perplexity_text"] = str(perplexity_text)
        row["seqlen"] = seqlen
    return row


def evaluate_model_dir(
    model_dir: str | os.PathLike[str],
    *,
    perplexity_text: str | os.PathLike[str] | None = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of a saved model directory (its tokenizer is read from the same directory),
    including its size on disk."""
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    tokenizer = model_tokenizer(model_dir) if perplexity_text is not None else None
    row = evaluate_model(
        model,
        tokenizer,
        name=str(model_dir),
        perplexity_text=perplexity_text,
        seqlen=seqlen,
        max_windows=max_windows,
        device=device,
        progress=progress,
    )
    row["size_bytes"] = size_on_disk(model_dir)
    return row


def model_tokenizer(model_dir: Path):
    """The tokenizer saved beside the model; a one-line error when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise EvaluationError(f"model {model_dir}: no usable tokenizer files (perplexity needs "
                              f"the model's tokenizer: save it beside the weights, e.g. "
                              f"tokenizer.save_pretrained(dir)); {type(exc).__name__}") from exc


ROW_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("params", pa.int64()),
        ("sparsity", pa.float64()),
        ("perplexity", pa.float64()),
        ("perplexity_text", pa.string()),
        ("seqlen", pa.int64()),
        ("size_bytes", pa.int64()),
    ]
)


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table with a fixed schema (missing metrics are null)."""
    return pa.Table.from_pylist(
        [{field: row.get(field) for field in ROW_SCHEMA.names} for row in rows], schema=ROW_SCHEMA
    )


def write_rows(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows to a Parquet file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_table(rows), path)
    return path
