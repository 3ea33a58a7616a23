"""Per-layer tables that fit the terminal: names shortened from the left (the distinctive tail
stays, e.g. `…layers.3.self_attn.q_proj`), columns of less use hidden when the terminal is
too narrow for the names, optionally only the top N rows, and a summary line."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rich import box
from rich.table import Table

from tailwise_cli.app import console

ELLIPSIS = "…"
NAME_WIDTH_WANTED = 30  # enough for `…layers.11.self_attn.q_proj`
CELL_PADDING = 3  # a space each side and the column divider (SIMPLE_HEAD box: all blank)
TABLE_EDGES = 1  # both edges, less the divider the first column does not have


def shorten_left(name: str, width: int) -> str:
    """`name` in at most `width` characters: cut from the left, at a dot where one is near."""
    if len(name) <= width:
        return name
    start = len(name) - (width - 1)
    tail = name[start:]
    dot = tail.find(".")
    cut_mid_part = name[start - 1] != "."
    if cut_mid_part and 0 <= dot < len(tail) - 1 and len(tail) - dot - 1 >= width // 2:
        tail = tail[dot + 1:]  # start at a whole part: …layers.3.q_proj, not …ers.3.q_proj
    return ELLIPSIS + tail


def finite_or_lowest(value: float | None) -> float:
    """A rank for `--top`: NaN and missing values rank last."""
    return value if value is not None and math.isfinite(value) else -math.inf


def print_layer_table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    optional: Sequence[str] = (),
    top: int | None = None,
    rank: Callable[[int], float] | None = None,
    ranked_by: str = "",
    summary: str = "",
) -> None:
    """Print rows whose first cell is a layer name.

    `optional` headers are hidden, last first, while the names would get fewer than
    NAME_WIDTH_WANTED characters. With `top`, only the `top` rows of highest `rank(row index)`
    show, largest first. `summary` follows the table.
    """
    order = list(range(len(rows)))
    if top is not None and rank is not None:
        order = sorted(order, key=rank, reverse=True)[:top]
    shown = [rows[i] for i in order]
    widths = {h: max([len(h)] + [len(row[c]) for row in shown]) + CELL_PADDING
              for c, h in enumerate(headers)}
    longest = max((len(row[0]) for row in shown), default=0)
    kept = list(headers)
    hidden = []

    def name_width() -> int:
        return console.width - sum(widths[h] for h in kept[1:]) - CELL_PADDING - TABLE_EDGES

    for header in reversed(optional):
        if name_width() >= min(longest, NAME_WIDTH_WANTED):
            break
        kept.remove(header)
        hidden.append(header)
    columns = [headers.index(h) for h in kept]
    table = Table(*kept, title=title, box=box.SIMPLE_HEAD)
    table.columns[0].no_wrap = True
    for row in shown:
        table.add_row(shorten_left(row[0], max(name_width(), 12)), *(row[c] for c in columns[1:]))
    console.print(table)
    if len(shown) < len(rows):
        console.print(f"showing the {len(shown)} of {len(rows)} rows with the largest "
                      f"{ranked_by}")
    if hidden:
        console.print(f"hidden at this width: {', '.join(reversed(hidden))} (--output writes "
                      f"every column)")
    if summary:
        console.print(summary)
