"""Finding decoder blocks generically, and the block-by-block calibration capture."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LMS, tiny_model
from transformers.pytorch_utils import Conv1D

from steps.core.blocks import (
    BlocksNotFoundError,
    calibrated_blocks,
    find_blocks,
    outlier_ratios,
    sequences_per_chunk,
    weight_matrix,
)
from steps.core.devices import DeviceError, resolve_device
from steps.core.errors import TailwiseError
from steps.core.factory import build_model
from steps.prune import Pattern, wanda


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
            torch.testing.assert_close(stats.sq_norms.float(), sq_norms, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(stats.hessian.float(), hessian, rtol=1e-4, atol=1e-3)
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
    assert not torch.allclose(changed.float(), dense[last][0], rtol=1e-3)


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


def test_sequences_per_chunk_fit_the_token_budget(calibration_ids: torch.Tensor) -> None:
    assert calibration_ids.shape == (4, 64)
    assert sequences_per_chunk(calibration_ids, 1) == 1  # always at least one sequence
    assert sequences_per_chunk(calibration_ids, 191) == 2
    assert sequences_per_chunk(calibration_ids, 192) == 3
    assert sequences_per_chunk(calibration_ids, 10**6) == 4
    for bad in (0, -64, 64.0, True):
        with pytest.raises(ValueError, match="batch_tokens must be a positive integer"):
            sequences_per_chunk(calibration_ids, bad)


def _calibrate_and_prune(name: str, input_ids: torch.Tensor, batch_tokens: int):
    """Per-layer statistics of a Wanda run at 50 % (modified propagation), and the weights."""
    model = tiny_model(name)
    stats = {}
    for block in calibrated_blocks(model, input_ids, hessian=True, batch_tokens=batch_tokens):
        stats.update(block.stats)
        for layer_name, layer in block.layers.items():
            wanda.prune_layer(layer, block.stats[layer_name], Pattern(0.5))
    return stats, model.state_dict()


@pytest.mark.parametrize("name", TINY_LMS)
def test_chunked_calibration_matches_batch_one(name: str, calibration_ids: torch.Tensor) -> None:
    """Chunks of 3 sequences (4 = 3 + 1, a smaller last chunk) and one chunk of all 4 give the
    batch-1 statistics up to float rounding, and the same Wanda masks."""
    stats_1, weights_1 = _calibrate_and_prune(name, calibration_ids, batch_tokens=64)
    for batch_tokens in (3 * 64, 10**6):
        stats, weights = _calibrate_and_prune(name, calibration_ids, batch_tokens)
        assert list(stats) == list(stats_1)
        for layer_name, expected in stats_1.items():
            assert stats[layer_name].tokens == expected.tokens == calibration_ids.numel()
            torch.testing.assert_close(stats[layer_name].sq_norms, expected.sq_norms)
            torch.testing.assert_close(
                stats[layer_name].hessian, expected.hessian, rtol=1e-5, atol=1e-4
            )
        for key, value in weights_1.items():
            assert torch.equal(weights[key] == 0, value == 0), key
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("propagate", ["modified", "dense"])
def test_statistics_pass_stops_at_the_last_layer_input(
    propagate: str, calibration_ids: torch.Tensor
) -> None:
    """With modified propagation the block's last layer (down_proj) runs only when its output
    is needed: in the propagation pass (not after the model's last block, whose output no
    block reads), and once in the very first run (which finds it)."""
    model = build_model("tiny-llama")
    calls = {0: 0, 1: 0}
    handles = [
        block.mlp.down_proj.register_forward_hook(
            lambda *_args, i=i: calls.__setitem__(i, calls[i] + 1)
        )
        for i, block in enumerate(find_blocks(model).modules)
    ]
    chunks = len(calibration_ids)  # batch_tokens=64: one sequence per chunk
    for block in calibrated_blocks(model, calibration_ids, propagate=propagate, batch_tokens=64):
        assert block.stats[f"model.layers.{block.index}.mlp.down_proj"].tokens == 4 * 64
    for handle in handles:
        handle.remove()
    if propagate == "modified":
        assert calls == {0: chunks + 1, 1: 0}
    else:
        assert calls == {0: chunks, 1: chunks}
