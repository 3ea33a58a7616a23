"""`lineage find` over 10,000 synthetic manifests: each filter gives what a plain scan of
the manifests gives, and the index follows manifests that come and go."""

from __future__ import annotations

import json

import pytest
from cli import tailwise

from steps.core.errors import ArtifactNotFound
from steps.core.lineage_index import LineageIndex, Match, Query, since_timestamp
from steps.core.store import open_store
from tailwise_cli.lineage import key_params
from tailwise_dev.synthetic_lineage import synthetic_manifests, write_manifests

COUNT = 10_000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A store of 10,000 manifests, its index built once (in a private cache dir)."""
    root = tmp_path_factory.mktemp("synthetic")
    manifests = synthetic_manifests(COUNT)
    write_manifests(root / "store", manifests)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAILWISE_CACHE_DIR", str(root / "cache"))
        store = open_store(str(root / "store"))
        index = LineageIndex(store)
        assert index.refresh() == COUNT
        yield store, manifests, index
        index.close()


@pytest.fixture
def index(synthetic):
    return synthetic[2]


def downstream_of(manifests, root):
    """Everything built from `root`, by a plain walk over the manifests."""
    consumers = {}
    for m in manifests:
        for digest in set(m.produced_by.inputs.values()) if m.produced_by else ():
            consumers.setdefault(digest, []).append(m.digest)
    found, todo = set(), [root]
    while todo:
        for product in consumers.get(todo.pop(), []):
            if product not in found:
                found.add(product)
                todo.append(product)
    return found


def test_each_filter_matches_a_plain_scan(synthetic, index):
    _, manifests, _ = synthetic
    since = "2026-11-05T00:00:00.000+00:00"
    root = manifests[5 * 10].digest  # the source model of chain 10
    built_from_root = downstream_of(manifests, root)

    def made(m, key, default=None):
        return getattr(m.produced_by, key, default) if m.produced_by else default

    cases = [
        (Query(step="prune"), lambda m: made(m, "step") == "prune"),
        (Query(step="prune", params=(("sparsity", 0.7),), kind="model"),
         lambda m: made(m, "step") == "prune" and m.produced_by.params["sparsity"] == 0.7),
        (Query(params=(("method", "wanda"), ("sparsity", 0.5))),
         lambda m: made(m, "params", {}).get("method") == "wanda"
         and m.produced_by.params["sparsity"] == 0.5),
        (Query(kind="table", since=since), lambda m: m.kind == "table" and m.created_at >= since),
        (Query(git="2222"), lambda m: (made(m, "git_revision") or "").startswith("2222")),
        (Query(produced_from=root[:10]), lambda m: m.digest in built_from_root),
    ]
    for query, wanted in cases:
        expected = {m.digest for m in manifests if wanted(m)}
        total, matches = index.find(query)
        assert total == len(expected) and {m.digest for m in matches} == expected, query
        assert expected, query  # each case selects something
    total, newest = index.find(Query(step="evaluate"), limit=3)
    assert total == COUNT // 5 and [m.created_at for m in newest] == sorted(
        (m.created_at for m in manifests if made(m, "step") == "evaluate"), reverse=True)[:3]
    assert len(built_from_root) == 4


def test_index_follows_the_store(synthetic, index):
    store, manifests, _ = synthetic
    gone = manifests[-1]
    path = store.backend.root / "manifests" / f"{gone.digest}.json"
    path.unlink()
    try:
        assert index.refresh() == COUNT - 1
        assert gone.digest not in {m.digest for m in index.find(Query(step="evaluate"))[1]}
    finally:
        path.write_bytes(gone.to_json())
    assert index.refresh() == COUNT
    with pytest.raises(ArtifactNotFound, match="ambiguous"):
        index.resolve("0")
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        index.resolve("ffffffffffff")


def test_since_takes_dates_and_date_times():
    assert since_timestamp("2026-12-01") == "2026-12-01T00:00:00.000+00:00"
    assert since_timestamp("2026-12-01T02:00:00+02:00") == "2026-12-01T00:00:00.000+00:00"


def test_cli_table_and_json(synthetic, capsys, monkeypatch):
    store, manifests, _ = synthetic  # the CLI finds the index the fixture built
    where = ["--store", str(store.backend.root)]
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "find", "--step", "prune",
                            "--param", "sparsity=0.7", "--kind", "model", "--limit", "5", *where)
    expected = sum(1 for m in manifests if m.produced_by and m.produced_by.step == "prune"
                   and m.produced_by.params["sparsity"] == 0.7)
    assert code == 0 and f"{expected} matches (newest 5 shown)" in out and "sparsity=0.7" in out
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "find", "--since", "2026-11-08",
                            "--format", "json", "--limit", "0", *where)
    report = json.loads(out)
    assert code == 0 and report["total"] == len(report["matches"]) > 0
    assert min(m["created_at"] for m in report["matches"]) >= "2026-11-08"
    code, _, err = tailwise(capsys, monkeypatch, "lineage", "find", "--produced-from", "0",
                            *where)
    assert code == 2 and "at least 4 hex" in err


def test_the_table_shows_the_params_that_tell_each_steps_matches_apart():
    def match(step, **params):
        return Match("0" * 64, "model", None, step, params, "2026-12-01T00:00:00.000+00:00")

    matches = [match("prune", method="wanda", sparsity=0.7, seed=0, options={"nm": None}),
               match("prune", method="magnitude", sparsity=0.7, seed=0, options={"nm": None}),
               match("evaluate", seqlen=128, tasks=[], name="a", quiet=False)]
    shown = key_params(matches, asked=["sparsity"])
    assert shown["prune"] == ["sparsity", "method"]  # asked for, then what differs
    assert shown["evaluate"] == ["name", "seqlen"]  # one match: the params set to something
