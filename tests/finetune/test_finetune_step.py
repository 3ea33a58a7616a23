"""The finetune step on a tiny LLaMA and tiny data: run_step and the container command agree,
the low-data subset is recorded, LoRA trains only LoRA and head, TempBalance history lands
in the table, bad params write nothing, an interrupted run resumes to the same result, the
CLI works; and one short MiniLM LoRA run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from steps.core.errors import ParamsError
from steps.core.factory import build_model, byte_tokenizer, save_hf
from steps.core.step import run_step
from steps.core.store import open_store
from steps.core.tracking import NullTracker, StepRun
from steps.core.training.text import Example, read_dataset, write_jsonl
from steps.finetune.hf import FinetuneConfig, add_lora, balance_view, finetune, load_classifier
from steps.finetune.step import STEP

FAST = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "max_length": 24, "device": "cpu"}


def toy_examples(n: int = 48) -> list[Example]:
    """Two learnable classes: sentences about numbers and about animals."""
    animals = ["cat", "dog", "horse", "owl", "fox", "bear"]
    out = []
    for i in range(n):
        if i % 2:
            out.append(Example(f"the sum of {i} and {i * 3} is {i * 4}", "numbers"))
        else:
            out.append(Example(f"a {animals[i % 6]} sleeps near the {animals[(i + 1) % 6]}",
                               "animals"))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model = save_hf(build_model("tiny-llama", seed=0), byte_tokenizer(), root / "llama")
    data = write_jsonl(toy_examples(), root / "toy.jsonl")
    return root, model, data


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILWISE_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    return open_store(str(tmp_path / "store"))


def inputs_of(store, tiny) -> dict[str, str]:
    _, model, data = tiny
    return {"model": store.put(model, "model").digest,
            "data": store.put(data, "text-classification").digest}


def read_json(store, digest: str, tmp_path: Path) -> dict:
    return json.loads(store.get(digest, tmp_path / f"{digest[:8]}.json").read_text())


def test_step_outputs_history_subset_and_module_command_agree(tiny, store, tmp_path):
    params = FAST | {"tempbalance": "linear", "fraction": 0.5, "seed": 1}
    result = run_step(STEP, params, inputs_of(store, tiny), store=store)
    assert {"model", "history", "subset", "metrics", "plots"} <= set(result.outputs)

    subset = read_json(store, result.digests()["subset"], tmp_path)
    data = read_dataset(tiny[2])
    assert subset["subset_size"] == round(0.5 * subset["train_size"]) == len(subset["indices"])
    labels = [data.examples[line].label for line in subset["lines"]]
    assert labels.count("numbers") == labels.count("animals")  # stratified
    assert all(data.examples[line].split == "train" for line in subset["lines"])

    history = pq.read_table(store.get(result.digests()["history"], tmp_path / "h.parquet"))
    assert sorted(set(history["epoch"].to_pylist())) == [0, 1, 2]
    layers = set(history["layer"].to_pylist())
    assert "model.layers.0.self_attn.q_proj" in layers and "score" not in layers
    assert all(a == a and a > 0 for a in history["alpha"].to_pylist())  # not NaN
    factors = history["lr_factor"].to_pylist()
    assert min(factors) >= 0.5 - 1e-12 and max(factors) <= 1.5 + 1e-12 and len(set(factors)) > 1

    metrics = read_json(store, result.digests()["metrics"], tmp_path)
    assert metrics["epochs"] == 2 and metrics["train_examples"] == subset["subset_size"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0

    model_dir = store.get(result.digests()["model"], tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "animals", "1": "numbers"}

    # The container command, in a fresh process and store, makes byte-identical outputs.
    other = open_store(str(tmp_path / "other"))
    request = {"params": params, "inputs": inputs_of(other, tiny), "store": str(tmp_path /
               "other"), "tracking": False}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run([sys.executable, "-m", "steps.finetune", "--request",
                           str(tmp_path / "request.json")], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"TAILWISE_CHECKPOINT_DIR":
                                                         str(tmp_path / "ck2")})
    assert done.returncode == 0, done.stderr
    digests = {k: v["digest"] for k, v in json.loads(done.stdout)["outputs"].items()}
    assert digests == result.digests()
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir())  # removed once the outputs are stored


@pytest.mark.parametrize(("params", "message"), [
    ({"fraction": 0.0}, "invalid parameter fraction"),
    ({"fraction": 1.5}, "invalid parameter fraction"),
    ({"tempbalance": "linear", "tb_low": 1.5, "tb_high": 1.5}, "tb_low"),
    ({"optimizer": "adam"}, "invalid parameter optimizer"),
    ({"schedule": "step"}, "invalid parameter schedule"),
    ({"schedule": "linear", "warmup": 1.0}, "invalid parameter warmup"),
    ({"warmup": 0.06}, "warmup .* is for schedule linear only"),
])
def test_bad_params_write_nothing(tiny, store, params, message):
    inputs = inputs_of(store, tiny)
    before = {m.digest for m in store.list()}
    with pytest.raises(ParamsError, match=message):
        run_step(STEP, FAST | params, inputs, store=store)
    assert {m.digest for m in store.list()} == before and store.cache_entries() == []


def test_linear_schedule_reaches_the_loop(tiny, store, tmp_path):
    """schedule=linear steps HF's linear schedule per optimiser step: after epoch 1 of 2 the
    lr is lr x (total - steps) / (total - warmup steps), 0 at the end."""
    params = FAST | {"schedule": "linear", "warmup": 0.1}
    result = run_step(STEP, params, inputs_of(store, tiny), store=store)
    metrics = read_json(store, result.digests()["metrics"], tmp_path)
    steps = math.ceil(metrics["train_examples"] / FAST["batch_size"])
    total, warmup = 2 * steps, math.ceil(0.1 * 2 * steps)
    history = pq.read_table(store.get(result.digests()["history"], tmp_path / "h.parquet"))
    assert history["lr"].to_pylist() == pytest.approx(
        [0.0, FAST["lr"] * (total - steps) / (total - warmup), 0.0], rel=1e-12)


def test_missing_label_names_file_and_line(tiny, store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "no label here"}\n')
    inputs = {"model": store.put(tiny[1], "model").digest, "data": store.put(bad, "t").digest}
    before = {m.digest for m in store.list()}
    with pytest.raises(Exception, match=r"line 2: missing or empty 'label'"):
        run_step(STEP, FAST, inputs, store=store)
    assert {m.digest for m in store.list()} == before
    with pytest.raises(ParamsError, match="not both or neither"):
        run_step(STEP, FAST | {"dataset": "fortunes"}, inputs, store=store)


def test_lora_trains_only_lora_and_head(tiny):
    _, model_dir, data_path = tiny
    data = read_dataset(data_path)
    model, tokenizer, heads = load_classifier(model_dir, data.labels, seed=0)
    model = add_lora(model, 4, heads)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = FinetuneConfig(**(FAST | {"tempbalance": "sigmoid", "tb_every_steps": 2}))
    view, groups = balance_view(model, config.lr)
    result = finetune(model, tokenizer, view, groups, data.split("train"),
                      data.split("validation"), config)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or "score" in n for n in changed), sorted(changed)
    assert any("score" in n for n in changed) and any("lora_B" in n for n in changed)
    # alpha of the effective weights W0 + BA: one value per adapted block layer
    assert len(result.records[-1].alphas) == 2 * 7


class FailingRun(StepRun):
    """An MLflow run whose server goes away while epoch 2 is being logged."""

    def log_metrics(self, metrics, step=None):
        if step == 2:
            raise ConnectionError("tracking server went away")


class FailingTracker(NullTracker):
    @contextmanager
    def step_run(self, name, params, parent_run_id=None):
        yield FailingRun(None, None)


class RecordingRun(StepRun):
    logged: list = []

    def log_metrics(self, metrics, step=None):
        RecordingRun.logged.append((step, dict(metrics)))


class RecordingTracker(NullTracker):
    @contextmanager
    def step_run(self, name, params, parent_run_id=None):
        yield RecordingRun(None, None)


def digest_of_weights(store, result, tmp_path: Path) -> str:
    model_dir = store.get(result.digests()["model"], tmp_path / result.digests()["model"][:8])
    tensors = load_file(str(model_dir / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].numpy().tobytes())
    return h.hexdigest()


def test_interrupted_run_resumes_to_the_same_result(tiny, store, tmp_path):
    params = FAST | {"epochs": 3, "tempbalance": "sigmoid", "tb_every_steps": 2}
    inputs = inputs_of(store, tiny)
    with pytest.raises(ConnectionError):
        run_step(STEP, params, inputs, store=store, tracker=FailingTracker())
    saved = list((tmp_path / "checkpoints").glob("finetune-*/epoch-*"))
    assert [p.name for p in saved] == ["epoch-2"]  # the last completed epoch only
    assert store.cache_entries() == []

    RecordingRun.logged.clear()
    resumed = run_step(STEP, params, inputs, store=store, tracker=RecordingTracker())
    steps = [step for step, _ in RecordingRun.logged if step]
    assert steps == [3, 1, 2], "resumed at epoch 3, then logged the earlier epochs"
    assert not saved[0].exists()

    fresh_store = open_store(str(tmp_path / "fresh"))
    uninterrupted = run_step(STEP, params, inputs_of(fresh_store, tiny), store=fresh_store)
    assert resumed.digests() == uninterrupted.digests()
    assert digest_of_weights(store, resumed, tmp_path) == digest_of_weights(
        fresh_store, uninterrupted, tmp_path)


def test_cli_help_and_small_run(tiny, tmp_path):
    env = os.environ | {"TAILWISE_STORE": str(tmp_path / "store"),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "TAILWISE_CHECKPOINT_DIR": str(tmp_path / "ck")}
    cli = [sys.executable, "-m", "tailwise_cli", "finetune"]
    helped = subprocess.run([*cli, "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--tempbalance" in helped.stdout
    assert "--schedule" in helped.stdout and "--warmup" in helped.stdout
    _, model, data = tiny
    done = subprocess.run([*cli, str(model), "--data", str(data), "--fraction", "0.5",
                           "--tempbalance", "linear", "--lora", "4", "--epochs", "1",
                           "--lr", "3e-3", "--max-length", "24", "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test_accuracy" in done.stdout
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    bad = subprocess.run([*cli, str(model), "--data", str(data), "--fraction", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "invalid parameter fraction" in bad.stderr


def test_minilm_head_and_lora_on_64_fortunes(store, tmp_path):
    from steps.core.pretrained import minilm_dir

    params = {"dataset": "fortunes", "max_train_examples": 64, "max_eval_examples": 32,
              "lora": 8, "epochs": 1, "batch_size": 16, "lr": 1e-3, "max_length": 32,
              "device": "cpu", "tempbalance": "sigmoid"}
    model = store.put(minilm_dir(), "model").digest
    result = run_step(STEP, params, {"model": model}, store=store)
    metrics = read_json(store, result.digests()["metrics"], tmp_path)
    assert metrics["train_examples"] == 64 and metrics["test_examples"] == 32
    assert metrics["train_loss"] == metrics["train_loss"]  # a number, not NaN
    history = pq.read_table(store.get(result.digests()["history"], tmp_path / "h.parquet"))
    assert "bert.encoder.layer.0.attention.self.query" in history["layer"].to_pylist()
    assert "data" in result.outputs  # the built-in set is stored for lineage


def test_alphalora_experts_from_a_decisions_table(tiny, store, tmp_path):
    import pyarrow as pa

    from steps.finetune.molora import load_molora, molora_layers

    table = tmp_path / "decisions.parquet"
    pq.write_table(pa.table({"block": [0, 1], "experts": [1, 3]}), table)
    inputs = inputs_of(store, tiny) | {"experts": store.put(table, "decisions").digest}
    with pytest.raises(ParamsError, match="tempbalance with experts"):
        run_step(STEP, FAST | {"tempbalance": "linear"}, inputs, store=store)
    result = run_step(STEP, FAST | {"lora": 4}, inputs, store=store)
    assert store.stat(result.digests()["adapter"]).kind == "molora-adapter"
    model_dir = store.get(result.digests()["model"], tmp_path / "model")
    adapter = store.get(result.digests()["adapter"], tmp_path / "adapter.safetensors")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    layers = molora_layers(load_molora(model, adapter))
    assert {layer.num_experts for layer in layers.values()} == {1, 3}
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())  # trained
