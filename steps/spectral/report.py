"""The HT-SR report: one self-contained HTML page of a spectral analysis.

    html = render_report(metrics, esd, title="my model")
    write_report(metrics, esd, "report.html")

The page holds the model summary (mean alpha, over-/under-trained counts, the
estimator), alpha by depth, the warnings (over-/under-trained, failed fits, skipped
matrices) and a table of every matrix with a small log-log ESD, its power-law fit and
xmin, sortable by any column. Everything is inline (SVG, CSS, a few lines of JS) and a
Content-Security-Policy forbids any request, so the file opens anywhere, offline.
The ESD of each matrix is drawn as a histogram of at most ESD_BINS log-spaced bins,
which keeps a 200-matrix model's page well under a megabyte whatever its sizes.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from steps.spectral import ESD_SCHEMA, SpectralError
from steps.spectral.metrics import OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA, summarize

ESD_BINS = 30
_ESD_W, _ESD_H, _ESD_PAD, _ESD_LABEL = 200, 100, 4, 14
_DEPTH_W, _DEPTH_H, _DEPTH_LEFT, _DEPTH_BOTTOM = 900, 260, 40, 24
_COLOURS = {"over-trained": "#2b6cb0", "under-trained": "#dd6b20", "": "#2f855a"}
# Columns of the matrix table: (metrics column, heading, sort type).
_COLUMNS = [("layer_id", "#", "num"), ("name", "matrix", "text"), ("layer_type", "type", "text"),
            ("N", "N", "num"), ("M", "M", "num"), ("alpha", "alpha", "num"),
            ("xmin", "xmin", "num"), ("D", "D", "num"), ("num_pl_spikes", "tail n", "num"),
            ("alpha_weighted", "alpha_weighted", "num"), ("warning", "warning", "text")]


# What the page reads from a metrics table (spectral SCHEMA; `block` is optional).
METRICS_COLUMNS = ("layer_id", "name", "slice_id", "layer_type", "N", "M", "alpha", "xmin", "D",
                   "num_pl_spikes", "alpha_weighted", "warning", "status")


def write_report(metrics: pa.Table, esd: pa.Table | None, path: str | Path,
                 title: str = "spectral analysis") -> Path:
    """Render the report of `metrics` (and the ESDs, when given) into `path`; the file
    appears complete or not at all."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(render_report(metrics, esd, title), encoding="utf-8")
    partial.replace(path)
    return path


