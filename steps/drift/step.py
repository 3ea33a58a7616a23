"""Compare two spectral metrics tables layer by layer and flag the layers that moved, and the
layers with new correlation traps when both tables have them (spectral --randomize)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from steps.core.errors import ParamsError
from steps.core.step import Output, Step, StepContext


class DriftParams(BaseModel):
    metric: str = Field("alpha", description="Metric column to compare.")
    threshold: float = Field(0.5, gt=0, description="Flag a layer when |current - previous| "
                             "exceeds this.")


def layer_drift(previous: pa.Table, current: pa.Table, metric: str,
                threshold: float) -> pa.Table:
    """One row per layer present in both tables: previous, current, delta, flagged."""
    for name, table in (("previous", previous), ("current", current)):
        if metric not in table.column_names or "name" not in table.column_names:
            raise ParamsError(f"drift: the {name} table has no `name` and `{metric}` columns")
    before = dict(zip(previous["name"].to_pylist(), previous[metric].to_pylist(), strict=True))
    names = [n for n in current["name"].to_pylist() if n in before]
    now = dict(zip(current["name"].to_pylist(), current[metric].to_pylist(), strict=True))
    old = np.array([before[n] for n in names], dtype=float)
    new = np.array([now[n] for n in names], dtype=float)
    delta = new - old
    table = pa.table({"name": names, "previous": old, "current": new, "delta": delta,
                      "flagged": np.abs(delta) > threshold})
    if all(TRAPS in t.column_names for t in (previous, current)):
        table = with_new_traps(table, previous, current)
    return table


TRAPS = "num_traps"


def with_new_traps(table: pa.Table, previous: pa.Table, current: pa.Table) -> pa.Table:
    """Trap counts before and now, and `new_traps`: more traps than before (a layer whose
    count is unknown on either side is not flagged)."""
    names = table["name"].to_pylist()
    before = dict(zip(previous["name"].to_pylist(), previous[TRAPS].to_pylist(), strict=True))
    now = dict(zip(current["name"].to_pylist(), current[TRAPS].to_pylist(), strict=True))
    old, new = [before[n] for n in names], [now[n] for n in names]
    grown = [a is not None and b is not None and b > a for a, b in zip(old, new, strict=True)]
    return (table.append_column("traps_previous", pa.array(old, pa.int64()))
            .append_column("traps_current", pa.array(new, pa.int64()))
            .append_column("new_traps", pa.array(grown, pa.bool_())))


def drift(ctx: StepContext, params: DriftParams, inputs: dict[str, Path]) -> dict:
    table = layer_drift(pq.read_table(inputs["previous"]), pq.read_table(inputs["current"]),
                        params.metric, params.threshold)
    path = ctx.workdir / "drift.parquet"
    pq.write_table(table, path)
    flagged = int(np.count_nonzero(table["flagged"].to_numpy(zero_copy_only=False)))
    metrics = {"layers_compared": table.num_rows, "layers_flagged": flagged}
    if "new_traps" in table.column_names:
        metrics["layers_with_new_traps"] = sum(table["new_traps"].to_pylist())
    ctx.log_metrics(metrics)
    return {"drift": Output(path, "drift", "application/vnd.apache.parquet")}


STEP = Step(name="drift", version="1", params=DriftParams, inputs=("previous", "current"),
            fn=drift)
