"""Hostile safetensors files: the header reader names the file and fails cleanly.

Every malformed file must raise WeightsError (a TailwiseError) whose message names the
file; nothing may hang, crash with another exception type, or allocate the size a header
declares. A well-formed file with NaN/Inf weights is not an error: its row is marked.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from fuzzing import FUZZ
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from steps.core.errors import TailwiseError
from steps.core.weights import WeightsError, iter_weight_matrices, list_weight_matrices

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3",
          "Q4", "f32", "", "F32 ", "COMPLEX64"]
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1}
TB = 1 << 40


@pytest.fixture(scope="module")
def scratch() -> Path:
    """One directory for the module; hypothesis examples overwrite one file in it."""
    with tempfile.TemporaryDirectory(prefix="tailwise-fuzz-st-") as root:
        yield Path(root)


def safetensors_bytes(header: bytes | dict, data: bytes = b"", claimed: int | None = None) -> bytes:
    """A file: 8-byte little-endian header length (or `claimed`), header JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


def read_everything(path: Path) -> list:
    """List the matrices, then load each (what the spectral step does)."""
    infos = list_weight_matrices(path)
    return [(info, m.tensor) for info, m in zip(infos, iter_weight_matrices(path), strict=True)]


def assert_clean_outcome(path: Path, data_len: int) -> None:
    """Either a WeightsError naming the file, or matrices that the file really holds."""
    try:
        loaded = read_everything(path)
    except WeightsError as err:
        assert str(path) in str(err)
        assert "\n" not in str(err)
        return
    for info, tensor in loaded:
        assert tuple(tensor.shape) == info.shape
        assert tensor.numel() * tensor.element_size() <= data_len  # nothing beyond the file


def real_file(path: Path) -> Path:
    torch.manual_seed(0)
    save_file({"layers.0.fc.weight": torch.randn(6, 5), "layers.0.fc.bias": torch.randn(6),
               "embed.weight": torch.randn(7, 4).to(torch.float16)}, str(path))
    return path


# --- random and truncated bytes -------------------------------------------------------------


@FUZZ
@given(blob=st.binary(max_size=4096))
def test_random_bytes_are_a_weights_error(scratch: Path, blob: bytes) -> None:
    path = scratch / "random.safetensors"
    path.write_bytes(blob)
    assert_clean_outcome(path, len(blob))


@FUZZ
@given(length=st.integers(0, 2**64 - 1), tail=st.binary(max_size=256))
def test_any_length_field_is_a_weights_error(scratch: Path, length: int, tail: bytes) -> None:
    path = scratch / "length.safetensors"
    path.write_bytes(struct.pack("<Q", length) + tail)
    assert_clean_outcome(path, len(tail))


def test_every_prefix_of_a_real_file_is_refused(tmp_path: Path) -> None:
    """All lengths: inside the length field, inside the header, inside the data."""
    whole = real_file(tmp_path / "whole.safetensors").read_bytes()
    header_len = struct.unpack("<Q", whole[:8])[0]
    assert len(read_everything(tmp_path / "whole.safetensors")) == 2
    cut = tmp_path / "cut.safetensors"
    classes = set()
    for size in range(len(whole)):
        cut.write_bytes(whole[:size])
        with pytest.raises(WeightsError, match=str(cut)):
            read_everything(cut)
        classes.add("length" if size < 8 else "header" if size < 8 + header_len else "data")
    assert classes == {"length", "header", "data"}


def test_header_claiming_terabytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tb.safetensors"
    for claimed in (TB, 5 * TB, 2**63, 2**64 - 1, 100_000_001):
        path.write_bytes(safetensors_bytes(b"{}", claimed=claimed))
        with pytest.raises(WeightsError, match="header too large|not a readable"):
            list_weight_matrices(path)


# --- hostile headers ---------------------------------------------------------------------

names = st.one_of(st.sampled_from(["a.weight", "embed.weight", "x.bias", "__metadata__", ""]),
                  st.text(max_size=20))
shapes = st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1), st.integers(-5, -1)),
                  max_size=5)
offsets = st.lists(st.one_of(st.integers(0, 64), st.integers(0, 2**64 + 5)), min_size=0,
                   max_size=3)
entries = st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": shapes,
                                 "data_offsets": offsets})


@FUZZ
@given(header=st.dictionaries(names, entries, max_size=4), data_len=st.integers(0, 64))
def test_hostile_headers_are_refused_or_consistent(scratch: Path, header: dict,
                                                   data_len: int) -> None:
    """Huge shapes and offsets, unknown dtypes, offsets outside the file or overlapping."""
    path = scratch / "header.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(range(data_len))))
    assert_clean_outcome(path, data_len)


@FUZZ
@given(name=st.binary(min_size=1, max_size=12))
def test_non_utf8_tensor_names(scratch: Path, name: bytes) -> None:
    header = (b'{"' + name.replace(b'"', b"") + b'.weight":{"dtype":"F32","shape":[2,2],'
              b'"data_offsets":[0,16]}}')
    path = scratch / "names.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(16)))
    assert_clean_outcome(path, 16)


