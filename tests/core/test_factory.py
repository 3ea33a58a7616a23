"""Tiny seeded models: determinism, forward shapes, save/load round trips, the tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from steps.core import factory


def _weight_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {
        name: tensor.detach().contiguous().numpy().tobytes()
        for name, tensor in model.state_dict().items()
    }


def _example_input(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if name in factory.LM_NAMES:
        return torch.randint(0, factory.TINY_LM_VOCAB_SIZE, (2, 16), generator=generator)
    if name == "cnn":
        return torch.rand(4, 1, 8, 8, generator=generator)
    return torch.rand(4, 64, generator=generator)


def _output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", factory.MODEL_NAMES)
def test_same_seed_gives_identical_weights(name):
    first = _weight_bytes(factory.build_model(name, seed=7))
    second = _weight_bytes(factory.build_model(name, seed=7))
    other = _weight_bytes(factory.build_model(name, seed=8))
    assert first == second
    assert first.keys() == other.keys()
    assert first != other


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    factory.build_model("mlp", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "name, expected_shape",
    [
        ("tiny-gpt2", (2, 16, factory.TINY_LM_VOCAB_SIZE)),
        ("tiny-llama", (2, 16, factory.TINY_LM_VOCAB_SIZE)),
        ("cnn", (4, 10)),
        ("mlp", (4, 10)),
    ],
)
def test_forward_shapes(name, expected_shape):
    model = factory.build_model(name, seed=0)
    out = _output(model, _example_input(name))
    assert out.shape == expected_shape
    assert torch.isfinite(out).all()


def test_models_are_small_but_have_real_layers():
    gpt2 = factory.build_model("tiny-gpt2")
    llama = factory.build_model("tiny-llama")
    assert gpt2.config.n_layer == 2 and gpt2.config.n_embd == 128
    assert llama.config.num_hidden_layers == 2 and llama.config.hidden_size == 128
    assert sum(p.numel() for p in gpt2.parameters()) < 1_000_000
    cnn = factory.build_model("cnn")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in cnn.modules())


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'resnet'.*tiny-gpt2"):
        factory.build_model("resnet")


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = factory.byte_tokenizer()
    text = "In the beginning — naïve café ✓\n\ttabs"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert max(ids) < factory.BYTE_VOCAB_SIZE
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == factory.EOS_TOKEN_ID
    assert len(tokenizer) == factory.TINY_LM_VOCAB_SIZE


@pytest.mark.parametrize("name", factory.LM_NAMES)
def test_lm_save_and_reload_as_hf_directory(name, tmp_path):
    from transformers import AutoTokenizer

    model = factory.build_model(name, seed=1)
    out = factory.save_hf(model, factory.byte_tokenizer(), tmp_path / name)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    reloaded = factory.load_model(out)
    assert type(reloaded) is type(model)
    x = _example_input(name)
    assert torch.equal(_output(reloaded, x), _output(model, x))
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer("abc")["input_ids"] == factory.byte_tokenizer()("abc")["input_ids"]


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_plain_model_save_and_reload(name, tmp_path):
    model = factory.build_model(name, seed=2)
    if name == "cnn":
        # Make BatchNorm running statistics non-trivial so the reload has to restore them.
        model.train()
        with torch.no_grad():
            model(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
        model.eval()
    out = factory.save_hf(model, None, tmp_path / name)
    spec = json.loads((out / factory.PLAIN_CONFIG_FILE).read_text())
    assert spec["kind"] == name
    assert set(load_file(str(out / factory.WEIGHTS_FILE))) == set(model.state_dict())
    reloaded = factory.load_model(out)
    assert reloaded.config == model.config
    assert _weight_bytes(reloaded) == _weight_bytes(model)
    x = _example_input(name)
    assert torch.equal(_output(reloaded, x), _output(model, x))


def test_cnn_for_28x28_inputs():
    model = factory.TinyCNN(factory.CNNConfig(image_size=28))
    assert _output(model.eval(), torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_save_rejects_unknown_plain_module(tmp_path):
    with pytest.raises(TypeError, match="cannot save Linear"):
        factory.save_hf(torch.nn.Linear(2, 2), None, tmp_path / "linear")


def test_width_scales_the_plain_models_and_round_trips(tmp_path):
    build_model, load_model, save_hf = factory.build_model, factory.load_model, factory.save_hf
    mlp = build_model("mlp", seed=1, width=32)
    assert [m.out_features for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [32, 32, 10]
    cnn = build_model("cnn", seed=1, width=8)
    assert cnn.features[0].out_channels == 8 and cnn.features[3].out_channels == 16
    again = load_model(save_hf(mlp, None, tmp_path / "mlp"))
    x = torch.randn(4, 64)
    torch.testing.assert_close(again(x), mlp(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="width applies to the plain models"):
        build_model("tiny-llama", width=8)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        build_model("mlp", width=0)
