"""steps.core.weights: the streaming matrix iterator over modules and safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from spectral_helpers import cnn, mlp, tiny_gpt2

from steps.core import weights as weights_module
from steps.core.weights import (
    WeightsError,
    file_layer_type,
    iter_weight_matrices,
    list_weight_matrices,
)


def _as_dict(source) -> dict[str, tuple[str, torch.Tensor]]:
    return {m.name: (m.layer_type, m.tensor) for m in iter_weight_matrices(source)}


def test_module_matrices_types_and_shapes():
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 16),
        torch.nn.Linear(16, 32),
        torch.nn.LayerNorm(32),
        torch.nn.Conv1d(32, 8, 3),
        torch.nn.Conv2d(8, 4, (3, 2)),
    )
    infos = list_weight_matrices(model)
    assert [(i.name, i.layer_type, i.shape) for i in infos] == [
        ("0", "embedding", (50, 16)),
        ("1", "linear", (32, 16)),
        ("3", "conv1d", (8, 32, 3)),
        ("4", "conv2d", (4, 8, 3, 2)),
    ]
    assert [i.index for i in infos] == [0, 1, 2, 3]


def test_gpt2_conv1d_is_yielded_transposed_to_out_by_in(tmp_path):
    model = tiny_gpt2()
    matrices = _as_dict(model)
    layer_type, c_attn = matrices["transformer.h.0.attn.c_attn"]
    stored = model.transformer.h[0].attn.c_attn.weight  # HF Conv1D stores (in, out)
    assert layer_type == "conv1d"
    assert tuple(stored.shape) == (64, 192) and tuple(c_attn.shape) == (192, 64)
    assert torch.equal(c_attn, stored.t())
    assert matrices["transformer.h.1.mlp.c_fc"][1].shape == (256, 64)

    # The same matrices, names and orientation from the saved checkpoint.
    model.save_pretrained(tmp_path)
    from_file = _as_dict(tmp_path)
    assert set(from_file) == set(matrices)
    for name, (kind, tensor) in matrices.items():
        assert from_file[name][0] == kind
        assert torch.equal(from_file[name][1], tensor)


def test_tied_embedding_and_head_are_listed_once():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [i.name for i in list_weight_matrices(model)]
    assert "transformer.wte" in names and "lm_head" not in names


def test_tied_weights_stored_twice_in_a_file_are_listed_once(tmp_path):
    embedding = torch.randn(100, 16)
    tensors = {
        "model.embed_tokens.weight": embedding,
        "lm_head.weight": embedding.clone(),  # sorts first, but the embedding keeps the row
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    names = [i.name for i in list_weight_matrices(tmp_path)]
    assert names == ["model.embed_tokens", "model.layers.0.mlp.up_proj"]

    tensors["lm_head.weight"] = torch.randn(100, 16)  # untied: both are analysed
    save_file(tensors, tmp_path / "model.safetensors")
    infos = {i.name: i.layer_type for i in list_weight_matrices(tmp_path)}
    assert infos == {
        "lm_head": "linear",
        "model.embed_tokens": "embedding",
        "model.layers.0.mlp.up_proj": "linear",
    }


def test_file_classification_by_name_shape_and_dtype():
    assert file_layer_type("h.0.attn.c_attn.weight", (64, 192), "F32", True) == "conv1d"
    assert file_layer_type("h.0.attn.c_attn.weight", (64, 192), "F32", False) == "linear"
    assert file_layer_type("transformer.wte.weight", (1000, 64), "BF16", True) == "embedding"
    assert file_layer_type("embeddings.word_embeddings.weight", (9, 4), "F16", False) == (
        "embedding"
    )
    assert file_layer_type("layer1.0.conv1.weight", (8, 4, 3, 3), "F32", False) == "conv2d"
    assert file_layer_type("norm.weight", (64,), "F32", False) is None
    assert file_layer_type("h.0.attn.bias", (1, 1, 8, 8), "F32", False) is None  # a mask
    assert file_layer_type("embeddings.position_ids", (1, 512), "I64", False) is None


def test_file_order_is_natural_and_conv1d_naming_follows_config(tmp_path):
    tensors = {f"model.layers.{i}.mlp.c_fc.weight": torch.randn(8, 24) for i in (10, 2, 1)}
    tensors["model.norm.weight"] = torch.ones(8)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    infos = list_weight_matrices(tmp_path)
    assert [i.name for i in infos] == [f"model.layers.{i}.mlp.c_fc" for i in (1, 2, 10)]
    assert {i.layer_type for i in infos} == {"linear"}  # gpt_bigcode uses nn.Linear
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert {i.shape for i in list_weight_matrices(tmp_path)} == {(24, 8)}


def test_sharded_checkpoint_equals_single_file(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert index.exists()
    single = _as_dict(tmp_path / "single")
    for source in (tmp_path / "sharded", index):
        sharded = _as_dict(source)
        assert list(sharded) == list(single)
        assert all(torch.equal(sharded[k][1], single[k][1]) for k in single)


def test_select_sees_shapes_and_skipped_matrices_are_never_read(tmp_path, monkeypatch):
    model = cnn()
    save_file(
        {f"{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors"
    )
    loaded = []
    original = weights_module._SafetensorsSource._load_name

    def counting(self, name):
        loaded.append(name)
        return original(self, name)

    monkeypatch.setattr(weights_module._SafetensorsSource, "_load_name", counting)
    chosen = list(
        iter_weight_matrices(tmp_path / "m.safetensors", select=lambda i: len(i.shape) == 2)
    )
    assert [m.name for m in chosen] == ["6"] and loaded == ["6"]


def test_mlp_module_and_saved_file_agree(tmp_path):
    model = mlp()
    save_file(dict(model.state_dict()), tmp_path / "mlp.safetensors")
    from_module = _as_dict(model)
    from_file = _as_dict(tmp_path / "mlp.safetensors")
    assert list(from_module) == list(from_file) == ["0", "2", "4"]
    assert all(torch.equal(from_module[k][1], from_file[k][1]) for k in from_module)


def test_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such file or directory"):
        list_weight_matrices(tmp_path / "missing.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not safetensors" * 10)
    with pytest.raises(WeightsError, match="garbage.safetensors: not a readable safetensors"):
        list_weight_matrices(garbage)

    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(64, 64)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated.safetensors: not a readable"):
        list_weight_matrices(truncated)

    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    with pytest.raises(WeightsError, match="holds no tensors"):
        list_weight_matrices(empty)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="no safetensors weights"):
        list_weight_matrices(pickled)

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "shard-1.safetensors"}}))
    with pytest.raises(WeightsError, match="missing shard"):
        list_weight_matrices(index)

    with pytest.raises(WeightsError, match="expected a torch.nn.Module or a path"):
        list_weight_matrices(42)
    assert issubclass(WeightsError, ValueError)
