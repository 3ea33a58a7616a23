"""`tailwise report`: the HT-SR report page of a model or of a spectral metrics table."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from steps.core.errors import TailwiseError, one_line
from steps.core.store import ArtifactStore, open_store
from tailwise_cli.app import REF_PATTERN, StoreOption, app, console, input_ref, run_and_report


@app.command()
def report(
    source: Annotated[str, typer.Argument(
        help="A model (anything `tailwise spectral` takes: HF directory, .safetensors, index "
        "json, Hub id, artifact digest), or a spectral metrics table (a .parquet file or the "
        "digest of a spectral step's metrics).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML page to write.")] = Path(
        "report.html"),
    esd: Annotated[Path | None, typer.Option(
        help="The eigenvalue table (esd.parquet) of a metrics .parquet file, for the per-matrix "
        "ESD plots.")] = None,
    estimator: Annotated[str, typer.Option(
        help="For a model: ks, alpha_peak, alpha_peak_corrected or hill.")] = "ks",
    device: Annotated[str, typer.Option(help="For a model: auto, cpu or cuda.")] = "auto",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute.")] = False,
    store: StoreOption = None,
) -> None:
    """Write one self-contained HTML page: summary, alpha by depth, warnings, every ESD."""
    the_store = open_store(store)
    path = Path(source)
    if path.is_file() and path.suffix == ".parquet":
        page = _report_of_files(path, esd, output)
    else:
        if esd is not None:
            raise TailwiseError("--esd goes with a metrics .parquet file; a model or artifact "
                                "brings its own eigenvalues")
        kind = None if path.exists() else _artifact_kind(the_store, source)
        if kind == "spectral-metrics":
            page = _report_of_artifact(the_store, source, output)
        elif kind not in (None, "model"):
            raise TailwiseError(f"{source}: a {kind} artifact; give a model or the metrics of "
                                "a spectral run")
        else:
            params = {"estimator": estimator, "device": device}
            model = input_ref(the_store, source, "model")
            _, result = run_and_report("spectral", params, {"model": model}, store,
                                       use_cache=not no_cache, progress=True)
            page = the_store.get(result.outputs["report"].digest, output)
    console.print(f"report: {page} ({page.stat().st_size / 1e6:.2f} MB)", soft_wrap=True)


def _artifact_kind(the_store: ArtifactStore, ref: str) -> str | None:
    """The kind of the artifact `ref` names, or None when it names none (e.g. a Hub id)."""
    return the_store.stat(ref).kind if REF_PATTERN.fullmatch(ref) else None


def _report_of_files(metrics_file: Path, esd_file: Path | None, output: Path) -> Path:
    from steps.spectral.report import check_tables, write_report

    metrics = _read_parquet(metrics_file)
    esd = _read_parquet(esd_file) if esd_file is not None else None
    check_tables(metrics, esd, str(metrics_file))
    return write_report(metrics, esd, output, metrics_file.name)


def _report_of_artifact(the_store: ArtifactStore, ref: str, output: Path) -> Path:
    """A stored metrics table, with the ESD its spectral run stored beside it."""
    import pyarrow.parquet as pq

    from steps.spectral.report import check_tables, write_report

    manifest = the_store.stat(ref)
    made = manifest.produced_by
    entry = the_store.cache_get(made.cache_key) if made and made.cache_key else None
    esd_digest = (entry or {}).get("outputs", {}).get("esd")
    with tempfile.TemporaryDirectory() as scratch:
        metrics = pq.read_table(the_store.get(manifest.digest, Path(scratch) / "metrics.parquet"))
        esd = pq.read_table(the_store.get(esd_digest, Path(scratch) / "esd.parquet")) \
            if esd_digest else None
    check_tables(metrics, esd, f"artifact {manifest.digest[:12]}")
    model = made.inputs.get("model", "") if made else ""
    title = f"model {model[:12]}" if model else f"metrics {manifest.digest[:12]}"
    return write_report(metrics, esd, output, title)


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise TailwiseError(f"{path}: no such file")
    try:
        return pq.read_table(path)
    except Exception as error:  # pyarrow raises several kinds for a file that is not Parquet
        raise TailwiseError(f"{path}: not a readable Parquet file ({one_line(error)})") from None
