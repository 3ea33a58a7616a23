"""`lineage check`: an intact chain passes; a flipped byte, an edited manifest or a deleted
blob anywhere up the chain is named (digest and file), on a local store and on S3."""

from __future__ import annotations

import io
import json
import tracemalloc

import pytest
from cli import tailwise
from rich.console import Console

from steps.core.lineage_check import DIFFERS, INCONSISTENT, MISSING, Loaded, check, scope
from steps.core.store import manifest_key, object_key, open_store
from tailwise_cli.lineage import CheckProgress
from tailwise_dev.synthetic_lineage import synthetic_manifests, write_manifests


def problems(store, ref=None, downstream=False):
    return [f for f in check(store, scope(store, ref, downstream)) if not f.ok]


def checked(store, ref, downstream=False) -> set[str]:
    return {f.digest for f in check(store, scope(store, ref, downstream))
            if f.about == "artifact"}


def test_intact_chain_passes_and_every_artifact_is_reported(chain):
    findings = list(check(chain.store, scope(chain.store, chain.count[:10])))
    assert {f.digest for f in findings[:3]} == {chain.text, chain.loud, chain.count}
    assert all(f.ok for f in findings) and len(findings) == 3 + 2  # artifacts + cache entries
    assert problems(chain.store) == []
    assert checked(chain.store, chain.text, downstream=True) == \
        {chain.text, chain.loud, chain.count}
    assert checked(chain.store, chain.loud, downstream=True) == {chain.loud, chain.count}


def test_one_flipped_byte_upstream_is_named(chain):
    key = object_key(chain.text)
    data = bytearray(chain.store.backend.get_bytes(key))
    data[3] ^= 0x01
    chain.store.backend.put_bytes(key, bytes(data))
    [finding] = problems(chain.store, chain.count)
    assert finding.status == DIFFERS and finding.digest == chain.text
    assert key in finding.file and "in.txt" in finding.file
    assert finding.line().startswith(f"content differs       {chain.text[:12]}  {key}")
    assert problems(chain.store, chain.loud, downstream=True) == []  # not below the flip


def test_an_edited_manifest_is_named(chain):
    key = manifest_key(chain.loud)
    manifest = json.loads(chain.store.backend.get_bytes(key))
    manifest["produced_by"]["params"]["times"] = 5  # what a forger of the record would do
    chain.store.backend.put_bytes(key, json.dumps(manifest).encode())
    [finding] = problems(chain.store, chain.count)
    assert (finding.status, finding.digest, finding.file) == (INCONSISTENT, chain.loud, key)
    assert "edited" in finding.detail


def test_a_manifest_that_names_another_digest_or_is_not_json_is_named(chain):
    key = manifest_key(chain.loud)
    manifest = json.loads(chain.store.backend.get_bytes(key))
    manifest["digest"] = chain.text
    chain.store.backend.put_bytes(key, json.dumps(manifest).encode())
    [finding] = problems(chain.store, chain.count)
    assert finding.status == INCONSISTENT and "names artifact" in finding.detail
    chain.store.backend.put_bytes(key, b"{not json")
    [finding] = problems(chain.store, chain.count)
    assert (finding.status, finding.digest) == (INCONSISTENT, chain.loud)
    assert "JSON" in finding.detail


def test_a_deleted_blob_and_a_dangling_cache_entry_are_named(chain):
    chain.store.backend.delete(object_key(chain.loud))
    [finding] = problems(chain.store, chain.count)
    assert (finding.status, finding.digest) == (MISSING, chain.loud)
    assert object_key(chain.loud) in finding.file
    chain.store.backend.delete(manifest_key(chain.text))
    found = {(f.status, f.digest, f.file) for f in problems(chain.store)}
    assert (MISSING, chain.loud, manifest_key(chain.text)) in found  # its input is gone
    chain.store.backend.delete(manifest_key(chain.count))
    dangling = [f for f in problems(chain.store) if f.about == "cache entry"]
    assert len(dangling) == 1 and "points at no artifact" in dangling[0].detail


def test_directory_artifacts_are_rehashed_file_by_file(local_chain, tmp_path):
    store = local_chain.store
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    manifest = store.put(model, "model")
    assert problems(store, manifest.digest) == []
    weights = next(f for f in manifest.files if f.path == "sub/weights.bin")
    store.local_path(weights.sha256).write_bytes(b"\0" * weights.size)
    [finding] = problems(store, manifest.digest)
    assert finding.status == DIFFERS and finding.file.startswith("sub/weights.bin")


