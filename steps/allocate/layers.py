"""Shared helpers: read names, metric values, blocks and parameter counts from a metrics table."""

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ValidationError

from steps.allocate.errors import AllocationError
from steps.allocate.io import SOURCE_KEY, source_of
from steps.core.naming import BLOCK_PATTERN

OptionsT = TypeVar("OptionsT", bound=BaseModel)

_SPECTRAL_COLUMNS = "alpha, alpha_peak, alpha_hill, alpha_hill_k1.5"
# How to make a column the policies read by default, for the missing-column error.
COLUMN_SOURCES = {
    **dict.fromkeys(_SPECTRAL_COLUMNS.split(", "),
                    f"`tailwise spectral MODEL` (writes {_SPECTRAL_COLUMNS})"),
    "alpha_peak_farms": "`tailwise spectral MODEL --farms`",
}


def fail(table: pa.Table, problem: str) -> AllocationError:
    """An AllocationError whose message names the input table."""
    return AllocationError(f"{source_of(table)}: {problem}")


def parse_options(model: type[OptionsT], options: Mapping[str, Any], policy: str) -> OptionsT:
    """Validate policy options, turning pydantic's report into a one-line AllocationError."""
    try:
        return model(**options)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "options"
        given = f"={first['input']!r}" if field in options else ""
        raise AllocationError(f"{policy} option {field}{given}: {first['msg']}") from err


def require_columns(table: pa.Table, *columns: str) -> None:
    """Raise when the table is empty or lacks any of the columns."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        have = ", ".join(table.column_names) or "none"
        makers = sorted({COLUMN_SOURCES[c] for c in missing if c in COLUMN_SOURCES})
        hint = f"; make it with {' or '.join(makers)} or choose another with --metric" \
            if makers else ""
        raise fail(table, f"missing column(s) {', '.join(missing)} (has: {have}){hint}")
    if table.num_rows == 0:
        raise fail(table, "the metrics table is empty")


def layer_names(table: pa.Table) -> list[str]:
    """The `name` column as strings; must be non-null and unique (decisions are keyed by it)."""
    require_columns(table, "name")
    names = table["name"].to_pylist()
    if any(n is None for n in names):
        raise fail(table, "column name has missing values")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        dupes = sorted(n for n, count in Counter(names).items() if count > 1)[:3]
        raise fail(table, f"duplicate layer names: {', '.join(dupes)}")
    return names


def metric_values(table: pa.Table, column: str, *, positive: bool = False) -> np.ndarray:
    """A numeric column as float64; null, NaN and infinite values are errors."""
    require_columns(table, column)
    if not (pa.types.is_integer(table[column].type) or pa.types.is_floating(table[column].type)):
        raise fail(table, f"column {column} is {table[column].type}, not numeric")
    values = pc.cast(table[column], pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(values)  # nulls arrive as NaN
    if bad.any():
        names = table["name"].to_pylist() if "name" in table.column_names else []
        where = f" (e.g. {names[int(np.argmax(bad))]})" if names else ""
        raise fail(table, f"column {column} has {int(bad.sum())} NaN/missing value(s){where}")
    if positive and (values <= 0).any():
        raise fail(table, f"column {column} must be > 0 (min {values.min():g})")
    return values


def block_ids(table: pa.Table, *, required: bool = True) -> np.ndarray | None:
    """Block index per row: the `block` column if present, else parsed from the layer name.

    Returns None when blocks cannot be found and `required` is False.
    """
    if "block" in table.column_names:
        values = table["block"].to_pylist()
        try:
            blocks = np.array([int(v) for v in values], dtype=np.int64)
        except (TypeError, ValueError):
            raise fail(table, "column block must hold integers with no missing values") from None
        if not np.array_equal(blocks, np.asarray(values, dtype=float)):
            raise fail(table, "column block must hold integers")
        return blocks
    names = layer_names(table)
    matches = [BLOCK_PATTERN.search(n) for n in names]
    unmatched = [n for n, m in zip(names, matches, strict=True) if m is None]
    if unmatched:
        if not required:
            return None
        raise fail(
            table,
            f"cannot find a block index in {len(unmatched)} layer name(s), e.g. "
            f"{', '.join(unmatched[:3])}; add a `block` column or drop those rows",
        )
    return np.array([int(m.group(1)) for m in matches], dtype=np.int64)


def block_column(blocks: np.ndarray | None, rows: int) -> pa.Array:
    """The `block` output column (all null when blocks are unknown)."""
    return pa.array(blocks if blocks is not None else [None] * rows, pa.int64())


def block_prefix(name: str, block: int) -> str:
    """The block's module path (`model.layers.3`) from one of its layer names."""
    match = BLOCK_PATTERN.search(name)
    if match is None or int(match.group(1)) != block:
        return f"block.{block}"
    return name[: match.end(1)].lstrip(".")


def param_counts(table: pa.Table) -> np.ndarray:
    """P_i = N * M from the `N` and `M` columns, or equal weights (1.0) without them."""
    if "N" not in table.column_names or "M" not in table.column_names:
        return np.ones(table.num_rows)
    counts = metric_values(table, "N") * metric_values(table, "M")
    if (counts <= 0).any():
        raise fail(table, "columns N and M must be positive")
    return counts


def decisions_table(
    columns: dict[str, Any], *, policy: str, options: BaseModel, source: pa.Table, **extra: Any
) -> pa.Table:
    """Build the output table; policy, options and `extra` go into the schema metadata."""
    table = pa.table(columns)
    metadata = {
        b"tailwise.policy": policy.encode(),
        b"tailwise.options": options.model_dump_json().encode(),
        SOURCE_KEY: source_of(source).encode(),
    }
    for key, value in extra.items():
        metadata[f"tailwise.{key}".encode()] = json.dumps(value).encode()
    return table.replace_schema_metadata(metadata)


def read_metadata(table: pa.Table, key: str) -> Any:
    """A value written by `decisions_table` (policy and source as str, the rest JSON-decoded)."""
    raw = (table.schema.metadata or {})[f"tailwise.{key}".encode()].decode()
    return raw if key in ("policy", "source") else json.loads(raw)
