"""Lineage: the graph of manifests, walked upstream (what made this?) or downstream.

Nodes are artifacts (by digest) and step runs (by cache key); edges go
input artifact -> step run -> output artifact.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from steps.core.store import ArtifactStore, Manifest, ProducedBy

FORMATS = ("text", "json", "dot", "mermaid", "html", "openlineage")


@dataclass
class Graph:
    root: str
    direction: str
    artifacts: dict[str, Manifest] = field(default_factory=dict)
    steps: dict[str, ProducedBy] = field(default_factory=dict)
    edges: set[tuple[str, str]] = field(default_factory=set)
    store_url: str = ""  # the namespace of the artifacts (OpenLineage datasets)

    def add_production(self, manifest: Manifest) -> str | None:
        """Add the step run that made `manifest` and its edges; return the step node id."""
        self.artifacts[manifest.digest] = manifest
        made = manifest.produced_by
        if made is None:
            return None
        step_id = step_node_id(made)
        self.steps.setdefault(step_id, made)
        self.edges.add((step_id, manifest.digest))
        for digest in made.inputs.values():
            self.edges.add((digest, step_id))
        return step_id


def step_node_id(made: ProducedBy) -> str:
    return f"step:{made.cache_key or made.mlflow_run_id or made.step}"


def upstream(store: ArtifactStore, ref: str) -> Graph:
    """Everything that went into `ref`: producing steps, their params and inputs, to the sources."""
    root = store.stat(ref)
    graph = Graph(root.digest, "upstream", store_url=store.url)
    queue = deque([root])
    while queue:
        manifest = queue.popleft()
        if manifest.digest in graph.artifacts:
            continue
        graph.add_production(manifest)
        if manifest.produced_by:
            queue.extend(store.stat(d) for d in manifest.produced_by.inputs.values()
                         if d not in graph.artifacts)
    return graph


def upstream_of_all(store: ArtifactStore, refs: list[str]) -> Graph:
    """One graph of everything that went into any of `refs` (e.g. a flow run's outputs)."""
    graph = Graph(store.resolve(refs[0]), "upstream", store_url=store.url)
    for ref in refs:
        part = upstream(store, ref)
        graph.artifacts |= part.artifacts
        graph.steps |= part.steps
        graph.edges |= part.edges
    return graph


def downstream(store: ArtifactStore, ref: str) -> Graph:
    """Everything built from `ref`, directly or through other artifacts."""
    root = store.stat(ref)
    consumers: dict[str, list[Manifest]] = defaultdict(list)
    for manifest in store.list():
        if manifest.produced_by:
            for digest in set(manifest.produced_by.inputs.values()):
                consumers[digest].append(manifest)
    graph = Graph(root.digest, "downstream", store_url=store.url)
    graph.artifacts[root.digest] = root
    queue = deque([root.digest])
    seen = {root.digest}
    while queue:
        for product in consumers.get(queue.popleft(), []):
            graph.add_production(product)
            if product.digest not in seen:
                seen.add(product.digest)
                queue.append(product.digest)
    # A consumer's other inputs belong in the picture too (e.g. the calibration data).
    for made in graph.steps.values():
        for digest in made.inputs.values():
            if digest not in graph.artifacts:
                graph.artifacts[digest] = store.stat(digest)
    return graph


def short(digest: str) -> str:
    return digest[:12]


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(params.items()))


def artifact_label(m: Manifest) -> str:
    return f"{m.kind} {m.name or ''} ({human_size(m.size)})".replace("  ", " ")


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def to_json(graph: Graph) -> dict[str, Any]:
    return {
        "root": graph.root,
        "direction": graph.direction,
        "artifacts": [m.model_dump(mode="json", by_alias=True, exclude={"files"})
                      | {"files": len(m.files) if m.files is not None else None}
                      for m in graph.artifacts.values()],
        "steps": [{"id": sid} | made.model_dump(mode="json") for sid, made in graph.steps.items()],
        "edges": [{"from": a, "to": b} for a, b in sorted(graph.edges)],
    }


