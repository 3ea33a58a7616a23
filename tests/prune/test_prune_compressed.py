"""The compressed sparse format of pruned weights: exact round trips, smaller files, every
reader (model loading, the spectral step's matrix reader) and hostile files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steps.core.errors import TailwiseError
from steps.core.factory import build_model, load_model
from steps.core.sparse_format import (
    FORMAT,
    FORMAT_KEY,
    SPARSE_WEIGHTS_FILE,
    compress,
    load_sparse,
    save_sparse,
)
from steps.core.weights import iter_weight_matrices
from steps.prune import prune, save_pruned


def _sparse(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator).to(dtype)
    tensor[torch.rand(shape, generator=generator) < sparsity] = 0
    return tensor


def test_round_trip_is_exact_and_smaller(tmp_path: Path) -> None:
    state = {
        "fp32": _sparse((37, 53), 0.5, torch.float32, 0),  # 1961 entries: a partial last byte
        "bf16": _sparse((16, 24), 0.7, torch.bfloat16, 1),
        "fp16_conv": _sparse((8, 4, 3, 3), 0.6, torch.float16, 2),
        "dense": torch.randn(12, 12, generator=torch.Generator().manual_seed(3)),
        "bias": torch.zeros(53),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(10).reshape(2, 5),
    }
    state["fp32"][0, 0] = -0.0  # a signed zero is a zero: not kept
    path = save_sparse(state, tmp_path / SPARSE_WEIGHTS_FILE)
    loaded = load_sparse(path)
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    assert compress(state["dense"]) is None and compress(state["bias"]) is None
    parts = compress(state["fp32"])
    kept = int((state["fp32"] != 0).sum())
    assert parts["__values__"].numel() == kept and parts["__bitmask__"].numel() == 246
    dense_path = tmp_path / "dense.safetensors"
    save_file({"w": _sparse((256, 256), 0.5, torch.float32, 4)}, str(dense_path))
    save_sparse({"w": _sparse((256, 256), 0.5, torch.float32, 4)}, tmp_path / "half.safetensors")
    ratio = (tmp_path / "half.safetensors").stat().st_size / dense_path.stat().st_size
    assert 0.5 < ratio < 17 / 32 + 0.01  # 1 bit + half the values per weight


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "mlp"])
def test_compressed_pruned_model_loads_and_analyses_as_the_dense_one(
    name: str, tmp_path: Path, tokenizer
) -> None:
    model = build_model(name)
    if name == "mlp":
        from steps.prune.plain import prune_plain

        report = prune_plain(model, method="magnitude", sparsity=0.6)
        tokenizer = None
    else:
        report = prune(model, method="magnitude", sparsity=0.6)
    dense = save_pruned(model, tokenizer, tmp_path / "dense", report)
    packed = save_pruned(model, tokenizer, tmp_path / "packed", report, compressed=True)
    assert (packed / SPARSE_WEIGHTS_FILE).is_file()
    assert not list(packed.glob("model*.safetensors.index.json"))
    assert [p.name for p in packed.glob("*.safetensors")] == [SPARSE_WEIGHTS_FILE]
    size = {d: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (dense, packed)}
    assert size[packed] < 0.8 * size[dense]
    reloaded = load_model(packed).state_dict()
    for key, value in load_model(dense).state_dict().items():
        assert torch.equal(reloaded[key], value), key
    matrices = {d: {key: matrix for key, _, matrix in iter_weight_matrices(d)}
                for d in (dense, packed)}
    assert list(matrices[packed]) == list(matrices[dense])
    for key, matrix in matrices[dense].items():
        assert torch.equal(matrices[packed][key], matrix), key


def _hostile(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    model_dir = tmp_path / "hostile"
    model_dir.mkdir()
    save_pruned(build_model("tiny-llama"), None, tmp_path / "base", prune(
        build_model("tiny-llama"), method="magnitude", sparsity=0.5), compressed=True)
    (model_dir / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    save_file(tensors, str(model_dir / SPARSE_WEIGHTS_FILE), metadata={FORMAT_KEY: FORMAT})
    return model_dir


BITS = torch.tensor([0b101], dtype=torch.uint8)  # entries 0 and 2 of 3 kept


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"x.weight.__shape__": torch.tensor([1, 3]), "x.weight.__bitmask__": BITS,
          "x.weight.__values__": torch.ones(3)}, "keeps 2 entries but 3 values"),
        ({"x.weight.__shape__": torch.tensor([10**9, 10**9]), "x.weight.__bitmask__": BITS,
          "x.weight.__values__": torch.ones(2)}, "does not fit shape"),
        ({"x.weight.__shape__": torch.tensor([1, -3]), "x.weight.__bitmask__": BITS,
          "x.weight.__values__": torch.ones(2)}, "non-negative int64"),
        ({"x.weight.__shape__": torch.ones(9, dtype=torch.int64), "x.weight.__bitmask__": BITS,
          "x.weight.__values__": torch.ones(2)}, "at most 8 sizes"),
        ({"x.weight.__shape__": torch.tensor([1, 3]), "x.weight.__values__": torch.ones(2)},
         "lacks its __bitmask__"),
        ({"x.weight": torch.ones(1, 3), "x.weight.__shape__": torch.tensor([1, 3]),
          "x.weight.__bitmask__": BITS, "x.weight.__values__": torch.ones(2)},
         "both dense and compressed"),
        ({"x.weight.__shape__": torch.tensor([1, 3]), "x.weight.__bitmask__": BITS,
          "x.weight.__values__": torch.ones(2, dtype=torch.int32)}, "1-D float tensor"),
        ({"model.norm.weight": torch.ones(128)}, "lacks"),  # the other weights are missing
    ],
)
def test_hostile_files_are_clear_errors(tensors: dict, message: str, tmp_path: Path) -> None:
    model_dir = _hostile(tmp_path, tensors)
    with pytest.raises(TailwiseError, match=message) as caught:
        load_model(model_dir)
    assert str(model_dir) in str(caught.value)
    # The matrix reader skips what is no float matrix, and reads any subset of a model.
    if message not in ("1-D float tensor", "lacks"):
        with pytest.raises(TailwiseError, match=message):
            list(iter_weight_matrices(model_dir))