@pytest.mark.parametrize("depth", [50, 200, 5_000, 100_000])
@pytest.mark.parametrize("where", ["metadata", "entry", "top"])
def test_deeply_nested_json_is_refused(tmp_path: Path, depth: int, where: str) -> None:
    nest = b"[" * depth + b"]" * depth
    header = {"metadata": b'{"__metadata__":{"k":' + nest + b"}}",
              "entry": b'{"a.weight":{"dtype":"F32","shape":' + nest + b',"data_offsets":[0,0]}}',
              "top": nest}[where]
    path = tmp_path / "nested.safetensors"
    path.write_bytes(safetensors_bytes(header))
    with pytest.raises(WeightsError, match=str(path)):
        list_weight_matrices(path)


def test_overlapping_and_outside_offsets(tmp_path: Path) -> None:
    entry = {"dtype": "F32", "shape": [2, 2]}
    cases = {
        "overlap": ({"a.weight": {**entry, "data_offsets": [0, 16]},
                     "b.weight": {**entry, "data_offsets": [8, 24]}}, 24),
        "outside": ({"a.weight": {**entry, "data_offsets": [0, 16]}}, 8),
        "beyond": ({"a.weight": {**entry, "data_offsets": [TB, TB + 16]}}, 16),
        "reversed": ({"a.weight": {**entry, "data_offsets": [16, 0]}}, 16),
        "shape_vs_span": ({"a.weight": {**entry, "data_offsets": [0, 8]}}, 8),
    }
    for name, (header, size) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(safetensors_bytes(header, bytes(size)))
        with pytest.raises(WeightsError, match=str(path)):
            list_weight_matrices(path)


def test_zero_size_tensors_are_listed_not_crashed_on(tmp_path: Path) -> None:
    path = tmp_path / "zero.safetensors"
    header = {"a.weight": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
              "b.weight": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}
    path.write_bytes(safetensors_bytes(header))
    loaded = read_everything(path)
    assert sorted(tensor.numel() for _, tensor in loaded) == [0, 0]
    from steps.spectral import SpectralError, analyze

    with pytest.raises(SpectralError, match="all skipped"):  # nothing to fit, said clearly
        analyze(path, device="cpu")


@pytest.mark.parametrize("text", ["{nope", "\xff\xfe", "[" * 100_000])
def test_unreadable_config_beside_weights_is_a_weights_error(tmp_path: Path, text: str) -> None:
    real_file(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(WeightsError, match="config.json: unreadable config"):
        list_weight_matrices(tmp_path)


def test_index_json_fuzz_is_a_weights_error(tmp_path: Path) -> None:
    """A sharded checkpoint's index that is not what it claims to be."""
    real_file(tmp_path / "shard.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    for text in ["", "[]", "{}", '{"weight_map": 3}', '{"weight_map": ["x"]}',
                 '{"weight_map": {"a.weight": 7}}', '{"weight_map": {"a.weight": null}}',
                 '{"weight_map": {"a.weight": "missing.safetensors"}}', "\xff\xfe",
                 "[" * 100_000]:
        index.write_text(text, encoding="latin-1")
        with pytest.raises(WeightsError, match=str(index)):
            list_weight_matrices(tmp_path)


# --- compressed sparse files (tailwise prune --compressed) ---------------------------------

sparse_dims = st.lists(st.one_of(st.integers(0, 12), st.integers(2**20, 2**62),
                                 st.integers(-3, -1)), max_size=10)
sparse_parts = st.fixed_dictionaries({
    "__shape__": st.tuples(sparse_dims, st.sampled_from([torch.int64, torch.int32,
                                                         torch.float32])),
    "__bitmask__": st.tuples(st.binary(max_size=24), st.sampled_from([torch.uint8,
                                                                      torch.int8])),
    "__values__": st.tuples(st.integers(0, 40), st.sampled_from([torch.float32, torch.float16,
                                                                torch.int32])),
}, optional={"dense": st.just(True)})


def sparse_tensors(parts: dict) -> dict[str, torch.Tensor]:
    (dims, shape_dtype), (bits, bits_dtype), (count, values_dtype) = (
        parts["__shape__"], parts["__bitmask__"], parts["__values__"])
    tensors = {
        "layers.0.fc.weight.__shape__": torch.tensor(dims, dtype=torch.int64).to(shape_dtype),
        "layers.0.fc.weight.__bitmask__": torch.frombuffer(bytearray(bits) or bytearray(1),
                                                           dtype=torch.uint8).to(bits_dtype),
        "layers.0.fc.weight.__values__": torch.arange(count).to(values_dtype),
    }
    if parts.get("dense"):
        tensors["layers.0.fc.weight"] = torch.ones(2, 2)
    return tensors


@FUZZ
@given(parts=sparse_parts)
def test_hostile_sparse_files_are_refused_or_consistent(scratch: Path, parts: dict) -> None:
    """Shapes that disagree with the bitmask, huge or negative sizes, wrong dtypes, value
    counts that disagree with the kept bits, a tensor stored both ways."""
    from steps.core.sparse_format import FORMAT, FORMAT_KEY, SparseFormatError, load_sparse

    path = scratch / "sparse.safetensors"
    save_file(sparse_tensors(parts), str(path), metadata={FORMAT_KEY: FORMAT})
    try:
        loaded = load_sparse(path)
    except SparseFormatError as err:
        assert str(path) in str(err) and "\n" not in str(err)
    else:
        dense = loaded["layers.0.fc.weight"]
        bitmask_bytes = len(parts["__bitmask__"][0]) or 1
        assert dense.numel() <= 8 * bitmask_bytes  # nothing beyond what the file can describe
        assert int(dense.count_nonzero()) <= parts["__values__"][0]
    assert_clean_outcome(path, path.stat().st_size)


# --- values and sizes -----------------------------------------------------------------------


def test_nan_and_inf_rows_are_marked_not_crashed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bad_nan, bad_inf = torch.randn(40, 30), torch.randn(40, 30)
    bad_nan[3, 4] = math.nan
    bad_inf[0, 0] = math.inf
    path = tmp_path / "nan.safetensors"
    save_file({"layers.0.fc.weight": torch.randn(40, 30), "layers.1.fc.weight": bad_nan,
               "layers.2.fc.weight": bad_inf}, str(path))
    from steps.spectral import analyze

    rows = {r["name"]: r for r in analyze(path, device="cpu").to_pylist()}
    assert rows["layers.0.fc"]["status"] == "ok"
    for name in ("layers.1.fc", "layers.2.fc"):
        assert rows[name]["status"] != "ok" and "finite" in rows[name]["status"]
        assert math.isnan(rows[name]["alpha"])


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from steps.core.errors import TailwiseError
    from steps.core.weights import list_weight_matrices
    import steps.spectral  # imports done before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = "ok"
    try:
        infos = list_weight_matrices(sys.argv[1])
        outcome = "listed " + ",".join(f"{i.name}:{i.shape}" for i in infos)
        if len(sys.argv) > 2:
            table = steps.spectral.analyze(sys.argv[1], device="cpu")
            outcome += " analysed " + ",".join(table.column("name").to_pylist())
    except TailwiseError as err:
        outcome = "error " + type(err).__name__ + ": " + str(err)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "grew_kb": after - before}))
