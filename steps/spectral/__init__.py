"""spectral: per-matrix ESD and heavy-tail (HT-SR) metrics of a model.

Takes: a model (HF directory, safetensors file or torch module).
Gives: a metrics table (Parquet, one row per matrix) and alpha plots.
Start reading: analyze below; the ESD and fits are steps/core/esd.py and fits.py.

    from steps.spectral import analyze
    metrics = analyze("path/to/model_dir")                  # pyarrow.Table
    metrics, esd = analyze(model, return_esd=True)          # + eigenvalues per matrix
    metrics = analyze(model, farms=True)                    # + FARMS alpha (alpha_peak_farms)

See ``analyze`` for the options and METHODS.md section 1 for the definitions.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from threadpoolctl import threadpool_limits

from steps.core import devices
from steps.core.errors import TailwiseError
from steps.core.esd import Spectrum, compute_spectra_batch
from steps.core.farms import FarmsOptions, FarmsSpectra, farms_spectra
from steps.core.fits import ESTIMATORS, PowerLawFit, failed_fit, fit_power_law
from steps.core.weights import MatrixInfo
from steps.spectral.delta import open_analysed
from steps.spectral.metrics import (
    ALPHA_COLUMNS,
    FARMS_SCHEMA,
    SCHEMA,
    alpha_notes,
    farms_columns,
    metrics_row,
    summarize,
)

__all__ = [
    "ESD_SCHEMA",
    "SCHEMA",
    "FarmsOptions",
    "SpectralError",
    "analyze",
    "resolve_device",
    "summarize",
]

ESD_SCHEMA = pa.schema(
    [
        ("layer_id", pa.int64()),
        ("name", pa.string()),
        ("slice_id", pa.int64()),
        ("evals", pa.list_(pa.float64())),
    ]
)
_GPU_BATCH_BYTES = 1 << 30  # float64 bytes of same-shape matrices sent to the GPU at once
# Heap pages are handed back to the OS after matrices this big (smaller ones would pay
# page faults for little memory).
_TRIM_AFTER_ELEMENTS = 1 << 22

Progress = Callable[[int, int, str], None]


class SpectralError(TailwiseError, ValueError):
    """The spectral analysis cannot run on this input (e.g. no analysable matrix)."""


@dataclass(frozen=True)
class _Options:
    estimator: str
    hill_k: float
    small_n_fit: bool
    conv_slices: bool
    device: str
    farms: FarmsOptions | None


def analyze(
    model_or_path: torch.nn.Module | str | Path,
    *,
    estimator: str = "ks",
    hill_k: float = 2.0,
    small_n_fit: bool = False,
    device: str = "auto",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_evals: int = 10,
    max_evals: int | None = 15_000,
    max_n: int | None = 50_000,
    conv_slices: bool = False,
    farms: bool | FarmsOptions = False,
    workers: int | None = None,
    progress: bool | Progress = False,
    return_esd: bool = False,
    randomize: bool = False,
    seed: int = 0,
    base: torch.nn.Module | str | Path | None = None,
) -> pa.Table | tuple[pa.Table, pa.Table]:
    """Per-matrix ESD metrics of a model, one row per weight matrix (SCHEMA).

    model_or_path: a torch.nn.Module, a .safetensors file, a sharded checkpoint's
        index json, or a Hugging Face model directory (read one matrix at a time).
    estimator: the fit in the ``alpha`` (and xmin, D, sigma) columns: "ks" (WeightWatcher),
        "alpha_peak" (AlphaPruning's, with the reference quirk), "alpha_peak_corrected",
        or "hill" (TempBalance's, xmin at n / hill_k). Whatever it is, every table also
        has each consumer's paper's alpha: ``alpha_peak`` (AlphaPruning, AlphaLoRA),
        ``alpha_hill`` (TempBalance, k = 2) and ``alpha_hill_k1.5`` (TB_Sigmoid); how each
        was made is in the schema metadata (b"tailwise.alphas", JSON).
    small_n_fit: WeightWatcher 0.7.7's bias-corrected fit for ESDs with < 20 nonzero
        eigenvalues (``ks`` only). Off by default (plain METHODS.md formula).
    device: "auto" (CUDA when available), "cpu" or "cuda[:i]"; on a GPU same-shape
        matrices are batched.
    include / exclude: regular expressions (re.search) on the matrix name.
    min_evals / max_evals / max_n: skip a matrix with fewer / more eigenvalues
        (M * kernel size) or a larger side N; None disables the upper limits.
        Defaults are WeightWatcher's skip limits (max_evals 15,000, max_N 50,000).
    conv_slices: one row per conv kernel slice instead of the pooled ESD.
    farms: True (the reference's LLM settings) or FarmsOptions(window, q, ops): also the
        FARMS alpha of each matrix (``alpha_peak_farms``) and its window (``farms_rows``,
        ``farms_cols``, ``farms_windows``, ``farms_capped`` when the window was cut down
        to fit the matrix). See steps.core.farms.
    workers: matrices analysed in parallel on CPU (default: CPU count, at most 8);
        BLAS runs single-threaded inside each worker.
    progress: True for a progress bar, or a callback(done, total, name).
    return_esd: also return the eigenvalues, as (metrics, esd) where esd has
        ESD_SCHEMA: layer_id, name, slice_id, evals (ascending, scaled as analysed).
    randomize: also the correlation-trap columns of an element-wise shuffled copy of
        each matrix (lambda_max_rand, num_traps, rand_distance; see steps.spectral.traps),
        shuffled with numpy RandomState(seed).
    base: analyse W - W_base per matrix (a fine-tune's delta); a PEFT LoRA adapter
        directory as model_or_path analyses B A per adapted matrix (steps.spectral.delta).
        The ``analysed`` column then says which.

    Skipped matrices have no row; their names and reasons are in the schema
    metadata (b"tailwise.skipped", JSON), next to the options (b"tailwise.options").
    Rows that could not be fitted (non-finite weights, all-zero matrix, too few
    nonzero eigenvalues) have NaN metrics and a ``status`` other than "ok".
    Raises SpectralError when no matrix can be analysed, WeightsError when the
    weights cannot be read.
    """
    if estimator not in ESTIMATORS:
        raise SpectralError(
            f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}"
        )
    if randomize and conv_slices:
        raise SpectralError("randomize shuffles whole matrices: use pooled conv ESDs "
                            "(conv_slices=False)")
    farms_options = _farms_options(farms, conv_slices)
    options = _Options(
        estimator, hill_k, small_n_fit, conv_slices, resolve_device(device), farms_options
    )
    source, analysed = open_analysed(model_or_path, base)
    infos = source.infos()
    selected, skipped = _select(
        infos, _patterns(include), _patterns(exclude), min_evals, max_evals, max_n, conv_slices
    )
    if not selected:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:5])
        found = f"{len(infos)} found, all skipped ({reasons})" if infos else "none found"
        raise SpectralError(
            f"{_describe(model_or_path)}: no analysable weight matrices "
            f"(Linear, Conv1d/Conv1D, Conv2d, Embedding): {found}"
        )

    report = _progress_reporter(progress, len(selected))
    results = _run(source, selected, options, workers, report)
    rows = [row for row, _ in results]
    schema = pa.unify_schemas([SCHEMA, FARMS_SCHEMA]) if farms_options else SCHEMA
    recorded = {**options.__dict__, "farms": farms_options and farms_options.__dict__}
    notes = alpha_notes(estimator, hill_k, small_n_fit, farms_options)
    metrics = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {
            "tailwise.options": json.dumps(
                {**recorded, "min_evals": min_evals, "max_evals": max_evals, "max_n": max_n}
            ),
            "tailwise.alphas": json.dumps(notes),
            "tailwise.skipped": json.dumps(skipped),
        }
    )
    if randomize:
        from steps.spectral.traps import append_trap_columns

        metrics = append_trap_columns(metrics, source, selected, [e for _, e in results], seed)
    if analysed:
        metrics = metrics.append_column("analysed", pa.array([analysed] * metrics.num_rows))
    if not return_esd:
        return metrics
    esd = pa.Table.from_pylist(
        [
            {"layer_id": r["layer_id"], "name": r["name"], "slice_id": r["slice_id"], "evals": e}
            for r, e in results
        ],
        schema=ESD_SCHEMA,
    )
    return metrics, esd


def _farms_options(farms: bool | FarmsOptions, conv_slices: bool) -> FarmsOptions | None:
    if farms is False:
        return None
    options = FarmsOptions() if farms is True else farms
    if options.problem():
        raise SpectralError(options.problem())
    if conv_slices:
        raise SpectralError("farms measures whole matrices: it cannot run with conv_slices")
    return options


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" when a GPU is usable, else "cpu"; check any other value."""
    try:
        return str(devices.resolve_device(device))
    except devices.DeviceError as error:
        raise SpectralError(str(error)) from None


# --- selection ---------------------------------------------------------------------


def _patterns(value: str | Iterable[str] | None) -> list[re.Pattern]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    return [re.compile(p) for p in value]


def _select(
    infos: list[MatrixInfo],
    include: list[re.Pattern],
    exclude: list[re.Pattern],
    min_evals: int,
    max_evals: int | None,
    max_n: int | None,
    conv_slices: bool,
) -> tuple[list[MatrixInfo], dict[str, str]]:
    """Split matrices into those to analyse and the skipped ones (name -> reason)."""
    selected, skipped = [], {}
    for info in infos:
        reason = _skip_reason(info, include, exclude, min_evals, max_evals, max_n, conv_slices)
        if reason:
            skipped[info.name] = reason
        else:
            selected.append(info)
    return selected, skipped


def _skip_reason(info, include, exclude, min_evals, max_evals, max_n, conv_slices) -> str:
    if include and not any(p.search(info.name) for p in include):
        return "not included"
    if any(p.search(info.name) for p in exclude):
        return "excluded"
    rows, cols = info.shape[:2]
    kernel = int(np.prod(info.shape[2:], dtype=np.int64))
    n, m = max(rows, cols), min(rows, cols)
    # WeightWatcher's rules: counts over the pooled ESD, per slice when not pooling.
    num_evals = m if conv_slices else m * kernel
    if num_evals < min_evals:
        return f"{num_evals} eigenvalues < min_evals {min_evals}"
    if max_evals is not None and num_evals > max_evals:
        return f"{num_evals} eigenvalues > max_evals {max_evals}"
    if max_n is not None and n > max_n:
        return f"N = {n} > max_n {max_n}"
    return ""


def _describe(model_or_path) -> str:
    if isinstance(model_or_path, torch.nn.Module):
        return type(model_or_path).__name__
    return str(model_or_path)


# --- execution ---------------------------------------------------------------------


def _run(source, selected: list[MatrixInfo], options: _Options, workers, report):
    """(metrics row, eigenvalues) for every spectrum, in model order."""
    workers = workers or min(os.cpu_count() or 1, 8)
    results: list[tuple[dict, np.ndarray]] = []
    # BLAS is single-threaded per worker: parallel matrices scale better than threaded
    # LAPACK on small (<= 4k) matrices, and never oversubscribe. BLAS limits are global,
    # OpenMP's (torch's copies) are per thread, hence the initializer.
    pool = ThreadPoolExecutor(workers, initializer=_single_threaded_worker)
    with threadpool_limits(limits=1), pool:
        in_flight: list[Future] = []
        for batch in _batches(selected, options.device):
            if options.device == "cpu":
                in_flight.append(pool.submit(_analyse_batch, source, batch, options))
            else:  # the GPU computes the batch here; fits run on the CPU pool
                spectra = _spectra_of(source, batch, options)
                in_flight.append(pool.submit(_fit_batch, batch, spectra, options))
            # Bound the matrices held in memory at once.
            while len(in_flight) > workers:
                _collect(in_flight.pop(0), results, report)
        for future in in_flight:
            _collect(future, results, report)
    results.sort(key=lambda item: (item[0]["layer_id"], item[0]["slice_id"] or 0))
    return results


def _single_threaded_worker() -> None:
    threadpool_limits(limits=1, user_api="openmp")  # stays in force for this thread


def _batches(selected: list[MatrixInfo], device: str) -> Iterator[list[MatrixInfo]]:
    """Single matrices on CPU; runs of same-shape matrices (up to a byte budget) on GPU."""
    if device == "cpu":
        yield from ([info] for info in selected)
        return
    batch: list[MatrixInfo] = []
    for info in selected:
        same = batch and (batch[0].shape, batch[0].layer_type) == (info.shape, info.layer_type)
        full = (len(batch) + 1) * int(np.prod(info.shape)) * 8 > _GPU_BATCH_BYTES
        if batch and (not same or full):
            yield batch
            batch = []
        batch.append(info)
    if batch:
        yield batch


Measured = tuple[list[Spectrum], FarmsSpectra | None]


def _spectra_of(source, batch: list[MatrixInfo], options: _Options) -> list[Measured]:
    """Per matrix: its spectra and, with FARMS, its windows' spectra."""
    tensors = [source.load(info) for info in batch]
    spectra = compute_spectra_batch(
        tensors, batch[0].layer_type, per_slice=options.conv_slices, device=options.device
    )
    farms = [_farms_of(t, batch[0].layer_type, options) for t in tensors]
    return list(zip(spectra, farms, strict=True))


def _farms_of(tensor: torch.Tensor, layer_type: str, options: _Options) -> FarmsSpectra | None:
    if options.farms is None or not torch.isfinite(tensor).all():
        return None
    return farms_spectra(tensor, layer_type, options.farms, device=options.device)


def _analyse_batch(source, batch: list[MatrixInfo], options: _Options):
    spectra = _spectra_of(source, batch, options)
    if sum(int(np.prod(info.shape)) for info in batch) >= _TRIM_AFTER_ELEMENTS:
        _release_freed_memory()
    return _fit_batch(batch, spectra, options)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only).

    glibc keeps freed buffers of tens of MB in per-thread arenas, so without this the
    resident size creeps towards (workers x the largest matrices' float64 copies) plus
    fragmentation instead of staying at what is in use.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def _fit_batch(batch: list[MatrixInfo], measured: list[Measured], options: _Options):
    """Per matrix: its name and its (metrics row, eigenvalues), one per spectrum."""
    out = []
    for info, (matrix_spectra, farms) in zip(batch, measured, strict=True):
        matrix_results = []
        for spectrum in matrix_spectra:
            fit = _fit(spectrum, options.estimator, options.hill_k, options.small_n_fit)
            alphas = {
                column: _fit(spectrum, estimator, hill_k, False).alpha
                for column, (estimator, hill_k) in ALPHA_COLUMNS.items()
            }
            row = metrics_row(
                layer_id=info.index,
                name=info.name,
                layer_type=info.layer_type,
                num_params=int(np.prod(info.shape)),
                spectrum=spectrum,
                fit=fit,
                alphas=alphas,
            )
            if options.farms is not None:
                row.update(farms_columns(farms, _farms_alpha(farms)))
            matrix_results.append((row, spectrum.evals))
        out.append((info.name, matrix_results))
    return out


def _fit(spectrum: Spectrum, estimator: str, hill_k: float, small_n: bool) -> PowerLawFit:
    if spectrum.status != "ok":
        return failed_fit(spectrum.status)
    return fit_power_law(spectrum.evals, estimator=estimator, hill_k=hill_k, small_n=small_n)


def _farms_alpha(farms: FarmsSpectra | None) -> float:
    """alpha_peak of the pooled windows; for conv row bands the mean, as the reference."""
    return float("nan") if farms is None else farms.alpha("alpha_peak")


def _collect(future: Future, results: list, report) -> None:
    for name, matrix_results in future.result():
        results.extend(matrix_results)
        report(name)


def _progress_reporter(progress: bool | Progress, total: int) -> Callable[[str], None]:
    """A per-matrix callback: the user's, a text progress line, or nothing."""
    done = 0

    def call(name: str) -> None:
        nonlocal done
        done += 1
        if callable(progress):
            progress(done, total, name)
        elif progress:
            end = "\n" if done >= total else ""
            print(f"\rspectral: {done}/{total} {name[:60]:<60}", end=end, flush=True)

    return call
