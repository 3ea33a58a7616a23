"""Lineage of a two-step chain (text -> shout -> count), in every format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from toy_steps import COUNT, SHOUT, CountParams

from steps.core.lineage import downstream, render, upstream
from steps.core.step import Output, Step, run_step
from steps.core.store import open_store


@pytest.fixture
def chain(tmp_path):
    store = open_store(str(tmp_path / "store"))
    source = tmp_path / "in.txt"
    source.write_text("to be or not to be\n")
    text = store.put(source, "text").digest
    loud = run_step(SHOUT, {"times": 2}, {"text": text}, store=store).digests()["loud"]
    count = run_step(COUNT, {"min_length": 2}, {"text": loud}, store=store).digests()["count"]
    return store, text, loud, count


def test_upstream_walks_back_to_the_source(chain):
    store, text, loud, count = chain
    graph = upstream(store, count[:8])
    assert set(graph.artifacts) == {text, loud, count}
    assert sorted(made.step for made in graph.steps.values()) == ["count", "shout"]
    shout_id = next(k for k, v in graph.steps.items() if v.step == "shout")
    count_id = next(k for k, v in graph.steps.items() if v.step == "count")
    assert graph.edges == {(text, shout_id), (shout_id, loud), (loud, count_id),
                           (count_id, count)}


def test_downstream_finds_everything_built_from_the_source(chain):
    store, text, loud, count = chain
    graph = downstream(store, text)
    assert set(graph.artifacts) == {text, loud, count}
    assert len(graph.edges) == 4
    assert downstream(store, count).edges == set()


def test_json_format(chain):
    store, text, loud, count = chain
    data = json.loads(render(upstream(store, count), "json"))
    assert data["root"] == count and data["direction"] == "upstream"
    assert {a["digest"] for a in data["artifacts"]} == {text, loud, count}
    steps = {s["step"]: s for s in data["steps"]}
    assert steps["shout"]["params"] == {"times": 2} and steps["shout"]["inputs"] == {"text": text}
    assert steps["count"]["inputs"] == {"text": loud}
    assert len(data["edges"]) == 4


def test_text_format_reads_as_a_tree(chain):
    store, text, loud, count = chain
    lines = render(upstream(store, count), "text").splitlines()
    assert lines[0].startswith(count[:12]) and "table" in lines[0]
    assert "made by step count v1  params: min_length=2" in lines[1]
    body = "\n".join(lines)
    assert f"input text:\n    {loud[:12]}" in body
    assert "made by step shout v1  params: times=2" in body
    assert body.rstrip().endswith("source artifact (stored by hand, no producing step)")
    down = render(downstream(store, text), "text")
    assert down.index("shout") < down.index("count")


def test_dot_format(chain):
    store, text, loud, count = chain
    dot = render(upstream(store, count), "dot")
    assert dot.startswith("digraph lineage {") and dot.endswith("}")
    assert dot.count(" -> ") == 4 and f'"{text}" -> "step:' in dot
    assert 'label="shout v1\\ntimes=2"' in dot
    dot_bin = subprocess.run(["which", "dot"], capture_output=True).stdout.strip()
    if dot_bin:  # graphviz, where installed, must accept it
        assert subprocess.run([dot_bin, "-Tsvg"], input=dot.encode(),
                              capture_output=True).returncode == 0


def test_mermaid_format(chain):
    store, text, loud, count = chain
    lines = render(upstream(store, count), "mermaid").splitlines()
    assert lines[0] == "flowchart LR"
    assert sum("-->" in line for line in lines) == 4
    assert any(line.strip().startswith("n") and "shout v1" in line for line in lines)


def test_html_format_draws_every_node_and_edge(chain):
    store, text, loud, count = chain
    page = render(upstream(store, count), "html")
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert page.count('<g class="node"') == 5 and page.count('<path class="edge"') == 4
    assert f'id="{count}"' in page and "shout v1" in page and "times=2" in page


def test_cache_cli_lists_and_evicts(chain):
    store, text, loud, count = chain
    cli = [sys.executable, "-m", "tailwise_cli", "cache"]
    where = ["--store", store.url[len("file://"):]]
    listed = subprocess.run(cli + ["ls", *where], capture_output=True, text=True)
    assert listed.returncode == 0 and "shout" in listed.stdout and "count" in listed.stdout
    evicted = subprocess.run(cli + ["rm", "--step", "shout", *where], capture_output=True,
                             text=True)
    assert evicted.returncode == 0 and "evicted 1 cache entry" in evicted.stdout
    assert [entry["step"] for _, entry in store.cache_entries()] == ["count"]
    assert store.exists(loud)  # evicting a cache entry keeps the artifact


def test_lineage_cli(chain, tmp_path):
    store, text, loud, count = chain
    cli = [sys.executable, "-m", "tailwise_cli", "lineage", "--store", store.url[len("file://"):]]
    for fmt in ("text", "json", "dot", "mermaid", "html"):
        done = subprocess.run(cli + [count[:12], "--format", fmt], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "shout" in done.stdout and "count" in done.stdout
    down = subprocess.run(cli + [text, "--downstream"], capture_output=True, text=True)
    assert down.returncode == 0 and count[:12] in down.stdout
    missing = subprocess.run(cli + ["0123456789ab"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no artifact")
    assert "Traceback" not in missing.stderr
    bad = subprocess.run(cli + [count, "--format", "png"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--format 'png'" in bad.stderr


def pair(ctx, params, inputs):
    out = ctx.workdir / "pair.txt"
    out.write_text(inputs["a"].read_text() + inputs["b"].read_text())
    return {"pair": Output(out, "evaluation")}


PAIR = Step("pair", "1", CountParams, ("a", "b"), pair)


def test_html_layers_route_edges_around_boxes(chain):
    """An input from far up (the source text into `pair`, beside the loud text) runs through
    the gaps between layers, never through a box; every layer's boxes are apart."""
    from steps.core.lineage_html import BOX_W, LANE_W, layers, order, positions, routed

    store, text, loud, count = chain
    joined = run_step(PAIR, {}, {"a": text, "b": count}, store=store).digests()["pair"]
    graph = upstream(store, joined)
    layer = layers(graph)
    rows, chains = routed(graph, layer)
    rows = order(rows, chains)
    where, width, _ = positions(rows)
    depth = {node: i for i, row in enumerate(rows) for node in row}
    skipping = [c for c in chains if c[0] == text and c[-1].startswith("step:")
                and graph.steps[c[-1]].step == "pair"]
    assert len(skipping) == 1 and len(skipping[0]) == 2 + layer[skipping[0][-1]] - 1
    for edge in chains:  # each hop goes one layer down: it only crosses a gap
        assert [depth[n] for n in edge] == list(range(depth[edge[0]], depth[edge[-1]] + 1))
    for row in rows:
        spans = sorted((where[n][0], where[n][0] + (LANE_W if n.startswith("lane:") else BOX_W))
                       for n in row)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert width < 3 * (BOX_W + 40)


def test_html_shows_full_labels_on_hover_and_an_evaluation_metric(chain, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steps.core.lineage import annotate_metrics
    from steps.core.store import ProducedBy

    store, text, loud, count = chain
    table = tmp_path / "evaluation.parquet"
    pq.write_table(pa.table({"perplexity": [191.25], "sparsity": [0.7]}), table)
    made = ProducedBy(step="evaluate", step_version="1", inputs={"model": loud},
                      params={"seqlen": 2048, "text": "a very long parameter value " * 3})
    evaluation = store.put(table, "evaluation", produced_by=made).digest
    page = render(annotate_metrics(store, upstream(store, evaluation)), "html")
    assert ">perplexity 191.2<" in page  # the key metric on the evaluation's box
    assert 'class="tip"' in page and ".node:hover .tip{visibility:visible}" in page
    assert f">{evaluation}<" in page  # the full digest, on hover
    assert "a very long parameter value a very long parameter value" in page
    assert "<script" not in page