def test_cli_exit_codes_and_one_line_errors(local_chain, tmp_path, capsys, monkeypatch):
    def lineage(*args):
        return tailwise(capsys, monkeypatch, "lineage", *args)

    where = ["--store", str(local_chain.store.backend.root)]
    code, out, _ = lineage("check", local_chain.count[:12], *where)
    assert code == 0 and sum(line.startswith("ok ") for line in out.splitlines()) == 5
    assert out.rstrip().endswith("all ok")
    local_chain.store.backend.delete(object_key(local_chain.text))
    code, out, _ = lineage("check", "--all", *where, "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["problems"] == 1 and report["artifacts"] == 3
    for args, message in [(("check", "0000000000", *where), "no artifact matches"),
                          (("check", *where), "give an artifact REF or --all"),
                          (("check", "--all", "--store", str(tmp_path / "empty")),
                           "holds no manifests"),
                          (("diff", local_chain.count, "zz", *where), "not a digest")]:
        code, _, err = lineage(*args)
        assert code == 2 and err.startswith("error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    local_chain.store.backend.put_bytes(manifest_key(local_chain.loud), b"\x00not json")
    monkeypatch.setenv("TAILWISE_CACHE_DIR", str(tmp_path / "cache"))
    for args in (("show", local_chain.count), ("find", "--step", "shout"),
                 ("diff", local_chain.count, local_chain.count)):
        code, _, err = lineage(*args, *where)
        assert code == 2 and f"manifest of {local_chain.loud[:12]}" in err, (args, err)
        assert "is corrupt: Invalid JSON" in err and len(err.strip().splitlines()) == 1


def test_help_lists_every_subcommand_and_lineage_ref_still_shows(local_chain, capsys,
                                                                 monkeypatch):
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "--help")
    assert code == 0
    for command in ("show", "check", "diff", "find", "stale", "resend"):
        assert f" {command} " in out, command
    code, out, _ = tailwise(capsys, monkeypatch, "lineage", "--store",
                            str(local_chain.store.backend.root), local_chain.count[:12])
    assert code == 0 and "made by step count v1" in out


def test_memory_does_not_grow_with_the_manifests_checked(tmp_path):
    """Streamed: a manifest is read when its artifact is checked and each finding is handed
    on, so what stays is the listing (a digest per artifact), not ~4 KB of manifest each."""
    def peak_bytes(count: int) -> int:
        root = tmp_path / f"store-{count}"
        write_manifests(root, synthetic_manifests(count))  # no content: each is `missing`
        store = open_store(str(root))
        tracemalloc.start()
        found = sum(1 for _ in check(store, scope(store, None)))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert found == count
        return peak

    small = peak_bytes(300)  # first: it also pays for what is allocated once
    growth = (peak_bytes(1500) - small) / 1200
    assert growth < 1024, f"{growth:.0f} bytes more per manifest checked"


def test_the_progress_bar_counts_artifacts_and_moves_within_a_large_one(local_chain):
    store, terminal = local_chain.store, Console(file=io.StringIO(), force_terminal=True)
    what = scope(store, None)
    with CheckProgress(what.count, terminal) as progress:
        assert all(f.ok for f in check(store, what, progress.advance, progress.next_artifact))
    task = progress.bar.tasks[0]
    assert task.completed == pytest.approx(3) and task.total == 3
    assert task.fields["mb"] == pytest.approx(progress.content_bytes / 1e6)
    with CheckProgress(1, terminal) as progress:
        progress.next_artifact(Loaded("a" * 64, store.stat(local_chain.text), None))
        progress.advance(progress.size // 4)
        assert progress.bar.tasks[0].completed == pytest.approx(0.25, abs=0.01)
    assert progress.bar.tasks[0].completed == pytest.approx(1)


def test_an_ambiguous_prefix_is_a_one_line_error_naming_the_candidates(tmp_path, capsys,
                                                                       monkeypatch):
    manifests = synthetic_manifests(1000)
    write_manifests(tmp_path / "store", manifests)
    by_prefix = {}
    for m in manifests:
        by_prefix.setdefault(m.digest[:4], []).append(m.digest)
    prefix, digests = next((p, ds) for p, ds in sorted(by_prefix.items()) if len(ds) > 1)
    monkeypatch.setenv("TAILWISE_CACHE_DIR", str(tmp_path / "cache"))
    for command in (["check", prefix], ["show", prefix], ["diff", prefix, digests[0]],
                    ["find", "--produced-from", prefix]):
        code, _, err = tailwise(capsys, monkeypatch, "lineage", *command,
                                "--store", str(tmp_path / "store"))
        assert code == 2 and f"{prefix!r} is ambiguous" in err, (command, err)
        assert all(d[:12] in err for d in digests) and len(err.strip().splitlines()) == 1
