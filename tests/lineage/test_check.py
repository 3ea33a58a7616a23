"""`lineage check`: an intact chain passes; a flipped byte, an edited manifest or a deleted
blob anywhere up the chain is named (digest and file), on a local store and on S3."""

from __future__ import annotations

import json

from cli import tailwise

from steps.core.lineage_check import (
    DIFFERS,
    INCONSISTENT,
    MISSING,
    cache_keys,
    cache_keys_of,
    check,
    targets,
)
from steps.core.store import manifest_key, object_key


def problems(store, ref=None, downstream=False):
    loaded = targets(store, ref, downstream)
    cache = cache_keys(store) if ref is None else cache_keys_of(loaded, store)
    return [f for f in check(store, loaded, cache) if not f.ok]


def test_intact_chain_passes_and_every_artifact_is_reported(chain):
    loaded = targets(chain.store, chain.count[:10])
    assert {item.digest for item in loaded} == {chain.text, chain.loud, chain.count}
    findings = list(check(chain.store, loaded, cache_keys_of(loaded, chain.store)))
    assert all(f.ok for f in findings) and len(findings) == 3 + 2  # artifacts + cache entries
    assert problems(chain.store) == []
    assert {item.digest for item in targets(chain.store, chain.text, downstream=True)} == \
        {chain.text, chain.loud, chain.count}


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
    dangling = [f for f in problems(chain.store) if f.file.startswith("cache/")]
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
