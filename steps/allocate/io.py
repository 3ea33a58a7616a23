"""Read a per-layer metrics table from Parquet or CSV."""

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from steps.allocate.errors import AllocationError

SOURCE_KEY = b"tailwise.source"


def read_metrics(path: str | Path) -> pa.Table:
    """Read a Parquet (.parquet, .pq) or CSV (.csv) metrics table.

    The path is kept in the schema metadata so later errors can name the input.
    """
    path = Path(path)
    if not path.is_file():
        raise AllocationError(f"{path}: no such metrics file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif suffix == ".csv":
            table = pacsv.read_csv(path)
        else:
            raise AllocationError(f"{path}: unknown format {suffix!r} (use .parquet or .csv)")
    except (pa.ArrowInvalid, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AllocationError(f"{path}: cannot read metrics table: {first_line}") from err
    return with_source(table, str(path))


def with_source(table: pa.Table, source: str) -> pa.Table:
    """Return the table with `source` recorded in its schema metadata."""
    metadata = dict(table.schema.metadata or {})
    metadata[SOURCE_KEY] = source.encode()
    return table.replace_schema_metadata(metadata)


def source_of(table: pa.Table) -> str:
    """The name of the input a table came from, for error messages."""
    metadata = table.schema.metadata or {}
    return metadata.get(SOURCE_KEY, b"metrics table").decode()
