"""`lineage diff`: two runs with one param changed differ in exactly that param."""

from __future__ import annotations

import json

from cli import tailwise
from lineage_chain import make_chain

from steps.core.lineage_diff import compare


def test_one_changed_param_is_the_only_param_that_differs(local_chain, tmp_path):
    other = make_chain(local_chain.store, tmp_path, times=3)
    a, b, rows = compare(local_chain.store, local_chain.count, other.count[:10])
    assert (a, b) == (local_chain.count, other.count)
    differ = {(r.place, r.field) for r in rows if not r.equal}
    assert {field for _, field in differ if field.startswith("params.")} == {"params.times"}
    assert ("text", "params.times") in differ  # at the input `text` of the compared artifact
    # The rest that differs follows from it: the products of the changed step.
    assert differ == {("itself", "artifact"), ("itself", "inputs.text"), ("text", "artifact"),
                      ("text", "params.times")}
    equal = {(r.place, r.field) for r in rows if r.equal}
    assert {("itself", "params.min_length"), ("text", "step_version"),
            ("text", "code_revision"), ("text/text", "artifact")} <= equal


def test_identical_lineage_and_the_cli_formats(local_chain, tmp_path, capsys, monkeypatch):
    where = ["--store", str(local_chain.store.backend.root)]
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "diff", local_chain.count,
                            local_chain.count, *where)
    assert code == 0 and out.splitlines()[0].endswith(": identical lineage")
    assert all(line.endswith(")") and ": equal (" in line for line in out.splitlines()[1:])
    other = make_chain(local_chain.store, tmp_path, times=3)
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "diff", local_chain.count,
                            other.count, *where)
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith(": 4 fields differ at 2 of 3 places")
    text = lines.index("text:")
    assert lines[text + 2].split() == ["params.times", "2", "|", "3"]
    assert lines[text + 3].startswith("  equal: kind, step, step_version")
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "diff", local_chain.count,
                            local_chain.loud, *where, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["a"] == local_chain.count and report["b"] == local_chain.loud
    assert {"place": "itself", "field": "step"} in report["differ"]
