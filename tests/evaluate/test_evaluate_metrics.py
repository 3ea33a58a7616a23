"""Perplexity, accuracy, sparsity, parameter count and size on disk, one row per model."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from steps.core.data import kjv_splits
from steps.core.factory import build_model, byte_tokenizer, save_hf
from steps.evaluate import (
    EvaluationError,
    accuracy,
    achieved_sparsity,
    evaluate_model_dir,
    parameter_count,
    perplexity,
    perplexity_of_ids,
    size_on_disk,
    tokenize_file,
    write_rows,
)


@pytest.fixture(scope="module")
def test_text() -> Path:
    return kjv_splits()["test"]


def test_perplexity_is_exp_of_the_mean_loss_over_non_overlapping_windows() -> None:
    model = build_model("tiny-llama")
    ids = torch.arange(1000) % 251  # 3 windows of 300; the last 100 tokens are dropped
    losses = []
    with torch.no_grad():
        for start in (0, 300, 600):
            window = ids[start : start + 300].unsqueeze(0)
            losses.append(model(input_ids=window, labels=window).loss.item())
    expected = math.exp(sum(losses) / 3)
    assert perplexity_of_ids(model, ids, seqlen=300, device="cpu") == pytest.approx(expected)
    first_only = perplexity_of_ids(model, ids, seqlen=300, max_windows=1, device="cpu")
    assert first_only == pytest.approx(math.exp(losses[0]))


def test_untrained_model_is_about_as_bad_as_uniform_guessing(test_text: Path) -> None:
    """A random 257-token model predicts nearly uniformly: perplexity close to 257."""
    model = build_model("tiny-gpt2")
    value = perplexity(model, byte_tokenizer(), test_text, max_windows=2, device="cpu")
    assert 150 < value < 400


def test_text_shorter_than_one_window_is_an_error(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Jesus wept.")
    with pytest.raises(EvaluationError, match="fewer than one window of 256"):
        perplexity(build_model("tiny-llama"), byte_tokenizer(), short, device="cpu")
    with pytest.raises(EvaluationError, match="does not exist"):
        tokenize_file(byte_tokenizer(), tmp_path / "missing.txt")


def test_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 0])) == 0.75
    with pytest.raises(EvaluationError, match="do not match"):
        accuracy(logits, torch.tensor([1, 0]))


def test_sparsity_counts_zeros_in_block_layers_only() -> None:
    model = build_model("tiny-llama")
    assert achieved_sparsity(model) == 0.0
    layers = [
        m
        for n, m in model.named_modules()
        if n.startswith("model.layers.0.mlp.") and isinstance(m, torch.nn.Linear)
    ]
    zeroed = sum(layer.weight.numel() for layer in layers)
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
        model.lm_head.weight[:10].zero_()  # the head is not a prunable block layer
    block_weights = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    )
    assert achieved_sparsity(model) == pytest.approx(zeroed / block_weights)
    # Without decoder blocks, every Linear layer counts.
    assert achieved_sparsity(build_model("mlp")) == 0.0


def test_parameter_count_counts_tied_weights_once() -> None:
    model = build_model("tiny-gpt2")  # lm_head shares the token embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert parameter_count(model) == sum(unique.values())
    assert parameter_count(model) < sum(t.numel() for t in model.state_dict().values())


def test_one_row_per_model_directory(tmp_path: Path, test_text: Path) -> None:
    model_dir = save_hf(build_model("tiny-llama"), byte_tokenizer(), tmp_path / "model")
    row = evaluate_model_dir(
        model_dir, perplexity_text=test_text, seqlen=128, max_windows=2, device="cpu"
    )
    assert row["params"] == parameter_count(build_model("tiny-llama"))
    assert row["size_bytes"] == size_on_disk(model_dir) > 4 * row["params"]
    assert row["seqlen"] == 128 and row["sparsity"] == 0.0 and row["perplexity"] > 1
    plain = evaluate_model_dir(model_dir)
    assert plain["perplexity"] is None
    table = pq.read_table(write_rows([row, plain], tmp_path / "metrics.parquet"))
    assert table.num_rows == 2
    assert table.column("perplexity").to_pylist() == [row["perplexity"], None]
