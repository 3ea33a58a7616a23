"""Finding decoder blocks generically, and the block-by-block calibration capture."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LMS, tiny_model
from transformers.pytorch_utils import Conv1D

from steps.core.blocks import (
    BlocksNotFoundError,
    DeviceError,
    calibrated_blocks,
    find_blocks,
    outlier_ratios,
    resolve_device,
    weight_matrix,
)
from steps.core.errors import TailwiseError
from steps.core.factory import build_model


@pytest.mark.parametrize(
    ("name", "prefix", "first_layers"),
    [
        ("tiny-gpt2", "transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        (
            "tiny-llama",
            "model.layers",
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ],
        ),
        (
            "tiny-opt",
            "model.decoder.layers",
            [
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.q_proj",
                "self_attn.out_proj",
                "fc1",
                "fc2",
            ],
        ),
    ],
)
def test_find_blocks_and_their_layers(name: str, prefix: str, first_layers: list[str]) -> None:
    blocks = find_blocks(tiny_model(name))
    assert blocks.prefix == prefix
    assert len(blocks) == 2
    assert list(blocks.layers(1)) == [f"{prefix}.1.{layer}" for layer in first_layers]
    assert len(blocks.all_layers()) == 2 * len(first_layers)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_model_without_blocks_is_a_clear_error(name: str) -> None:
    with pytest.raises(BlocksNotFoundError, match="no decoder block list found") as info:
        find_blocks(build_model(name))
    assert isinstance(info.value, TailwiseError)


def test_conv1d_weight_is_seen_as_out_by_in() -> None:
    layer = find_blocks(build_model("tiny-gpt2")).all_layers()["transformer.h.0.mlp.c_fc"]
    assert isinstance(layer, Conv1D)
    matrix = weight_matrix(layer)
    assert matrix.shape == (512, 128)  # c_fc: 128 -> 512, stored (128, 512)
    matrix[3, 5] = 7.0  # a view: writes reach the parameter
    assert layer.weight[5, 3].item() == 7.0


def _stats_from_plain_forward(model: torch.nn.Module, input_ids: torch.Tensor):
    """Per-layer sum of x^2 and X^T X, hooked into ordinary full-model forwards."""
    layers = find_blocks(model).all_layers()
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            found = sums.setdefault(name, [0, 0])
            found[0] = found[0] + x.square().sum(0)
            found[1] = found[1] + x.t() @ x

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    with torch.no_grad():
        for row in input_ids:
            model(row.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return sums


@pytest.mark.parametrize("name", TINY_LMS)
@pytest.mark.parametrize("propagate", ["modified", "dense"])
def test_block_by_block_capture_matches_a_full_forward(
    name: str, propagate: str, calibration_ids: torch.Tensor
) -> None:
    """The captured block inputs (hidden states, masks, positions) reproduce the model."""
    model = tiny_model(name)
    expected = _stats_from_plain_forward(model, calibration_ids)
    seen = 0
    for block in calibrated_blocks(model, calibration_ids, hessian=True, propagate=propagate):
        for layer_name, stats in block.stats.items():
            sq_norms, hessian = expected[layer_name]
            assert stats.tokens == calibration_ids.numel()
            torch.testing.assert_close(stats.sq_norms, sq_norms, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(stats.hessian, hessian, rtol=1e-4, atol=1e-3)
            seen += 1
    assert seen == len(expected)


def test_next_block_sees_the_modified_block(calibration_ids: torch.Tensor) -> None:
    model = build_model("tiny-llama")
    dense = _stats_from_plain_forward(model, calibration_ids)
    last = "model.layers.1.self_attn.q_proj"
    for block in calibrated_blocks(model, calibration_ids):
        if block.index == 0:
            weight_matrix(block.layers["model.layers.0.mlp.down_proj"]).zero_()
        else:
            changed = block.stats[last].sq_norms
    assert not torch.allclose(changed, dense[last][0], rtol=1e-3)


@pytest.mark.parametrize("name", TINY_LMS)
def test_outlier_ratios_pool_each_block_as_owl(name: str, calibration_ids: torch.Tensor) -> None:
    """Brute force: per block, the share of all |W| * ||X|| scores above 5x their mean."""
    model = tiny_model(name)
    table = outlier_ratios(model, calibration_ids).to_pylist()
    layers = find_blocks(model).all_layers()
    norms = {n: s[0].sqrt() for n, s in _stats_from_plain_forward(model, calibration_ids).items()}
    assert [row["name"] for row in table] == list(layers)
    for block in (0, 1):
        rows = [row for row in table if row["block"] == block]
        scores = torch.cat(
            [(weight_matrix(layers[r["name"]]).abs() * norms[r["name"]]).flatten() for r in rows]
        )
        owl_ratio = (scores > 5 * scores.mean()).float().mean().item()
        weighted = sum(r["outlier_ratio"] * r["N"] * r["M"] for r in rows) / scores.numel()
        assert weighted == pytest.approx(owl_ratio, abs=1e-6)
        assert 0 < owl_ratio < 0.5


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
