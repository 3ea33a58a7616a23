"""The step contract: params, inputs, outputs with lineage, and the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from toy_steps import CRASH, SHOUT

from steps.core.errors import ArtifactNotFound, ParamsError
from steps.core.step import cache_key, run_step
from steps.core.store import open_store


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


@pytest.fixture
def text(store, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("hello tailwise\n")
    return store.put(source, "text").digest


def test_outputs_carry_their_lineage(store, text):
    result = run_step(SHOUT, {"times": 2}, {"text": text}, store=store, flow_run_id="flow-1")
    manifest = result.outputs["loud"]
    made = manifest.produced_by
    assert not result.cached
    assert (made.step, made.step_version, made.params) == ("shout", "1", {"times": 2})
    assert made.inputs == {"text": text} and made.flow_run_id == "flow-1"
    assert made.cache_key == result.cache_key and made.started_at <= made.ended_at
    assert made.git_revision  # the checkout's revision (or $TAILWISE_GIT_REVISION)
    loud = store.get(manifest.digest, store.backend.root.parent / "loud.txt")
    assert loud.read_text() == "HELLO TAILWISE\n" * 2


def test_second_run_is_cached_and_no_cache_recomputes_the_same(store, text):
    first = run_step(SHOUT, {"times": 2}, {"text": text}, store=store, flow_run_id="flow-1")
    again = run_step(SHOUT, {"times": 2}, {"text": text[:10]}, store=store, flow_run_id="flow-2")
    assert again.cached and again.digests() == first.digests()
    assert again.flow_run_id == "flow-1"  # says which run computed it
    forced = run_step(SHOUT, {"times": 2}, {"text": text}, store=store, use_cache=False)
    assert not forced.cached and forced.digests() == first.digests()
    other = run_step(SHOUT, {"times": 3}, {"text": text}, store=store)
    assert not other.cached and other.cache_key != first.cache_key


def test_cache_entry_whose_output_vanished_is_not_a_hit(store, text):
    first = run_step(SHOUT, {}, {"text": text}, store=store)
    store.backend.delete(f"manifests/{first.digests()['loud']}.json")
    again = run_step(SHOUT, {}, {"text": text}, store=store)
    assert not again.cached and again.digests() == first.digests()


def test_cache_key_depends_on_every_part(text):
    params = SHOUT.validate({"times": 1})
    base = cache_key(SHOUT, params, {"text": text})
    assert base == cache_key(SHOUT, SHOUT.validate({}), {"text": text})  # defaults filled in
    assert base != cache_key(SHOUT, SHOUT.validate({"times": 2}), {"text": text})
    assert base != cache_key(SHOUT, params, {"text": "0" * 64})
    bumped = SHOUT.__class__(SHOUT.name, "2", SHOUT.params, SHOUT.inputs, SHOUT.fn)
    assert base != cache_key(bumped, params, {"text": text})


def test_bad_params_and_inputs_are_named(store, text):
    with pytest.raises(ParamsError, match=r"step shout: invalid parameter times"):
        run_step(SHOUT, {"times": -1}, {"text": text}, store=store)
    with pytest.raises(ParamsError, match=r"missing \['text'\]"):
        run_step(SHOUT, {}, {}, store=store)
    with pytest.raises(ArtifactNotFound):
        run_step(SHOUT, {}, {"text": "feedbeef"}, store=store)
    with pytest.raises(ParamsError, match=r"step shout: unknown parameter tims; known: times"):
        run_step(SHOUT, {"tims": 2}, {"text": text}, store=store)
    assert list(store.list()) == [store.stat(text)]  # nothing written


def test_crashed_step_leaves_nothing(store, text):
    with pytest.raises(RuntimeError, match="half way"):
        run_step(CRASH, {}, {"text": text}, store=store)
    assert [m.digest for m in store.list()] == [text]
    assert store.cache_entries() == []


def run_module(step: str, request: dict, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    return subprocess.run([sys.executable, "-m", f"steps.{step}", "--request", str(path),
                           "--result", str(tmp_path / "result.json"), *extra],
                          capture_output=True, text=True, timeout=300)


def test_container_command_gives_the_same_outputs_as_the_call(tmp_path):
    params = {"name": "tiny-llama", "seed": 3}
    from steps.build_model.step import STEP

    inline = run_step(STEP, params, {}, store=open_store(str(tmp_path / "a")))
    done = run_module("build_model", {"params": params, "store": str(tmp_path / "b"),
                                      "tracking": False}, tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["outputs"]["model"]["digest"] == inline.digests()["model"]
    assert result["cached"] is False


def test_container_command_rejects_a_bad_request(tmp_path):
    done = run_module("build_model", {"params": {"name": "resnet-9000"},
                                      "store": str(tmp_path / "s"), "tracking": False}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: step build_model: invalid parameter name")
    assert "Traceback" not in done.stderr and not (tmp_path / "result.json").exists()
    (tmp_path / "request.json").write_text("{not json")
    broken = subprocess.run([sys.executable, "-m", "steps.build_model", "--request",
                             str(tmp_path / "request.json")], capture_output=True, text=True)
    assert broken.returncode == 2 and "request file" in broken.stderr
