"""The lineage graph as one self-contained HTML page: a layered drawing, top to bottom.

Layout (Sugiyama's layered drawing, kept small): each node sits one layer below its
deepest input; an edge that skips layers goes through a placeholder in each layer between,
so every edge runs only through the gaps between layers and never through a box; the
order inside each layer is improved by a few barycentre sweeps (fewer crossings), and each
layer is centred. Boxes show short labels; hovering a box shows its full text (CSS, no
script). An evaluation's key metric (perplexity or accuracy) is written on its box.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steps.core.lineage import Graph

BOX_W, BOX_H, GAP_X, GAP_Y, LANE_W, MARGIN = 210, 62, 24, 56, 16, 20
TIP_ROOM = 80  # below the last layer, for the full text of its boxes
CHARS = 30  # what fits on a line of a box at 11-12 px
SWEEPS = 4


@dataclass(frozen=True)
class Box:
    """A node's label: title, detail and, where there is one, a highlighted note; `full`:
    the uncut text shown on hover."""

    title: str
    detail: str
    note: str | None
    fill: str
    full: tuple[str, ...]


def layers(graph: Graph) -> dict[str, int]:
    """Each node's layer: sources at 0, each node one below its deepest input."""
    incoming: dict[str, list[str]] = defaultdict(list)
    for a, b in graph.edges:
        incoming[b].append(a)
    depth: dict[str, int] = {}

    def depth_of(node: str) -> int:
        if node not in depth:
            depth[node] = 1 + max((depth_of(a) for a in incoming[node]), default=-1)
        return depth[node]

    for node in [*sorted(graph.artifacts), *sorted(graph.steps)]:
        depth_of(node)
    return depth


def routed(graph: Graph, layer: dict[str, int]) -> tuple[list[list[str]], list[list[str]]]:
    """Nodes per layer (placeholders included) and each edge as its chain of nodes."""
    rows: list[list[str]] = [[] for _ in range(1 + max(layer.values(), default=0))]
    for node in sorted(layer, key=lambda n: (layer[n], n)):
        rows[layer[node]].append(node)
    chains = []
    for a, b in sorted(graph.edges):
        chain = [a]
        for depth in range(layer[a] + 1, layer[b]):
            lane = f"lane:{a}>{b}:{depth}"
            rows[depth].append(lane)
            chain.append(lane)
        chains.append([*chain, b])
    return rows, chains


def order(rows: list[list[str]], chains: list[list[str]]) -> list[list[str]]:
    """Barycentre sweeps, down then up: each node moves toward its neighbours' mean place."""
    above: dict[str, list[str]] = defaultdict(list)
    below: dict[str, list[str]] = defaultdict(list)
    for chain in chains:
        for a, b in zip(chain, chain[1:], strict=False):
            below[a].append(b)
            above[b].append(a)
    rows = [list(row) for row in rows]
    for sweep in range(SWEEPS):
        if sweep % 2 == 0:
            for i in range(1, len(rows)):
                rows[i] = by_barycentre(rows[i], rows[i - 1], above)
        else:
            for i in range(len(rows) - 2, -1, -1):
                rows[i] = by_barycentre(rows[i], rows[i + 1], below)
    return rows


def by_barycentre(row: list[str], reference: list[str],
                  neighbours: dict[str, list[str]]) -> list[str]:
    """`row` sorted by the mean place of each node's neighbours in the reference layer
    (a node without any keeps its place)."""
    place = {n: k for k, n in enumerate(reference)}
    current = {n: k for k, n in enumerate(row)}

    def centre(node: str) -> float:
        seen = [place[n] for n in neighbours[node] if n in place]
        return sum(seen) / len(seen) if seen else current[node]

    return sorted(row, key=lambda n: (centre(n), current[n]))


