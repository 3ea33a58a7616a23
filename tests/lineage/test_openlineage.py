"""OpenLineage: exported events validate against the spec; a flow sends them live to a real
HTTP receiver; with the endpoint down the flow completes, warns once and keeps the events
for `tailwise lineage resend`. The same flow shows settings.recompute_stale at work."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
from cli import tailwise
from lineage_chain import COUNT, toy_flow
from prefect import flow
from referencing import Registry, Resource

from flows.common import RunSettings, flow_run_context
from steps.core.lineage import render, upstream
from steps.core.lineage_stale import find_stale
from steps.core.store import open_store

SPEC = Path(__file__).parent / "data"
PARENT_SCHEMA = "https://openlineage.io/spec/facets/1-2-0/ParentRunFacet.json#/$defs/ParentRunFacet"


@pytest.fixture(scope="module")
def validate():
    """Validate a RunEvent, and each standard facet in it, against the spec files."""
    documents = {p.stem: json.loads(p.read_text()) for p in SPEC.glob("*.json")}
    registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in documents.values())
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER

    def check(event: dict) -> None:
        url = documents["OpenLineage"]["$id"] + "#/$defs/RunEvent"
        assert event["schemaURL"] == url
        jsonschema.Draft202012Validator({"$ref": url}, registry=registry,
                                        format_checker=checker).validate(event)
        facets = [event["job"]["facets"]["jobType"], *event["run"]["facets"].values()] + [
            f for d in event["inputs"] + event["outputs"] for f in d["facets"].values()]
        for facet in facets:
            if facet["_schemaURL"].startswith("https://openlineage.io/"):
                jsonschema.Draft202012Validator({"$ref": facet["_schemaURL"]},
                                                registry=registry).validate(facet)

    return check


def test_exported_events_validate_and_describe_each_step_run(local_chain, validate):
    graph = upstream(local_chain.store, local_chain.count)
    events = [json.loads(line) for line in render(graph, "openlineage", "audit").splitlines()]
    for event in events:
        validate(event)
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("shout", "START"), ("shout", "COMPLETE"), ("count", "START"), ("count", "COMPLETE")]
    shout_start, shout_done, _, count_done = events
    assert {e["job"]["namespace"] for e in events} == {"audit"}
    assert shout_start["run"]["runId"] == shout_done["run"]["runId"]
    uuid.UUID(shout_start["run"]["runId"])
    assert [d["name"] for d in shout_done["inputs"]] == [local_chain.text]
    assert [d["name"] for d in shout_done["outputs"]] == [local_chain.loud]
    assert [d["name"] for d in count_done["outputs"]] == [local_chain.count]
    artifact = count_done["outputs"][0]["facets"]["tailwise_artifact"]
    assert artifact == artifact | {"kind": "table", "mediaType": "application/json"}
    assert artifact["size"] == local_chain.store.stat(local_chain.count).size
    assert shout_done["run"]["facets"]["tailwise_step"]["params"] == {"times": 2}
    assert {d["namespace"] for d in shout_done["inputs"]} == {local_chain.store.url}


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def receiver() -> Iterator[tuple[str, list[dict]]]:
    """An OpenLineage HTTP endpoint on 127.0.0.1 that keeps what it is sent."""
    handler = type("Handler", (Receiver,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler.received
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    port = server.server_port
    server.server_close()
    return f"http://127.0.0.1:{port}"


def test_flow_sends_events_live_and_keeps_them_when_the_endpoint_is_down(
        tmp_path, source, toy_registry, validate, prefect_api, monkeypatch, caplog, capsys):
    unsent = tmp_path / "unsent.jsonl"
    monkeypatch.setenv("TAILWISE_OPENLINEAGE_UNSENT", str(unsent))
    with receiver() as (url, received):
        monkeypatch.setenv("OPENLINEAGE_URL", url)
        made = toy_flow(source, RunSettings(store=str(tmp_path / "a"), tracking=False,
                                            openlineage_namespace="live"))
    # START and COMPLETE of the flow run around those of each of its 3 computed step runs.
    assert len(received) == 8
    for event in received:
        validate(event)
    flow_start, *steps, flow_done = received
    made_by = open_store(str(tmp_path / "a")).stat(made["count"]).produced_by
    assert [(e["eventType"], e["job"]["name"], e["run"]["runId"]) for e in (flow_start, flow_done)
            ] == [("START", "toy-flow", made_by.flow_run_id), ("COMPLETE", "toy-flow",
                                                              made_by.flow_run_id)]
    assert flow_done["job"]["facets"]["jobType"]["jobType"] == "FLOW"
    done = {e["job"]["name"] + str(e["run"]["facets"]["tailwise_step"]["params"]): e
            for e in steps if e["eventType"] == "COMPLETE"}
    assert [d["name"] for d in done["count{'min_length': 2}"]["inputs"]] == [made["loud"]]
    assert [d["name"] for d in done["shout{'times': 3}"]["outputs"]] == [made["other"]]
    assert {e["job"]["namespace"] for e in received} == {"live"}
    # Each step run names the flow run as its parent: the Prefect flow and its run id.
    assert made_by.flow_name == "toy-flow"
    assert [e["run"]["facets"]["parent"] for e in steps] == [
        {"_producer": received[0]["producer"], "_schemaURL": PARENT_SCHEMA,
         "job": {"namespace": "live", "name": "toy-flow", "facets": {}},
         "run": {"runId": made_by.flow_run_id, "facets": {}}}] * 6
    exported = render(upstream(open_store(str(tmp_path / "a")), made["count"]), "openlineage",
                      "live").splitlines()
    assert [json.loads(line)["run"]["facets"]["parent"] for line in exported] == [
        steps[0]["run"]["facets"]["parent"]] * 4  # shout and count, START and COMPLETE
    # Endpoint down (no retries configured): the flow completes, one warning, nothing lost.
    monkeypatch.delenv("OPENLINEAGE_URL")
    for key, value in {"TYPE": "http", "URL": closed_port_url(),
                       "RETRY": '{"total": 0, "connect": 0, "read": 0}'}.items():
        monkeypatch.setenv(f"OPENLINEAGE__TRANSPORT__{key}", value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tailwise.openlineage"):
        again = toy_flow(source, RunSettings(store=str(tmp_path / "b"), tracking=False))
    assert again == made  # same content, same digests
    warnings = [r for r in caplog.records if r.name == "tailwise.openlineage"]
    assert len(warnings) == 1 and "tailwise lineage resend" in warnings[0].getMessage()
    assert len(unsent.read_text().splitlines()) == 8
    for key in ("TYPE", "URL", "RETRY"):
        monkeypatch.delenv(f"OPENLINEAGE__TRANSPORT__{key}")
    with receiver() as (url, received):
        monkeypatch.setenv("OPENLINEAGE_URL", url)
        code, out, _ = tailwise(capsys, monkeypatch, "lineage", "resend")
    assert code == 0 and out.strip() == "sent 8 events" and not unsent.exists()
    assert len(received) == 8 and all(validate(e) is None for e in received)


@flow
def failing_flow(settings: RunSettings) -> None:
    with flow_run_context("failing", settings, {}):
        raise ValueError("the flow's body failed")


def test_a_failed_flow_sends_fail(tmp_path, validate, prefect_api, monkeypatch):
    with receiver() as (url, received):
        monkeypatch.setenv("OPENLINEAGE_URL", url)
        with pytest.raises(ValueError, match="body failed"):
            failing_flow(RunSettings(store=str(tmp_path / "s"), tracking=False))
    assert [(e["eventType"], e["job"]["name"]) for e in received] == [
        ("START", "failing-flow"), ("FAIL", "failing-flow")]
    assert received[0]["run"]["runId"] == received[1]["run"]["runId"]
    for event in received:
        validate(event)


def changed_count(tmp_path: Path):
    """COUNT with its code moved to another file: same version, other code revision."""
    module_file = tmp_path / "count_changed.py"
    module_file.write_text("from lineage_chain import count as original\n\n\n"
                           "def count(ctx, params, inputs):\n"
                           "    return original(ctx, params, inputs)\n")
    spec = importlib.util.spec_from_file_location("count_changed", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["count_changed"] = module
    spec.loader.exec_module(module)
    return dataclasses.replace(COUNT, fn=module.count)


def test_recompute_stale_recomputes_exactly_the_stale(tmp_path, source, toy_registry,
                                                      prefect_api, monkeypatch):
    monkeypatch.delenv("OPENLINEAGE_URL", raising=False)
    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    made = toy_flow(source, settings)
    store = open_store(settings.store)
    entries = dict(store.cache_entries())
    toy_registry["count"] = changed_count(tmp_path)
    try:
        assert [s.digest for s in find_stale(store, toy_registry.get)] == [made["count"]]
        assert toy_flow(source, settings) == made  # a plain rerun reuses the stale output
        assert dict(store.cache_entries()) == entries
        rerun = toy_flow(source, settings.model_copy(update={"recompute_stale": True}))
        assert rerun == made  # the same bytes: the new code computes what the old did
        after = dict(store.cache_entries())
        changed = {key for key in entries if after[key] != entries[key]}
        assert [after[key]["step"] for key in changed] == ["count"]  # only count ran again
        assert find_stale(store, toy_registry.get) == []
    finally:
        del sys.modules["count_changed"]


def test_resend_refuses_a_damaged_file_and_needs_an_endpoint(tmp_path, capsys, monkeypatch):
    unsent = tmp_path / "unsent.jsonl"
    unsent.write_text('{"eventType": "START"}\nnot json\n')
    for key in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no openlineage.yml here
    code, _, err = tailwise(capsys, monkeypatch, "lineage", "resend", "--file", str(unsent))
    assert code == 2 and "no OpenLineage endpoint is configured" in err
    monkeypatch.setenv("OPENLINEAGE_URL", closed_port_url())
    code, _, err = tailwise(capsys, monkeypatch, "lineage", "resend", "--file", str(unsent))
    assert code == 2 and f"{unsent} line 2 is not an event" in err
    assert len(unsent.read_text().splitlines()) == 2  # nothing dropped