def to_text(graph: Graph) -> str:
    """An indented tree: each artifact, the step that made it, that step's inputs, and so on."""
    lines: list[str] = []
    if graph.direction == "upstream":
        _text_upstream(graph, graph.root, 0, lines, set())
    else:
        _text_downstream(graph, graph.root, 0, lines, set())
    return "\n".join(lines)


def _step_lines(made: ProducedBy, pad: str) -> list[str]:
    lines = [f"{pad}made by step {made.step} v{made.step_version}"
             f"  params: {params_text(made.params) or '-'}"]
    where = [f"{k}: {v}" for k, v in (("flow run", made.flow_run_id),
                                      ("mlflow run", made.mlflow_run_id),
                                      ("git", made.git_revision),
                                      ("image", made.container_image),
                                      ("at", made.ended_at)) if v]
    if where:
        lines.append(f"{pad}  " + "  ".join(where))
    return lines


def _text_upstream(graph: Graph, digest: str, depth: int, lines: list[str], seen: set) -> None:
    pad = "    " * depth
    manifest = graph.artifacts[digest]
    lines.append(f"{pad}{short(digest)}  {artifact_label(manifest)}")
    if digest in seen:
        lines.append(f"{pad}  (shown above)")
        return
    seen.add(digest)
    made = manifest.produced_by
    if made is None:
        lines.append(f"{pad}  source artifact (stored by hand, no producing step)")
        return
    lines.extend(_step_lines(made, pad + "  "))
    for name, input_digest in sorted(made.inputs.items()):
        lines.append(f"{pad}  input {name}:")
        _text_upstream(graph, input_digest, depth + 1, lines, seen)


def _text_downstream(graph: Graph, digest: str, depth: int, lines: list[str], seen: set) -> None:
    pad = "    " * depth
    lines.append(f"{pad}{short(digest)}  {artifact_label(graph.artifacts[digest])}")
    if digest in seen:
        return
    seen.add(digest)
    for step_id in sorted(b for a, b in graph.edges if a == digest):
        made = graph.steps[step_id]
        lines.extend(_step_lines(made, pad + "  -> "))
        for product in sorted(b for a, b in graph.edges if a == step_id):
            _text_downstream(graph, product, depth + 1, lines, seen)


def to_dot(graph: Graph) -> str:
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for digest, m in sorted(graph.artifacts.items()):
        shape = "doubleoctagon" if digest == graph.root else "box"
        lines.append(f'  "{digest}" [shape={shape}, label="{short(digest)}\\n'
                     f'{_escape(artifact_label(m))}"];')
    for step_id, made in sorted(graph.steps.items()):
        lines.append(f'  "{step_id}" [shape=ellipse, style=filled, fillcolor="#dde8f7", '
                     f'label="{made.step} v{made.step_version}\\n'
                     f'{_escape(params_text(made.params))}"];')
    lines.extend(f'  "{a}" -> "{b}";' for a, b in sorted(graph.edges))
    lines.append("}")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_mermaid(graph: Graph) -> str:
    ids = {node: f"n{i}" for i, node in enumerate(sorted(graph.artifacts) + sorted(graph.steps))}
    lines = ["flowchart LR"]
    for digest, m in sorted(graph.artifacts.items()):
        lines.append(f'  {ids[digest]}["{short(digest)}<br/>{_mermaid(artifact_label(m))}"]')
    for step_id, made in sorted(graph.steps.items()):
        lines.append(f'  {ids[step_id]}(["{made.step} v{made.step_version}<br/>'
                     f'{_mermaid(params_text(made.params))}"])')
    lines.extend(f"  {ids[a]} --> {ids[b]}" for a, b in sorted(graph.edges))
    return "\n".join(lines)


def _mermaid(text: str) -> str:
    return text.replace('"', "#quot;")