def positions(rows: list[list[str]]) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Top-left corner of each box (a placeholder: its centre line), and the page size."""
    def width(node: str) -> int:
        return LANE_W if node.startswith("lane:") else BOX_W

    row_widths = [sum(width(n) + GAP_X for n in row) - GAP_X for row in rows]
    page_w = max(row_widths, default=0) + 2 * MARGIN
    where: dict[str, tuple[float, float]] = {}
    for i, row in enumerate(rows):
        x = MARGIN + (page_w - 2 * MARGIN - row_widths[i]) / 2
        y = MARGIN + i * (BOX_H + GAP_Y)
        for node in row:
            where[node] = (x, y)
            x += width(node) + GAP_X
    return where, page_w, MARGIN * 2 + len(rows) * (BOX_H + GAP_Y) - GAP_Y


def edge_path(chain: list[str], where: dict[str, tuple[float, float]]) -> str:
    """A smooth path from the bottom of the producer to the top of the consumer."""
    points = []
    for k, node in enumerate(chain):
        x, y = where[node]
        centre = x + (LANE_W if node.startswith("lane:") else BOX_W) / 2
        if node.startswith("lane:"):
            points += [(centre, y), (centre, y + BOX_H)]
        else:
            points.append((centre, y + BOX_H if k == 0 else y))
    path = [f"M{points[0][0]:.1f},{points[0][1]:.1f}"]
    for (x1, y1), (x2, y2) in zip(points, points[1:], strict=False):
        bend = (y2 - y1) / 2
        path.append(f"C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}")
    return "".join(path)


def cut(text: str, limit: int = CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def box_svg(node: str, box: Box, x: float, y: float) -> str:
    lines = box.full
    tip_w = max(BOX_W, 7 * max(len(line) for line in lines) + 20)
    tip = "".join(f'<text x="{x + 10}" y="{y + BOX_H + 22 + 16 * k}">{escape(line)}</text>'
                  for k, line in enumerate(lines))
    note = (f'<text x="{x + 10}" y="{y + 54}" class="note">{escape(cut(box.note))}</text>'
            if box.note else "")
    return (f'<g class="node" id="{escape(node)}"><title>{escape(node)}</title>'
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{box.fill}" '
            f'stroke="#888"/>'
            f'<text x="{x + 10}" y="{y + 20}" font-weight="bold">{escape(cut(box.title))}</text>'
            f'<text x="{x + 10}" y="{y + 37}" font-size="11">{escape(cut(box.detail, 34))}</text>'
            f'{note}<g class="tip"><rect x="{x}" y="{y + BOX_H + 6}" width="{tip_w}" '
            f'height="{16 * len(lines) + 12}" rx="4"/>{tip}</g></g>')


STYLE = ("svg{overflow:visible}svg text{font-family:sans-serif;font-size:12px}"
         ".node .tip{visibility:hidden}.node:hover .tip{visibility:visible}"
         ".tip rect{fill:#fffbe6;stroke:#b59f3b}.tip text{font-size:12px}"
         ".note{font-weight:bold;fill:#8a2b00}.edge{fill:none;stroke:#555}")


def svg(graph: Graph, boxes: dict[str, Box]) -> str:
    rows, chains = routed(graph, layers(graph))
    rows = order(rows, chains)
    where, page_w, page_h = positions(rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{page_w:.0f}" '
             f'height="{page_h + TIP_ROOM:.0f}">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
             'markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" fill="#555"/></marker>'
             '</defs>']
    parts += [f'<path class="edge" data-from="{escape(chain[0])}" data-to="{escape(chain[-1])}" '
              f'd="{edge_path(chain, where)}" marker-end="url(#arrow)"/>' for chain in chains]
    # Boxes after edges, and upper layers after lower ones: a box's full text, shown below it
    # on hover, then lies over everything it covers.
    parts += [box_svg(node, boxes[node], *where[node]) for row in reversed(rows)
              for node in row if not node.startswith("lane:")]
    parts.append("</svg>")
    return "".join(parts)
