"""Bad requests fail with one clear TailwiseError before anything changes; saving round-trips."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from steps.core.blocks import BlocksNotFoundError
from steps.core.errors import TailwiseError
from steps.core.factory import build_model, load_model
from steps.prune import (
    REPORT_FILE,
    CalibrationError,
    PruneError,
    prune,
    report_calibration,
    save_pruned,
)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity 1.0 is outside \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity -0.1 is outside \[0, 1\)"),
        ({"nm": "4:4"}, "needs 1 <= N < M"),
        ({"nm": "5:4"}, "needs 1 <= N < M"),
        ({"nm": "2-4"}, "not of the form N:M"),
        ({"nm": "2:3"}, "input widths divisible by 3"),
        ({"nm": "2:4", "sparsity": 0.5}, "not both"),
        ({}, "give a sparsity"),
        ({"allocation": {"model.layers.0.mlp.up_proj": 1.5}}, "up_proj: sparsity 1.5"),
        ({"method": "random", "sparsity": 0.5}, "unknown pruning method 'random'"),
        ({"sparsity": 0.5, "batch_tokens": 0}, "batch_tokens must be a positive integer, got 0"),
        ({"sparsity": 0.5, "batch_tokens": 2.5}, "batch_tokens must be a positive integer"),
    ],
)
def test_bad_requests_change_nothing(request_: dict, message: str, tokenizer, kjv) -> None:
    model = build_model("tiny-llama")
    before = _weights(model)
    kwargs = {"method": "wanda", "calibration_text": kjv["validation"], **request_}
    with pytest.raises(PruneError, match=message) as info:
        prune(model, tokenizer, nsamples=2, seqlen=32, **kwargs)
    assert isinstance(info.value, TailwiseError)
    assert "\n" not in str(info.value)
    _assert_unchanged(model, before)


def test_allocation_naming_missing_layers_lists_a_few(tokenizer, kjv) -> None:
    allocation = pa.table(
        {
            "name": [f"model.layers.{i}.mlp.up_proj" for i in range(7)] + ["lm_head"],
            "sparsity": [0.5] * 8,
        }
    )
    with pytest.raises(PruneError) as info:
        prune(build_model("tiny-llama"), tokenizer, method="magnitude", allocation=allocation)
    message = str(info.value)
    assert "names 6 layer(s)" in message
    assert "model.layers.2.mlp.up_proj, model.layers.3.mlp.up_proj" in message
    assert "(and 3 more)" in message
    assert "model.layers.0.self_attn.q_proj" in message  # what the model does have


def test_allocation_file_is_read(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "decisions.parquet"
    pq.write_table(pa.table({"name": ["model.layers.1.mlp.down_proj"], "sparsity": [0.25]}), path)
    with pytest.warns(UserWarning, match="does not name 13 layer"):
        report = prune(build_model("tiny-llama"), method="magnitude", allocation=path)
    rows = {row["name"]: row for row in report.to_pylist()}
    assert rows["model.layers.1.mlp.down_proj"]["achieved"] == pytest.approx(0.25, abs=1e-4)
    with pytest.raises(PruneError, match="lacks column"):
        prune(build_model("tiny-llama"), method="magnitude", allocation=pa.table({"name": ["x"]}))


def test_calibration_text_shorter_than_one_sequence(tmp_path: Path, tokenizer) -> None:
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.")
    model = build_model("tiny-llama")
    before = _weights(model)
    with pytest.raises(CalibrationError, match="fewer than one sequence of 128") as info:
        prune(model, tokenizer, method="wanda", sparsity=0.5, calibration_text=short, seqlen=128)
    assert str(short) in str(info.value)
    _assert_unchanged(model, before)
    with pytest.raises(CalibrationError, match="does not exist"):
        prune(
            model,
            tokenizer,
            method="sparsegpt",
            sparsity=0.5,
            calibration_text=tmp_path / "no",
            seqlen=64,
        )
    with pytest.raises(PruneError, match="needs a tokenizer and a calibration text"):
        prune(model, tokenizer, method="wanda", sparsity=0.5)


def test_model_without_blocks(tokenizer, kjv) -> None:
    with pytest.raises(BlocksNotFoundError, match="TinyMLP: no decoder block list"):
        prune(build_model("mlp"), method="magnitude", sparsity=0.5)


def test_seqlen_longer_than_the_context_is_scaled_down(tokenizer, kjv) -> None:
    with pytest.warns(UserWarning, match="exceeds the model's context 256; using 256"):
        report = prune(
            build_model("tiny-llama"),
            tokenizer,
            method="wanda",
            sparsity=0.5,
            calibration_text=kjv["validation"],
            nsamples=1,
            seqlen=4096,
            device="cpu",
        )
    assert report_calibration(report) == {"nsamples": 1, "seqlen": 256,
                                           "requested_seqlen": 4096, "seed": 0}


def test_save_pruned_round_trips(tmp_path: Path, tokenizer) -> None:
    model = build_model("tiny-gpt2")
    report = prune(model, method="magnitude", sparsity=0.5)
    out = save_pruned(model, tokenizer, tmp_path / "pruned", report)
    assert (out / "model.safetensors").is_file()
    assert pq.read_table(out / REPORT_FILE).equals(report)
    reloaded = load_model(out)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary left behind
    with pytest.raises(PruneError, match="already exists"):
        save_pruned(model, tokenizer, out, report)
