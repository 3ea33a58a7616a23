"""Fine-tune delta spectra on fine-tunes the finetune step makes: W - W_base per matrix, and a
LoRA adapter's B A, checked against numpy on the same weights; bad bases refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from steps.core.registry import load_step
from steps.core.step import run_step
from steps.core.store import open_store
from steps.spectral import analyze
from steps.spectral.delta import DeltaError

TINY = {"dataset": "fortunes", "max_train_examples": 32, "max_eval_examples": 16,
        "epochs": 1, "batch_size": 16, "max_length": 32, "lr": 1e-2}


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    """tiny-llama, its full fine-tune and its LoRA (r = 4) fine-tune, as directories."""
    root = tmp_path_factory.mktemp("delta")
    store = open_store(str(root / "store"))
    base = run_step(load_step("build_model"), {"name": "tiny-llama"}, {}, store=store)
    base_digest = base.digests()["model"]
    full = run_step(load_step("finetune"), TINY, {"model": base_digest}, store=store)
    lora = run_step(load_step("finetune"), TINY | {"lora": 4}, {"model": base_digest},
                    store=store)
    dirs = {"base": base_digest, "full": full.digests()["model"],
            "lora": lora.digests()["model"], "adapter": lora.digests()["adapter"]}
    return {name: store.get(digest, root / name) for name, digest in dirs.items()}


def weights(model_dir) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors |= {k.removesuffix(".weight"): v.double().numpy()
                    for k, v in load_file(file).items()}
    return tensors


def top_eigenvalue(matrix: np.ndarray) -> float:
    return float(np.linalg.svd(matrix, compute_uv=False)[0] ** 2)


def test_full_fine_tune_delta_is_w_minus_w_base(fine_tunes) -> None:
    rows = analyze(fine_tunes["full"], base=fine_tunes["base"], device="cpu").to_pylist()
    tuned, base = weights(fine_tunes["full"]), weights(fine_tunes["base"])
    assert rows and {row["analysed"] for row in rows} == {"W - W_base"}
    assert "score" not in {row["name"] for row in rows}  # the new head has no base
    for row in rows:
        delta = tuned[row["name"]] - base[row["name"]]
        assert row["lambda_max"] == pytest.approx(top_eigenvalue(delta), rel=1e-6), row["name"]
        assert row["norm"] == pytest.approx(float((delta**2).sum()), rel=1e-6)


def test_lora_delta_is_the_scaled_adapter_product(fine_tunes) -> None:
    config = json.loads((fine_tunes["adapter"] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapter = {row["name"]: row for row in analyze(fine_tunes["adapter"], device="cpu").to_pylist()}
    delta = {row["name"]: row
             for row in analyze(fine_tunes["lora"], base=fine_tunes["base"],
                                device="cpu").to_pylist()}
    pieces = weights(fine_tunes["adapter"])
    assert adapter and {row["analysed"] for row in adapter.values()} == {"lora_BA"}
    for name, row in adapter.items():
        key = "base_model.model." + name
        product = pieces[f"{key}.lora_B"] @ pieces[f"{key}.lora_A"]
        assert row["lambda_max"] == pytest.approx(top_eigenvalue(product), rel=1e-6)
        assert row["matrix_rank"] <= config["r"]
        # The merged model's delta is the adapter's product scaled by lora_alpha / r.
        assert delta[name]["lambda_max"] == pytest.approx(scale**2 * row["lambda_max"],
                                                          rel=1e-3)
    frozen = [row for name, row in delta.items() if name not in adapter]
    assert frozen and all(row["norm"] == 0 for row in frozen)


def test_a_base_with_another_shape_is_refused(tmp_path) -> None:
    save_file({"layer.weight": torch.zeros(20, 30)}, tmp_path / "model.safetensors")
    save_file({"layer.weight": torch.zeros(20, 31)}, tmp_path / "base.safetensors")
    with pytest.raises(DeltaError, match="layer is 20 x 30 in .* but 20 x 31 in base"):
        analyze(tmp_path / "model.safetensors", base=tmp_path / "base.safetensors")


@pytest.mark.slow
def test_cli_base_of_another_architecture_exit_2_nothing_written(fine_tunes, tmp_path) -> None:
    from steps.core.factory import build_model, save_hf

    gpt2 = save_hf(build_model("tiny-gpt2", seed=0), None, tmp_path / "gpt2")
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "tailwise_cli", "spectral",
                           str(fine_tunes["full"]), "--base", str(gpt2)],
                          capture_output=True, text=True, timeout=600,
                          env=os.environ | {"TAILWISE_STORE": str(store)})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a gpt2 model" in lines[0] and "a llama model" in lines[0]
    assert not store.exists()
