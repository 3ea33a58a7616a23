"""`lineage stale`: a step version bump or a code change makes its outputs and everything
built from them stale; a rerun with the current code confirms them again."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

from cli import tailwise
from lineage_chain import COUNT, SHOUT, STEPS

from steps.core.lineage_stale import find_stale
from steps.core.registry import load_step
from steps.core.step import code_revision, run_step


def test_nothing_is_stale_against_the_code_that_made_it(local_chain):
    assert find_stale(local_chain.store, STEPS.get) == []


def test_version_bump_makes_outputs_and_products_stale_until_rerun(local_chain):
    bumped = dataclasses.replace(SHOUT, version="2")
    steps = {"shout": bumped, "count": COUNT}
    stale = {s.digest: s for s in find_stale(local_chain.store, steps.get)}
    assert set(stale) == {local_chain.loud, local_chain.count}
    assert stale[local_chain.loud].reason == "step shout is now v2 (made by v1)"
    assert stale[local_chain.count].reason == f"built from stale {local_chain.loud[:12]}"
    # Rerun with v2: the same bytes, so the manifest stays; the new cache entry confirms it.
    again = run_step(bumped, {"times": 2}, {"text": local_chain.text}, store=local_chain.store)
    assert not again.cached and again.digests()["loud"] == local_chain.loud
    assert find_stale(local_chain.store, steps.get) == []


def test_code_change_without_version_bump_is_stale(local_chain, tmp_path):
    module_file = tmp_path / "shout_v1_code.py"
    module_file.write_text("def shout(ctx, params, inputs):\n    raise NotImplementedError\n")
    spec = importlib.util.spec_from_file_location("shout_v1_code", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["shout_v1_code"] = module
    try:
        changed = dataclasses.replace(SHOUT, fn=module.shout)
        before = code_revision(changed)
        [loud, count] = find_stale(local_chain.store, {"shout": changed, "count": COUNT}.get)
        assert loud.digest == local_chain.loud and count.digest == local_chain.count
        assert loud.reason.startswith(f"code of step shout changed: {before[:12]}")
        module_file.write_text(module_file.read_text() + "# edited\n")
        assert code_revision(changed) != before
    finally:
        del sys.modules["shout_v1_code"]


def test_code_revision_is_the_git_tree_id_of_the_step_folder():
    step = load_step("build_text")
    tree = subprocess.run(["git", "rev-parse", "HEAD:steps/build_text"], capture_output=True,
                          text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "steps/build_text"],
                           capture_output=True, text=True).stdout.strip()
    if tree.returncode == 0 and not dirty:  # a clean git checkout (not an sdist)
        assert code_revision(step) == tree.stdout.strip()
    assert len(code_revision(step)) == 40


def test_cli_lists_the_stale(local_chain, capsys, monkeypatch):
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "stale", "--format", "json",
                            "--store", str(local_chain.store.backend.root))
    # The toy steps are not tailwise steps: the CLI judges only steps it can load.
    assert code == 0 and json.loads(out) == []