""")


def peak_rss_growth(path: Path, *extra: str) -> dict:
    """Run the reader in a fresh process and report how much its peak RSS grew (kB)."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), *extra],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_header_declaring_a_terabyte_tensor_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "declared.safetensors"
    header = {"big.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 18],
                             "data_offsets": [0, TB]}}
    path.write_bytes(safetensors_bytes(header, bytes(64)))
    result = peak_rss_growth(path)
    assert result["outcome"].startswith("error WeightsError") and str(path) in result["outcome"]
    assert result["grew_kb"] < 100_000


@pytest.mark.timeout(300)
def test_sparse_terabyte_file_is_listed_and_skipped_without_reading(tmp_path: Path) -> None:
    """A real 1 TB tensor (a sparse file): listed from its header, skipped by max_n, never
    read into memory."""
    path = tmp_path / "sparse.safetensors"
    torch.manual_seed(0)
    small = torch.randn(30, 20)
    header = {"big.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 18],
                             "data_offsets": [0, TB]},
              "small.weight": {"dtype": "F32", "shape": [30, 20],
                               "data_offsets": [TB, TB + small.numel() * 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads headers to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.seek(8 + len(raw) + TB)
        out.write(small.numpy().tobytes())
    try:
        if os.stat(path).st_blocks * 512 > 1 << 30:
            pytest.skip("this filesystem has no sparse files")
        result = peak_rss_growth(path, "analyse")
    finally:
        path.unlink()
    listed = f"listed big:{(1 << 20, 1 << 18)},small:(30, 20) analysed small"
    # Where the kernel refuses to map 1 TB (heuristic overcommit), the refusal must be a
    # clean WeightsError that names the file.
    refused = f"error WeightsError: {path}: not a readable safetensors file (unable to mmap"
    assert result["outcome"] == listed or result["outcome"].startswith(refused), result
    assert result["grew_kb"] < 200_000


def test_errors_are_tailwise_errors() -> None:
    assert issubclass(WeightsError, TailwiseError)


def test_control_characters_in_a_tensor_name_stay_on_one_line(tmp_path: Path) -> None:
    """Found by bench/fuzz.py: safetensors quotes the name in its own message."""
    path = tmp_path / "newline.safetensors"
    path.write_bytes(safetensors_bytes({"\n": {"dtype": "F64", "shape": [],
                                              "data_offsets": [1, 0]}}))
    with pytest.raises(WeightsError) as caught:
        list_weight_matrices(path)
    assert "\n" not in str(caught.value) and "\\n" in str(caught.value)