def check_tables(metrics: pa.Table, esd: pa.Table | None, where: str) -> None:
    """Raise SpectralError naming `where` unless the tables are a spectral run's."""
    missing = [c for c in METRICS_COLUMNS if c not in metrics.column_names]
    if missing:
        raise SpectralError(f"{where}: not a spectral metrics table (no column "
                            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if esd is not None and not set(ESD_SCHEMA.names) <= set(esd.column_names):
        raise SpectralError(f"{where}: the ESD table needs columns {', '.join(ESD_SCHEMA.names)}")


def render_report(metrics: pa.Table, esd: pa.Table | None,
                  title: str = "spectral analysis") -> str:
    """The report page as a string (metrics: spectral SCHEMA; esd: ESD_SCHEMA or None)."""
    rows = metrics.to_pylist()
    options = _metadata_json(metrics, b"tailwise.options")
    skipped = _metadata_json(metrics, b"tailwise.skipped")
    evals = _evals_by_matrix(esd) if esd is not None else None
    extra = _extra_alpha_columns(metrics)
    parts = [
        _head(title),
        f"<h1>HT-SR report: {_text(title)}</h1>",
        _summary(metrics, options, skipped),
        _depth_section(rows),
        _warnings(rows, skipped),
        _matrix_table(rows, evals, extra),
        f"<script>{_SORT_JS}</script></body></html>",
    ]
    return "\n".join(parts)


# --- reading the tables --------------------------------------------------------------


def _metadata_json(table: pa.Table, key: bytes) -> dict:
    raw = (table.schema.metadata or {}).get(key)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _evals_by_matrix(esd: pa.Table) -> dict[tuple[int, int], np.ndarray]:
    """(layer_id, slice_id or 0) -> eigenvalues, read as numpy slices (no Python lists)."""
    column = esd.column("evals").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    layers = esd.column("layer_id").to_pylist()
    slices = esd.column("slice_id").to_pylist()
    return {(layer, slice_id or 0): values[offsets[i]:offsets[i + 1]]
            for i, (layer, slice_id) in enumerate(zip(layers, slices, strict=True))}


def _extra_alpha_columns(metrics: pa.Table) -> list[str]:
    """Other estimators' alphas the table carries (e.g. alpha_peak, alpha_hill)."""
    return [f.name for f in metrics.schema if f.name.startswith("alpha_")
            and f.name != "alpha_weighted" and pa.types.is_floating(f.type)]


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# --- sections -------------------------------------------------------------------------


def _head(title: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>HT-SR report: {_text(title)}</title>
<style>{_CSS}</style></head><body>"""


def _summary(metrics: pa.Table, options: dict, skipped: dict) -> str:
    summary = summarize(metrics)
    estimator = options.get("estimator", "unknown")
    items = [
        ("matrices analysed", summary["num_matrices"]),
        ("fitted", summary["num_fitted"]),
        ("mean alpha", _number(summary["mean_alpha"])),
        ("mean alpha_weighted", _number(summary["mean_alpha_weighted"])),
        (f"over-trained (alpha &lt; {OVER_TRAINED_ALPHA:g})", summary["num_over_trained"]),
        (f"under-trained (alpha &gt; {UNDER_TRAINED_ALPHA:g})", summary["num_under_trained"]),
        ("estimator", _text(str(estimator))),
        ("skipped matrices", len(skipped)),
    ]
    if "model_digest" in metrics.column_names and metrics.num_rows:
        items.append(("model digest", _text(str(metrics.column("model_digest")[0])[:12])))
    cells = "".join(f"<div><dt>{label}</dt><dd>{value}</dd></div>" for label, value in items)
    return f'<section id="summary"><h2>Summary</h2><dl>{cells}</dl></section>'


def _depth_section(rows: list[dict]) -> str:
    return ('<section id="depth"><h2>Alpha by depth</h2>'
            f"{_depth_svg(rows)}<p class=note>One point per matrix in model order; dashed "
            f"lines at alpha {OVER_TRAINED_ALPHA:g} and {UNDER_TRAINED_ALPHA:g}; the line is "
            "the mean alpha of each block. Points above the top edge are drawn on it.</p>"
            "</section>")


def _depth_svg(rows: list[dict]) -> str:
    fitted = [(i, r) for i, r in enumerate(rows) if _finite(r["alpha"])]
    top = max([UNDER_TRAINED_ALPHA + 2.0] + [min(r["alpha"], 12.0) for _, r in fitted])
    top = math.ceil(top)
    width, height = _DEPTH_W - _DEPTH_LEFT, _DEPTH_H - _DEPTH_BOTTOM

    def x(i: float) -> float:
        return _DEPTH_LEFT + (i + 0.5) * width / max(len(rows), 1)

    def y(alpha: float) -> float:
        return height - min(alpha, top) / top * (height - 8)

    shapes = [_axis_lines(top, y, height)]
    for guide in (OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA):
        shapes.append(f'<line class="guide" x1="{_DEPTH_LEFT}" x2="{_DEPTH_W}" '
                      f'y1="{y(guide):.1f}" y2="{y(guide):.1f}"/>')
    shapes.append(_block_means(fitted, x, y))
    for i, row in fitted:
        colour = _COLOURS.get(row["warning"] or "", _COLOURS[""])
        shapes.append(f'<circle cx="{x(i):.1f}" cy="{y(row["alpha"]):.1f}" r="3" '
                      f'fill="{colour}"><title>{_text(row["name"])}: alpha '
                      f'{row["alpha"]:.3f}</title></circle>')
    shapes.append(f'<text x="{_DEPTH_LEFT + width / 2:.0f}" y="{_DEPTH_H - 4}" '
                  'text-anchor="middle">matrix (model order)</text>')
    return (f'<svg class="depth" viewBox="0 0 {_DEPTH_W} {_DEPTH_H}" width="{_DEPTH_W}" '
            f'height="{_DEPTH_H}" role="img" aria-label="alpha by depth">{"".join(shapes)}</svg>')


def _axis_lines(top: int, y, height: float) -> str:
    ticks = "".join(f'<text x="{_DEPTH_LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>'
                    for v in range(0, top + 1, 2))
    return (f'<line class="axis" x1="{_DEPTH_LEFT}" x2="{_DEPTH_LEFT}" y1="0" y2="{height}"/>'
            f'<line class="axis" x1="{_DEPTH_LEFT}" x2="{_DEPTH_W}" y1="{height}" '
            f'y2="{height}"/>{ticks}'
            f'<text x="12" y="{height / 2:.0f}" transform="rotate(-90 12 {height / 2:.0f})" '
            'text-anchor="middle">alpha</text>')


def _block_means(fitted: list[tuple[int, dict]], x, y) -> str:
    """A polyline through each block's mean alpha, at the block's mean position."""
    blocks: dict[int, list[tuple[int, float]]] = {}
    for i, row in fitted:
        if row.get("block") is not None:
            blocks.setdefault(row["block"], []).append((i, row["alpha"]))
    if len(blocks) < 2:
        return ""
    points = " ".join(
        f"{x(float(np.mean([i for i, _ in members]))):.1f},"
        f"{y(float(np.mean([a for _, a in members]))):.1f}"
        for _, members in sorted(blocks.items()))
    return f'<polyline class="blocks" points="{points}"/>'


def _warnings(rows: list[dict], skipped: dict) -> str:
    items = []
    for row in rows:
        if row["status"] != "ok" or not _finite(row["alpha"]):
            items.append(("failed", f"{_text(row['name'])}: no fit ({_text(row['status'])}; "
                                    "alpha is NaN)"))
        elif row["warning"]:
            items.append((row["warning"], f"{_text(row['name'])}: {row['warning']} "
                                          f"(alpha {row['alpha']:.2f})"))
    items += [("skipped", f"{_text(name)}: skipped ({_text(str(why))})")
              for name, why in skipped.items()]
    if not items:
        return '<section id="warnings"><h2>Warnings</h2><p>None.</p></section>'
    lines = "".join(f'<li class="{kind}">{text}</li>' for kind, text in items)
    return (f'<section id="warnings"><h2>Warnings ({len(items)})</h2>'
            f"<ul>{lines}</ul></section>")


def _matrix_table(rows: list[dict], evals, extra: list[str]) -> str:
    columns = _COLUMNS[:6] + [(c, c, "num") for c in extra] + _COLUMNS[6:]
    head = "".join(f'<th data-col="{i}" data-type="{kind}" title="sort">{label}</th>'
                   for i, (_, label, kind) in enumerate(columns))
    body = "".join(_matrix_row(row, columns, evals) for row in rows)
    note = "" if evals is not None else \
        "<p class=note>No eigenvalue table was given: the ESD plots are left out.</p>"
    return (f'<section id="matrices"><h2>Matrices ({len(rows)})</h2>{note}'
            "<p class=note>Click a heading to sort (again to reverse). ESD: density of the "
            "eigenvalues of W<sup>T</sup>W (log-log, dots), the fitted power law from xmin "
            "(red) and xmin (grey).</p>"
            f'<table id="matrix-table"><thead><tr>{head}<th>ESD</th></tr></thead>'
            f"<tbody>{body}</tbody></table></section>")


def _matrix_row(row: dict, columns, evals) -> str:
    cells, keys = [], []
    for i, (column, _, kind) in enumerate(columns):
        value = row.get(column)
        if kind == "num":
            shown = str(value) if isinstance(value, int) else _number(value)
            key = repr(float(value)) if _finite(value) else ""
        else:
            shown = key = _text(str(value or ""))
        cells.append(f'<td class="{column}">{shown}</td>')
        keys.append(f'data-k{i}="{key}"')
    values = None if evals is None else evals.get((row["layer_id"], row["slice_id"] or 0))
    plot = _esd_svg(values, row) if values is not None else ""
    warning = row["warning"] or ("failed" if row["status"] != "ok" else "")
    return f'<tr class="{warning}" {" ".join(keys)}>{"".join(cells)}<td>{plot}</td></tr>'


def _esd_svg(evals: np.ndarray, row: dict) -> str:
    """A small log-log ESD: binned density, the fitted tail and xmin (the plot's own
    nested svg viewport clips the fitted line where it leaves the plot)."""
    positive = evals[evals > 0]
    if len(positive) < 2 or positive.min() == positive.max():
        why = "no spread" if len(positive) else "all eigenvalues zero"
        return f'<span class="note">{why}</span>'
    centres, density = esd_density(positive, ESD_BINS)
    lx, ly = np.log10(centres), np.log10(density)
    x_lo, x_hi = math.log10(positive.min()), math.log10(positive.max())
    y_lo, y_hi = float(ly.min()) - 0.3, float(ly.max()) + 0.3

    def px(v: float) -> float:
        return _ESD_PAD + (v - x_lo) / (x_hi - x_lo) * (_ESD_W - 2 * _ESD_PAD)

    def py(v: float) -> float:
        return _ESD_H - _ESD_PAD - (v - y_lo) / (y_hi - y_lo) * (_ESD_H - 2 * _ESD_PAD)

    dots = "".join(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="1.8"/>'
                   for a, b in zip(lx, ly, strict=True))
    fit = ""
    if row["status"] == "ok" and _finite(row["alpha"]) and _finite(row["xmin"]) \
            and row["xmin"] > 0:
        (x0, y0), (x1, y1) = fitted_tail(row, len(positive), positive.max())
        xm = px(math.log10(row["xmin"]))
        fit = (f'<line class="xmin" x1="{xm:.1f}" x2="{xm:.1f}" y1="0" y2="{_ESD_H}"/>'
               f'<line class="fit" x1="{px(x0):.1f}" y1="{py(y0):.1f}" '
               f'x2="{px(x1):.1f}" y2="{py(y1):.1f}"/>')
    label = (f"alpha {_number(row['alpha'])}, xmin {_number(row['xmin'])}"
             if _finite(row["alpha"]) else "no fit")
    bottom = _ESD_H + _ESD_LABEL
    return (f'<svg class="esd" viewBox="0 0 {_ESD_W} {bottom + _ESD_LABEL}" width="{_ESD_W}" '
            f'height="{bottom + _ESD_LABEL}" role="img" aria-label="ESD of {_text(row["name"])}">'
            f'<text x="{_ESD_W / 2:.0f}" y="11" text-anchor="middle">{label}</text>'
            f'<svg y="{_ESD_LABEL}" width="{_ESD_W}" height="{_ESD_H}">'
            f'<rect width="{_ESD_W}" height="{_ESD_H}"/>{dots}{fit}</svg>'
            f'<text x="0" y="{bottom + 11}">{_number(positive.min())}</text>'
            f'<text x="{_ESD_W}" y="{bottom + 11}" text-anchor="end">'
            f"{_number(positive.max())} &#955;</text></svg>")


def esd_density(positive: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram density of positive eigenvalues over log-spaced bins: (centres, density)
    of the non-empty bins."""
    edges = np.logspace(np.log10(positive.min()), np.log10(positive.max()), bins + 1)
    density, edges = np.histogram(positive, bins=edges, density=True)
    centres = np.sqrt(edges[:-1] * edges[1:])
    shown = density > 0
    return centres[shown], density[shown]


def fitted_tail(row: dict, num_positive: int, x_max: float) -> tuple[tuple, tuple]:
    """End points (log10 x, log10 density) of the fitted power law on [xmin, x_max]: the
    pdf (alpha - 1) / xmin * (x / xmin)^-alpha scaled by the tail's share of the ESD, a
    straight line in log-log."""
    alpha, xmin = row["alpha"], row["xmin"]
    share = row["num_pl_spikes"] / num_positive
    log_scale = math.log10(share * (alpha - 1) / xmin)
    ends = (math.log10(xmin), math.log10(max(x_max, xmin)))
    return tuple((lx, log_scale - alpha * (lx - ends[0])) for lx in ends)


def _number(value) -> str:
    if not _finite(value):
        return "NaN"
    return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}"


def _text(value: str) -> str:
    return html.escape(value, quote=True)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1a202c;background:#fff}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
dl{display:flex;flex-wrap:wrap;gap:8px 24px} dl div{min-width:140px}
dt{color:#4a5568;font-size:12px} dd{margin:0;font-size:18px;font-weight:600}
svg text{font-size:11px;fill:#2d3748}
.axis{stroke:#4a5568} .guide{stroke:#a0aec0;stroke-dasharray:4 3}
.blocks{fill:none;stroke:#718096;stroke-width:1.2}
.esd rect{fill:#f7fafc;stroke:#e2e8f0} .esd circle{fill:#2b6cb0}
.fit{stroke:#e53e3e;stroke-width:1.5} .xmin{stroke:#a0aec0;stroke-dasharray:3 2}
table{border-collapse:collapse} th,td{padding:2px 8px;border-bottom:1px solid #e2e8f0;
text-align:right;vertical-align:middle} td.name,td.layer_type,td.warning{text-align:left}
td.name{max-width:340px;overflow-wrap:anywhere}
th{cursor:pointer;position:sticky;top:0;background:#edf2f7;user-select:none}
th[data-type=text]{text-align:left} #warnings ul{max-height:24em;overflow:auto}
th[data-dir=asc]::after{content:" \\25B2"} th[data-dir=desc]::after{content:" \\25BC"}
tr.under-trained td.warning,li.under-trained{color:#c05621}
tr.over-trained td.warning,li.over-trained{color:#2b6cb0}
tr.failed td,li.failed{color:#c53030} li.skipped{color:#4a5568}
.note{color:#4a5568;font-size:12px}
"""

# Sorts the matrix table by the clicked column; empty (NaN) values go last ascending.
_SORT_JS = """
document.querySelectorAll('#matrix-table th[data-col]').forEach(function (th) {
  th.addEventListener('click', function () {
    var body = document.querySelector('#matrix-table tbody');
    var dir = th.dataset.dir === 'asc' ? -1 : 1;
    document.querySelectorAll('#matrix-table th').forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    var attr = 'k' + th.dataset.col, numeric = th.dataset.type === 'num';
    var key = function (row) {
      var v = row.dataset[attr];
      return numeric ? (v === '' ? Infinity : parseFloat(v)) : v;
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""
