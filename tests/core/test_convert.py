"""`tailwise convert`: a state dict -> safetensors with the same alphas; pickles that need
more than tensors are refused, never run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from steps.core.convert import ConvertError, convert_checkpoint
from steps.core.factory import build_model, load_model
from steps.core.weights import WeightsError, open_weights
from steps.spectral import analyze
from tailwise_cli import app


def alphas(source) -> dict[str, float]:
    metrics = analyze(source, device="cpu", workers=1)
    return dict(zip(metrics.column("name").to_pylist(), metrics.column("alpha").to_pylist(),
                    strict=True))


@pytest.mark.slow  # transformers import and load
def test_state_dict_converts_to_an_hf_dir_with_the_same_alphas(tmp_path):
    model = build_model("tiny-gpt2", seed=3)  # lm_head shares wte's storage
    torch.save({"model": model.state_dict(), "epoch": 7}, tmp_path / "ckpt.pth")
    model.config.architectures = ["GPT2LMHeadModel"]  # as a saved HF config names it
    model.config.to_json_file(tmp_path / "config.json")

    done = convert_checkpoint(tmp_path / "ckpt.pth", tmp_path / "hf",
                              config=tmp_path / "config.json")

    assert done.nested_key == "model" and "lm_head.weight" in done.shared
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    expected = alphas(model)
    got = alphas(tmp_path / "hf")
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[n] for n in expected], list(expected.values()), rtol=1e-12)
    # transformers reads the directory back, tied head included.
    reloaded = load_model(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_plain_state_dict_without_config_and_views(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    state = {"a.weight": base[:2], "b.weight": base.t(), "step": torch.tensor(5)}
    torch.save(state, tmp_path / "views.pt")
    done = convert_checkpoint(tmp_path / "views.pt", tmp_path / "out")
    from safetensors.torch import load_file

    back = load_file(tmp_path / "out" / "model.safetensors")
    assert back.keys() == state.keys() and done.shared == ["b.weight"]
    assert all(torch.equal(back[k], v) for k, v in state.items())


class Planted:
    """Unpickling this would create `marker` (what a malicious checkpoint does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_with_an_arbitrary_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(3, 3), "x": Planted(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ConvertError) as refused:
        convert_checkpoint(tmp_path / "evil.pth", tmp_path / "out")
    message = str(refused.value)
    assert "evil.pth: refused" in message and "GLOBAL io.open" in message  # builtins.open
    assert "\n" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.pth"]  # no temp dir left behind


@pytest.mark.parametrize(("content", "expected"), [
    ([torch.ones(2)], "holds a list, not a state dict"),
    ({"epoch": 3, "opt": {"lr": 0.1}}, "no tensors at this level"),
])
def test_checkpoints_without_a_state_dict_are_one_line_errors(tmp_path, content, expected):
    torch.save(content, tmp_path / "c.pt")
    with pytest.raises(ConvertError, match=expected):
        convert_checkpoint(tmp_path / "c.pt", tmp_path / "out")


def test_spectral_names_convert_for_a_pickled_checkpoint_and_the_cli_converts(tmp_path):
    model = build_model("mlp", seed=0)
    torch.save(model.state_dict(), tmp_path / "mlp.bin")
    with pytest.raises(WeightsError, match=r"tailwise convert .*mlp\.bin --output DIR"):
        open_weights(tmp_path / "mlp.bin")

    runner = CliRunner()
    done = runner.invoke(app, ["convert", str(tmp_path / "mlp.bin"), "--output",
                               str(tmp_path / "st")])
    assert done.exit_code == 0, done.output
    assert "model.safetensors" in done.output
    got, expected = alphas(tmp_path / "st"), alphas(model)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[n] for n in expected], list(expected.values()), rtol=1e-12)
    again = runner.invoke(app, ["convert", str(tmp_path / "mlp.bin"), "--output",
                                str(tmp_path / "st")])
    assert isinstance(again.exception, ConvertError)
    assert "exists and is not an empty directory" in str(again.exception)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_cli_refusal_is_one_line_exit_2_and_writes_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.save({"x": Planted(str(tmp_path / "ran"))}, tmp_path / "evil.pt")
    done = subprocess.run([sys.executable, "-m", "tailwise_cli", "convert",
                           str(tmp_path / "evil.pt"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True,
                          timeout=300, env=os.environ | {
                              "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "refused" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_a_directory_of_bin_shards_with_its_index_and_config(tmp_path):
    import json

    model = build_model("tiny-llama", seed=1)
    old = tmp_path / "old_hf"
    old.mkdir()
    state = model.state_dict()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        torch.save({n: state[n] for n in shard_names}, old / shard)
    (old / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {n: shard for shard, ns in shards.items() for n in ns}}))
    model.config.to_json_file(old / "config.json")
    with pytest.raises(WeightsError, match=rf"tailwise convert {old} --output DIR"):
        open_weights(old)

    done = convert_checkpoint(old, tmp_path / "new")

    assert done.tensors == len(names) and done.side_files == ["config.json"]
    got, expected = alphas(tmp_path / "new"), alphas(model)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[n] for n in expected], list(expected.values()), rtol=1e-12)
