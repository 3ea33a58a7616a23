"""Prune a causal LM's decoder blocks with magnitude, Wanda or SparseGPT, and save the result.

    report = prune(model, tokenizer, method="wanda", sparsity=0.5, calibration_text=path)
    report = prune(model, tokenizer, method="sparsegpt", allocation=decisions, ...)
    report = prune(model, tokenizer, method="wanda", nm="2:4", calibration_text=path)
    save_pruned(model, tokenizer, out_dir, report)

Every input is checked before a weight changes, so a bad request leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from torch import nn

from steps.core.blocks import (
    DEFAULT_BATCH_TOKENS,
    calibrated_blocks,
    find_blocks,
    fit_seqlen,
    weight_matrix,
)
from steps.core.calibration import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, calibration_input_ids
from steps.core.errors import TailwiseError
from steps.core.factory import save_hf
from steps.core.progress import progress_bar
from steps.core.sparse_format import compress_dir
from steps.prune import magnitude, sparsegpt, wanda
from steps.prune.masks import Pattern, count_zeros

METHODS = ("magnitude", "wanda", "sparsegpt")
REPORT_FILE = "sparsity_report.parquet"
CALIBRATION_KEY = "tailwise.calibration"
REPORT_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("target", pa.float64()),
        ("achieved", pa.float64()),
        ("params", pa.int64()),
    ]
)

Allocation = Mapping[str, float] | pa.Table | str | os.PathLike[str]


class PruneError(TailwiseError, ValueError):
    """A pruning request that cannot be carried out; nothing has been changed or written."""


# ------------------------------------------------------------------------------ inputs


def parse_nm(nm: str | tuple[int, int]) -> tuple[int, int]:
    """'2:4' or (2, 4) -> (2, 4), with 1 <= N < M."""
    if isinstance(nm, str):
        n_text, sep, m_text = nm.partition(":")
        if not sep or not n_text.strip().isdigit() or not m_text.strip().isdigit():
            raise PruneError(f"N:M pattern {nm!r} is not of the form N:M, e.g. 2:4")
        n, m = int(n_text), int(m_text)
    else:
        n, m = nm
    if not 1 <= n < m:
        raise PruneError(f"N:M pattern {n}:{m} needs 1 <= N < M (keep N of every M weights)")
    return n, m


def check_sparsity(value: float, what: str) -> float:
    if not 0 <= value < 1:
        raise PruneError(f"{what} sparsity {value} is outside [0, 1)")
    return float(value)


def read_allocation(allocation: Allocation) -> dict[str, float]:
    """Per-layer sparsity from a mapping, a table, or a Parquet/CSV file with columns
    name and sparsity (a decisions table from the allocate step)."""
    if isinstance(allocation, Mapping):
        return {str(k): float(v) for k, v in allocation.items()}
    table = allocation if isinstance(allocation, pa.Table) else _read_table(Path(allocation))
    missing = {"name", "sparsity"} - set(table.column_names)
    if missing:
        raise PruneError(f"allocation table lacks column(s) {', '.join(sorted(missing))}")
    names, ratios = table.column("name").to_pylist(), table.column("sparsity").to_pylist()
    if any(r is None for r in ratios):
        raise PruneError("allocation table has missing sparsity values")
    return dict(zip(names, map(float, ratios), strict=True))


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise PruneError(f"allocation file {path} does not exist")
    if path.suffix.lower() == ".csv":
        return pa_csv.read_csv(path)
    try:
        return pq.read_table(path)
    except pa.ArrowInvalid as exc:
        raise PruneError(f"allocation file {path} is not Parquet or CSV: {exc}") from None


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def layer_patterns(
    layers: Mapping[str, nn.Module],
    *,
    sparsity: float | None = None,
    allocation: Allocation | None = None,
    nm: str | tuple[int, int] | None = None,
) -> dict[str, Pattern]:
    """The pattern for every prunable layer, after checking the request.

    N:M applies to every layer and excludes the others. An allocation sets its layers'
    sparsities; layers it does not name get `sparsity`, or stay dense (with a warning).
    """
    if nm is not None:
        if sparsity is not None or allocation is not None:
            raise PruneError("give either an N:M pattern or a sparsity/allocation, not both")
        n, m = parse_nm(nm)
        narrow = [name for name, layer in layers.items() if weight_matrix(layer).shape[1] % m]
        if narrow:
            raise PruneError(f"{n}:{m} needs input widths divisible by {m}; not: {_few(narrow)}")
        return {name: Pattern.n_of_m(n, m) for name in layers}
    if sparsity is None and allocation is None:
        raise PruneError("give a sparsity, an allocation or an N:M pattern")
    default = check_sparsity(sparsity, "target") if sparsity is not None else 0.0
    ratios = read_allocation(allocation) if allocation is not None else {}
    unknown = [name for name in ratios if name not in layers]
    if unknown:
        raise PruneError(
            f"allocation names {len(unknown)} layer(s) that are not prunable layers of the "
            f"model's decoder blocks: {_few(unknown)} (the model has e.g. {_few(list(layers))})"
        )
    for name, ratio in ratios.items():
        check_sparsity(ratio, f"layer {name}:")
    unnamed = [name for name in layers if name not in ratios]
    if allocation is not None and unnamed:
        warnings.warn(
            f"allocation does not name {len(unnamed)} layer(s) ({_few(unnamed)}); "
            f"they get sparsity {default}",
            stacklevel=3,
        )
    return {name: Pattern(ratios.get(name, default)) for name in layers}


# ----------------------------------------------------------------------------- pruning


def prune(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str,
    sparsity: float | None = None,
    allocation: Allocation | None = None,
    nm: str | tuple[int, int] | None = None,
    calibration_text: Path | None = None,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
    device: str = "auto",
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = False,
) -> pa.Table:
    """Prune the model's decoder-block layers in place; returns the per-layer report
    (name, target, achieved, params).

    Wanda and SparseGPT run `nsamples` sequences of `seqlen` tokens from calibration_text
    (seqlen shrinks to the model's context, with a warning; the report's metadata
    records the calibration used), one block at a time on `device`
    ("auto", "cpu", "cuda"); the model stays where it was. A block runs on up to
    `batch_tokens` calibration tokens at once (whole sequences, at least one): fewer, larger
    calls, the same statistics up to float rounding. Magnitude needs no calibration.
    `progress`: a bar of the blocks done on stderr, with the time left.
    """
    if method not in METHODS:
        raise PruneError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise PruneError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    layers = find_blocks(model).all_layers()
    patterns = layer_patterns(layers, sparsity=sparsity, allocation=allocation, nm=nm)
    if method == "magnitude":
        for name, layer in layers.items():
            if patterns[name].sparsity > 0:
                magnitude.prune_layer(layer, patterns[name])
        return sparsity_report(layers, patterns)

    if calibration_text is None or tokenizer is None:
        raise PruneError(f"{method} needs a tokenizer and a calibration text")
    used_seqlen = fit_seqlen(model, seqlen)
    input_ids = calibration_input_ids(
        tokenizer, calibration_text, nsamples=nsamples, seqlen=used_seqlen, seed=seed
    )
    use_hessian = method == "sparsegpt"
    blocks = calibrated_blocks(
        model, input_ids, device=device, hessian=use_hessian, batch_tokens=batch_tokens
    )
    total = len(find_blocks(model))
    with progress_bar(total, f"{method}: {total} blocks", progress) as advance:
        for block in blocks:
            for name, layer in block.layers.items():
                if patterns[name].sparsity == 0:
                    continue
                if use_hessian:
                    sparsegpt.prune_layer(layer, block.stats[name], patterns[name],
                                          layer_name=name)
                else:
                    wanda.prune_layer(layer, block.stats[name], patterns[name])
            advance()
    calibration = {"nsamples": int(input_ids.shape[0]), "seqlen": int(input_ids.shape[1]),
                   "requested_seqlen": seqlen, "seed": seed}
    return sparsity_report(layers, patterns, calibration)


def sparsity_report(
    layers: Mapping[str, nn.Module],
    patterns: Mapping[str, Pattern],
    calibration: Mapping[str, int] | None = None,
) -> pa.Table:
    """Target and achieved sparsity (fraction of exact zeros) of every layer; the
    calibration actually used (seqlen after any shrink to the context) is in the schema
    metadata under ``tailwise.calibration``."""
    rows = []
    for name, layer in layers.items():
        weight = weight_matrix(layer)
        zeros = count_zeros(weight)
        rows.append((name, patterns[name].sparsity, zeros / weight.numel(), weight.numel()))
    columns = list(zip(*rows, strict=True)) if rows else [[], [], [], []]
    schema = REPORT_SCHEMA
    if calibration is not None:
        schema = schema.with_metadata({CALIBRATION_KEY: json.dumps(dict(calibration))})
    return pa.table([list(c) for c in columns], schema=schema)


def report_calibration(report: pa.Table) -> dict[str, int] | None:
    """The calibration a sparsity report was made with (None: magnitude, no calibration)."""
    raw = (report.schema.metadata or {}).get(CALIBRATION_KEY.encode())
    return json.loads(raw) if raw else None


@torch.no_grad()
def save_pruned(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike[str],
    report: pa.Table,
    compressed: bool = False,
) -> Path:
    """Write the pruned model (HF directory, safetensors with the zeros stored, or with
    `compressed` a bitmask + values file, see steps/core/sparse_format.py), its tokenizer and
    the report. The directory appears complete or not at all; an existing non-empty one is an
    error."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PruneError(f"output {out} already exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_hf(model, tokenizer, tmp)
        if compressed:
            compress_dir(tmp)
        pq.write_table(report, tmp / REPORT_FILE)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