def columns(graph: Graph) -> list[list[str]]:
    """Nodes by depth: sources in column 0, each node one right of its deepest input."""
    incoming: dict[str, list[str]] = defaultdict(list)
    for a, b in graph.edges:
        incoming[b].append(a)
    depth: dict[str, int] = {}

    def depth_of(node: str) -> int:
        if node not in depth:
            depth[node] = 1 + max((depth_of(a) for a in incoming[node]), default=-1)
        return depth[node]

    nodes = sorted(graph.artifacts) + sorted(graph.steps)
    layout: list[list[str]] = [[] for _ in range(1 + max(map(depth_of, nodes)))]
    for node in nodes:
        layout[depth[node]].append(node)
    return layout


def to_html(graph: Graph) -> str:
    """A self-contained page (inline SVG, no scripts) that draws the graph."""
    from html import escape

    width, height, gap_x, gap_y = 230, 64, 70, 26
    layout = columns(graph)
    where = {node: (20 + c * (width + gap_x), 20 + r * (height + gap_y))
             for c, column in enumerate(layout) for r, node in enumerate(column)}
    svg_w = 40 + len(layout) * (width + gap_x)
    svg_h = 40 + max(len(c) for c in layout) * (height + gap_y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{svg_w}" height="{svg_h}">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
             'markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" '
             'fill="#555"/></marker></defs>']
    for a, b in sorted(graph.edges):
        (x1, y1), (x2, y2) = where[a], where[b]
        parts.append(f'<line x1="{x1 + width}" y1="{y1 + height / 2}" x2="{x2}" '
                     f'y2="{y2 + height / 2}" stroke="#555" marker-end="url(#arrow)"/>')
    for node, (x, y) in where.items():
        if node in graph.steps:
            made = graph.steps[node]
            title, detail, fill = f"{made.step} v{made.step_version}", \
                params_text(made.params), "#dde8f7"
        else:
            title, detail = short(node), artifact_label(graph.artifacts[node])
            fill = "#fde9c8" if node == graph.root else "#f4f4f4"
        parts.append(f'<g class="node" id="{escape(node)}"><title>{escape(node)}</title>'
                     f'<rect x="{x}" y="{y}" width="{width}" height="{height}" rx="8" '
                     f'fill="{fill}" stroke="#888"/>'
                     f'<text x="{x + 10}" y="{y + 24}" font-weight="bold">{escape(title)}</text>'
                     f'<text x="{x + 10}" y="{y + 46}" font-size="11">'
                     f'{escape(detail[:36])}</text></g>')
    parts.append("</svg>")
    rows = "".join(
        f"<tr><td>{escape(m.step)} v{escape(m.step_version)}</td>"
        f"<td><code>{escape(params_text(m.params))}</code></td>"
        f"<td>{'<br>'.join(f'{escape(k)}: <code>{v}</code>' for k, v in m.inputs.items())}</td>"
        f"<td>{escape(m.flow_run_id or '-')}</td><td>{escape(m.mlflow_run_id or '-')}</td>"
        f"<td>{escape(m.git_revision or '-')}</td></tr>"
        for m in graph.steps.values())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lineage of "
            f"{short(graph.root)}</title><style>body{{font-family:sans-serif;margin:20px}}"
            f"td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}"
            f"table{{border-collapse:collapse}}</style></head><body>"
            f"<h1>{graph.direction} lineage of {short(graph.root)}</h1>{''.join(parts)}"
            f"<h2>Steps</h2><table><tr><th>step</th><th>params</th><th>inputs</th>"
            f"<th>flow run</th><th>MLflow run</th><th>git</th></tr>{rows}</table>"
            f"</body></html>")


def render(graph: Graph, fmt: str, namespace: str | None = None) -> str:
    """The graph in one of FORMATS (`namespace`: OpenLineage's job namespace)."""
    if fmt == "json":
        return json.dumps(to_json(graph), indent=2)
    if fmt == "openlineage":
        from steps.core.openlineage import default_namespace, graph_events, to_json_lines

        return to_json_lines(graph_events(graph, namespace or default_namespace()))
    return {"text": to_text, "dot": to_dot, "mermaid": to_mermaid, "html": to_html}[fmt](graph)
