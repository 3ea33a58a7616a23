"""Hostile JSON: manifests in the store and step request files.

A malformed manifest is a StoreError naming the artifact, never another exception type; a
malformed request is a ParamsError naming the file, the step process exits non-zero with one
line on stderr and writes nothing to the store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fuzzing import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from steps.core.backends import LocalBackend
from steps.core.errors import ParamsError, StoreError, TailwiseError
from steps.core.main import StepRequest, read_request, step_main
from steps.core.store import ArtifactStore, Manifest, manifest_key
from steps.spectral.step import STEP as SPECTRAL

DIGEST = "ab" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory(prefix="tailwise-fuzz-json-") as root:
        yield Path(root)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- manifests ---------------------------------------------------------------------------

manifest_fields = st.fixed_dictionaries(
    {},
    optional={
        "schema": json_values, "digest": st.sampled_from([DIGEST, "cd" * 32, "../x", ""])
        | json_values, "kind": json_values | st.just("model"),
        "media_type": json_values | st.just("application/octet-stream"),
        "size": st.integers(-2, 2**70) | json_values, "created_at": json_values | st.just("now"),
        "name": json_values, "produced_by": json_values
        | st.fixed_dictionaries({"step": st.just("s"), "step_version": st.just("1")},
                                optional={"params": json_values, "inputs": json_values}),
        "files": json_values | st.lists(st.fixed_dictionaries(
            {"path": st.sampled_from(["a", "../a", "/etc/passwd", "a/../../b", "ok/x"]),
             "size": st.integers(0, 10),
             "sha256": st.sampled_from(["00" * 32, "../../etc", "x"])}), max_size=3),
    },
)


def manifest_store(root: Path, raw: bytes) -> ArtifactStore:
    store = ArtifactStore(LocalBackend(root / "store"))
    store.backend.put_bytes(manifest_key(DIGEST), raw)
    return store


def check_manifest_read(root: Path, raw: bytes) -> None:
    """stat/list/get either work on a consistent manifest or raise a TailwiseError."""
    store = manifest_store(root, raw)
    dest = root / "dest"
    try:
        manifest = store.stat(DIGEST)
    except StoreError as err:
        assert DIGEST[:12] in str(err) and "\n" not in str(err)
        with pytest.raises(StoreError):
            store.list()
        return
    assert manifest.digest == DIGEST  # a manifest cannot claim another artifact's digest
    assert [m.digest for m in store.list()] == [DIGEST]
    try:
        store.get(DIGEST, dest / "out")
    except TailwiseError:
        pass
    outside = [p for p in files_under(root) if not p.is_relative_to(dest)
               and not p.is_relative_to(root / "store")]
    assert outside == []


@FUZZ
@given(fields=manifest_fields)
def test_fuzzed_manifest_fields(scratch: Path, fields: dict) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as root:
        check_manifest_read(Path(root), json.dumps(fields).encode())


@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_manifest_bytes(scratch: Path, raw: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as root:
        check_manifest_read(Path(root), raw)


@pytest.mark.parametrize("raw", [
    b"", b"\xff\xfe\x00", b"[" * 100_000, b'{"digest": "' + b"a" * 5_000_000 + b'"}',
    json.dumps({"digest": "cd" * 32, "kind": "m", "media_type": "x", "size": 1,
                "created_at": "now"}).encode(),
    json.dumps({"digest": DIGEST, "kind": "m", "media_type": "x", "size": "big",
                "created_at": "now"}).encode(),
])
def test_crafted_manifests_are_store_errors(tmp_path: Path, raw: bytes) -> None:
    store = manifest_store(tmp_path, raw)
    with pytest.raises(StoreError, match=DIGEST[:12]) as err:
        store.stat(DIGEST)
    assert len(str(err.value)) < 500


def test_manifest_naming_another_digest_is_refused(tmp_path: Path) -> None:
    """A manifest stored under one digest that claims another would serve the wrong bytes."""
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    (tmp_path / "a.txt").write_text("genuine")
    (tmp_path / "b.txt").write_text("substitute")
    genuine, substitute = store.put(tmp_path / "a.txt", "text"), store.put(tmp_path / "b.txt",
                                                                            "text")
    forged = substitute.model_copy()
    store.backend.put_bytes(manifest_key(genuine.digest), forged.to_json())
    with pytest.raises(StoreError, match=genuine.digest[:12]):
        store.get(genuine.digest, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize("raw", [b"", b"{nope", b"[]", b'{"outputs": 3}', b"\xff",
                                 b'{"outputs": {"m": 7}}'])
def test_corrupt_cache_entry_is_a_miss_not_a_crash(tmp_path: Path, raw: bytes) -> None:
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    key = "ef" * 32
    store.backend.put_bytes(f"cache/{key}.json", raw)
    assert store.cache_get(key) is None


@pytest.mark.parametrize("raw", [b"", b"{nope", b"[]", b'{"digest": 3}', b"\xff"])
def test_corrupt_named_ref_is_a_store_error(tmp_path: Path, raw: bytes) -> None:
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    store.backend.put_bytes("refs/nightly.json", raw)
    with pytest.raises(StoreError, match="nightly"):
        store.get_ref("nightly")


# --- step requests -------------------------------------------------------------------------

request_fields = st.fixed_dictionaries(
    {},
    optional={"params": json_values, "inputs": json_values
              | st.dictionaries(st.text(max_size=5), st.text(max_size=70), max_size=2),
              "store": json_values, "tracking": json_values, "tracking_uri": json_values,
              "parent_run_id": json_values, "flow_run_id": json_values,
              "use_cache": json_values, "extra": json_values},
)


def check_request(path: Path) -> None:
    try:
        request = read_request(path)
    except ParamsError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert isinstance(request, StepRequest)


@FUZZ
@given(fields=request_fields)
def test_fuzzed_request_fields(scratch: Path, fields: dict) -> None:
    path = scratch / "request.json"
    path.write_text(json.dumps(fields))
    check_request(path)


@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_request_bytes(scratch: Path, raw: bytes) -> None:
    path = scratch / "request.json"
    path.write_bytes(raw)
    check_request(path)


BAD_REQUESTS = {
    "not_json": b"{params: }",
    "non_utf8": b'{"params": {"estimator": "\xff\xfe"}}',
    "bom_and_garbage": b"\xef\xbb\xbf\x00\x01",
    "deep": b'{"params": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "params_is_a_list": json.dumps({"params": [1, 2]}).encode(),
    "inputs_not_strings": json.dumps({"inputs": {"model": 3}}).encode(),
    "missing_input": json.dumps({"params": {}, "inputs": {}}).encode(),
    "unknown_input": json.dumps({"inputs": {"model": "abcd", "other": "abcd"}}).encode(),
    "bad_param_type": json.dumps({"params": {"min_evals": "ten"},
                                  "inputs": {"model": "abcd"}}).encode(),
    "bad_param_value": json.dumps({"params": {"estimator": "nope"}}).encode(),
    "extra_request_field": json.dumps({"inputs": {"model": "abcd"}, "use_cach": False}).encode(),
    "huge_ref": json.dumps({"inputs": {"model": "a" * 2_000_000}}).encode(),
    "traversal_ref": json.dumps({"inputs": {"model": "../../../etc/passwd"}}).encode(),
    "unknown_digest": json.dumps({"inputs": {"model": "ab" * 32}}).encode(),
}


def request_file(tmp_path: Path, raw: bytes) -> tuple[Path, Path]:
    """Write a request whose store (if it names none) is a fresh folder under tmp_path."""
    store = tmp_path / "store"
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        body.setdefault("store", str(store))
        body.setdefault("tracking", False)
        raw = json.dumps(body).encode()
    path = tmp_path / "request.json"
    path.write_bytes(raw)
    return path, store


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_step_main_refuses_bad_requests(tmp_path: Path, capsys, monkeypatch, case: str) -> None:
    monkeypatch.chdir(tmp_path)  # a request without a store must not write to the checkout
    path, store = request_file(tmp_path, BAD_REQUESTS[case])
    result = tmp_path / "result.json"
    assert step_main(SPECTRAL, ["--request", str(path), "--result", str(result)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < 1000, err[:2000]
    assert files_under(store) == [] and not result.exists()
    assert not (tmp_path / ".tailwise").exists()


def test_step_main_refuses_a_request_that_is_a_directory(tmp_path: Path, capsys) -> None:
    assert step_main(SPECTRAL, ["--request", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: request file {tmp_path}") and err.count("\n") == 1


@pytest.mark.parametrize("case", ["non_utf8", "inputs_not_strings", "huge_ref"])
def test_spectral_process_exits_non_zero(tmp_path: Path, case: str) -> None:
    path, store = request_file(tmp_path, BAD_REQUESTS[case])
    result = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "steps.spectral", "--request", str(path),
                           "--result", str(result)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert len(done.stderr) < 1000 and done.stdout == ""
    assert files_under(store) == [] and not result.exists()


def test_manifest_model_round_trips() -> None:
    """The fuzz above is only meaningful if a well-formed manifest is accepted."""
    good = Manifest(digest=DIGEST, kind="m", media_type="x", size=1, created_at="now")
    assert Manifest.model_validate_json(good.to_json()) == good


# --- plain model descriptions (tailwise_model.json) -------------------------------------------

plain_specs = st.one_of(
    json_values,
    st.fixed_dictionaries({"kind": st.sampled_from(["mlp", "cnn", "resnet", 3]),
                           "config": json_values | st.fixed_dictionaries({}, optional={
                               "hidden": st.lists(st.integers(-3, 300), max_size=3),
                               "in_features": st.integers(-1, 100),
                               "num_classes": st.integers(-1, 20) | st.text(max_size=3),
                               "channels": st.lists(st.integers(0, 40), max_size=3),
                               "bogus": json_values})}),
)


@pytest.fixture(scope="module")
def saved_mlp(scratch: Path) -> Path:
    from steps.core import factory

    return factory.save_hf(factory.build_model("mlp"), None, scratch / "mlp")


@FUZZ
@given(spec=plain_specs)
def test_fuzzed_plain_model_description(saved_mlp: Path, spec) -> None:
    """Any tailwise_model.json: the model it describes and the file agree, or ModelLoadError."""
    from steps.core import factory
    from steps.core.pretrained import ModelLoadError

    original = (saved_mlp / factory.PLAIN_CONFIG_FILE).read_text()
    (saved_mlp / factory.PLAIN_CONFIG_FILE).write_text(json.dumps(spec))
    try:
        model = factory.load_model(saved_mlp)
    except ModelLoadError as err:
        assert str(saved_mlp) in str(err) and "\n" not in str(err)
    else:
        assert not any(p.is_meta for p in model.parameters())
    finally:
        (saved_mlp / factory.PLAIN_CONFIG_FILE).write_text(original)


def test_plain_model_declaring_huge_layers_allocates_nothing(tmp_path: Path) -> None:
    """A description of 20k-wide layers beside a tiny file: refused before any allocation."""
    from steps.core import factory

    model = factory.save_hf(factory.build_model("mlp"), None, tmp_path / "mlp")
    (model / factory.PLAIN_CONFIG_FILE).write_text(json.dumps(
        {"kind": "mlp", "config": {"in_features": 20_000, "hidden": [20_000, 20_000]}}))
    script = ("import json, resource, sys\n"
              "from steps.core import factory, pretrained\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n"
              "    factory.load_model(sys.argv[1]); outcome = 'loaded'\n"
              "except pretrained.ModelLoadError as err:\n"
              "    outcome = str(err)\n"
              "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "print(json.dumps({'outcome': outcome, 'grew_kb': after - before}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith(f"cannot load model from {model}: ")
    assert "size mismatch" in result["outcome"]
    assert result["grew_kb"] < 300_000  # the declared model is 3.2 GB of float32


# --- Hugging Face config.json ----------------------------------------------------------------

HF_CONFIGS = {
    "not_json": "{nope",
    "a_list": "[]",
    "deep": "[" * 100_000,
    "no_model_type": "{}",
    "unknown_model_type": '{"model_type": "resnet-9000"}',
    "wrong_field_type": '{"model_type": "llama", "hidden_size": "big"}',
    "architectures_not_a_list": '{"model_type": "llama", "architectures": 3}',
    "non_utf8": '{"model_type": "llama\xff"}',
}


@pytest.mark.parametrize("case", sorted(HF_CONFIGS))
def test_hostile_hf_config_is_a_model_load_error(tmp_path: Path, case: str) -> None:
    from steps.core.pretrained import ModelLoadError, load_hf_model

    (tmp_path / "config.json").write_text(HF_CONFIGS[case], encoding="latin-1")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"cannot load model from {tmp_path}: ") as err:
        load_hf_model(tmp_path)
    assert "\n" not in str(err.value)


def test_hf_config_declaring_a_huge_model_beside_tiny_weights_allocates_nothing(
        tmp_path: Path) -> None:
    """transformers initialises what a checkpoint lacks: a 1.9B-parameter config beside a
    16 kB file would allocate 7.5 GB. It is refused from a count on the meta device."""
    import torch
    from safetensors.torch import save_file

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 8,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"model.norm.weight": torch.ones(4096)}, str(tmp_path / "model.safetensors"))
    script = ("import json, resource, sys\n"
              "from steps.core import pretrained\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n"
              "    pretrained.load_hf_model(sys.argv[1]); outcome = 'loaded'\n"
              "except pretrained.ModelLoadError as err:\n"
              "    outcome = str(err)\n"
              "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "print(json.dumps({'outcome': outcome, 'grew_kb': after - before}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == (f"cannot load model from {tmp_path}: config.json declares "
                                 "1,881,214,976 parameters but the weight files hold only "
                                 f"{(tmp_path / 'model.safetensors').stat().st_size:,} bytes")
    assert result["grew_kb"] < 500_000
