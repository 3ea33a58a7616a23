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
    notes: dict[str, str] = field(default_factory=dict)  # e.g. an evaluation's perplexity

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


def flow_of(made: ProducedBy) -> str:
    """The flow run that made it: `name id`, either part when known, or ''."""
    return " ".join(v for v in (made.flow_name, made.flow_run_id) if v)


def _step_lines(made: ProducedBy, pad: str) -> list[str]:
    lines = [f"{pad}made by step {made.step} v{made.step_version}"
             f"  params: {params_text(made.params) or '-'}"]
    where = [f"{k}: {v}" for k, v in (("flow run", flow_of(made)),
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
        origin = manifest.source or {}
        lines.append(f"{pad}  source artifact from the Hub: {origin['hub']} at commit "
                     f"{origin['revision']} ({origin.get('requested_revision')})"
                     if "hub" in origin else
                     f"{pad}  source artifact (stored by hand, no producing step)")
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


def to_html(graph: Graph) -> str:
    """A self-contained page (inline SVG and CSS, no scripts): the graph, then a step table."""
    from html import escape

    from steps.core.lineage_html import STYLE, Box, svg

    boxes = {step_id: Box(f"{made.step} v{made.step_version}", params_text(made.params) or "-",
                          None, "#dde8f7", (f"step {made.step} v{made.step_version}",
                                            *[f"{k}={json.dumps(v)}"
                                              for k, v in sorted(made.params.items())]))
             for step_id, made in graph.steps.items()}
    for digest, m in graph.artifacts.items():
        note = graph.notes.get(digest)
        detail = f"{m.name or ''} ({human_size(m.size)})"
        boxes[digest] = Box(f"{short(digest)} {m.kind}", detail, note,
                            "#fde9c8" if digest == graph.root else "#f4f4f4",
                            (digest, f"{m.kind}: {detail}", *([note] if note else [])))
    rows = "".join(
        f"<tr><td>{escape(m.step)} v{escape(m.step_version)}</td>"
        f"<td><code>{escape(params_text(m.params))}</code></td>"
        f"<td>{'<br>'.join(f'{escape(k)}: <code>{v}</code>' for k, v in m.inputs.items())}</td>"
        f"<td>{escape(flow_of(m) or '-')}</td>"
        f"<td>{escape(m.mlflow_run_id or '-')}</td>"
        f"<td>{escape(m.git_revision or '-')}</td></tr>"
        for m in graph.steps.values())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lineage of "
            f"{short(graph.root)}</title><style>body{{font-family:sans-serif;margin:20px}}"
            f"td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}"
            f"table{{border-collapse:collapse}}{STYLE}</style></head><body>"
            f"<h1>{graph.direction} lineage of {short(graph.root)}</h1>{svg(graph, boxes)}"
            f"<h2>Steps</h2><table><tr><th>step</th><th>params</th><th>inputs</th>"
            f"<th>flow run</th><th>MLflow run</th><th>git</th></tr>{rows}</table>"
            f"</body></html>")


KEY_METRICS = ("perplexity", "accuracy")


def annotate_metrics(store: ArtifactStore, graph: Graph) -> Graph:
    """Note each evaluation's key metric (perplexity or accuracy) for its box."""
    import tempfile

    import pyarrow.parquet as pq

    for digest, m in graph.artifacts.items():
        if m.kind != "evaluation" or m.is_dir:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            row = pq.read_table(store.get(digest, f"{scratch}/evaluation.parquet")).to_pylist()
        values = [(name, row[0].get(name)) for name in KEY_METRICS if row]
        found = [(name, value) for name, value in values if isinstance(value, int | float)]
        if found:
            graph.notes[digest] = f"{found[0][0]} {found[0][1]:.4g}"
    return graph


def render(graph: Graph, fmt: str, namespace: str | None = None) -> str:
    """The graph in one of FORMATS (`namespace`: OpenLineage's job namespace)."""
    if fmt == "json":
        return json.dumps(to_json(graph), indent=2)
    if fmt == "openlineage":
        from steps.core.openlineage import default_namespace, graph_events, to_json_lines

        return to_json_lines(graph_events(graph, namespace or default_namespace()))
    return {"text": to_text, "dot": to_dot, "mermaid": to_mermaid, "html": to_html}[fmt](graph)
