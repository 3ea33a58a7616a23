"""The finetune step: an HF model + text-classification data -> a fine-tuned classifier.

Full fine-tuning, LoRA (``lora=r``) or AlphaLoRA's mixture of LoRA experts (an ``experts``
decisions table), each with or without TempBalance (``tempbalance=linear|sigmoid``), on the
whole training split or a seeded low-data ``fraction`` of it.

Outputs: ``model`` (an HF safetensors directory with the tokenizer; with LoRA the adapter is
merged in, so it loads without PEFT), ``adapter`` (LoRA: the PEFT adapter directory;
experts: the MoLoRA safetensors file, to load on ``model`` with ``load_molora``),
``history`` (Parquet, one row per epoch and balanced layer), ``subset`` (JSON: which training
examples were used), ``metrics`` (JSON: final losses and accuracies), ``plots`` (alpha and lr
factor heatmaps, with TempBalance) and ``data`` (the built-in data set, when one was used).

Resume: after every epoch a checkpoint goes to $TAILWISE_CHECKPOINT_DIR (default
<cache>/checkpoints) under this run's cache key; a rerun with the same cache key resumes
from the last completed epoch and gives the same outputs as an uninterrupted run. The
directory is an environment variable, not a param, because where checkpoints live does not
change the result and must not change the cache key. A ``checkpoint`` input (an ``epoch-N``
directory) resumes from that checkpoint instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_validator

from steps.core.errors import ParamsError
from steps.core.step import Output, Step, StepContext, cache_key

CHECKPOINT_ENV = "TAILWISE_CHECKPOINT_DIR"
PLAIN_DATASETS = ("digits", "iris", "wine", "breast_cancer")  # scikit-learn's bundled sets


class FinetuneParams(BaseModel):
    dataset: Literal["fortunes", "kjv-testament", *PLAIN_DATASETS] | None = Field(
        None, description="A built-in data set instead of the data input: text "
        "classification (fortunes, kjv-testament) for HF models, or a scikit-learn set for a "
        "plain mlp / cnn (trained from its initial weights: the model zoo).")
    split_seed: int = Field(0, ge=0, description="Seed of the train/validation/test split "
                            "(built-in sets, and files without a split field).")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of the training split "
                            "used (a stratified, seeded low-data subset).")
    max_train_examples: int | None = Field(None, ge=1, description="Cap the training split "
                                           "first (stratified), then take the fraction.")
    max_eval_examples: int | None = Field(None, ge=1, description="Cap validation and test "
                                          "(stratified) for fast runs.")
    seed: int = Field(0, ge=0, description="Seed of the subset, head init, shuffling, dropout.")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-5, gt=0.0, description="Peak learning rate (of the schedule).")
    optimizer: Literal["sgd", "adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "linear"] = Field(
        "cosine", description="Learning-rate schedule: cosine over epochs (stepped per epoch), "
        "or linear (HF's get_linear_schedule_with_warmup, stepped per optimiser step: warmup "
        "to lr, then linear decay to 0; the TB_Sigmoid paper's, with warmup 0.06).")
    warmup: float = Field(0.0, ge=0.0, lt=1.0, description="linear schedule: the first "
                          "ceil(warmup x all optimiser steps) ramp the lr up from 0.")
    tempbalance: Literal["none", "linear", "sigmoid"] = Field(
        "none", description="linear: TB (factors in [tb_low, tb_high]); sigmoid: TB_Sigmoid.")
    tb_low: float = Field(0.5, gt=0.0, description="linear rule: lowest lr factor.")
    tb_high: float = Field(1.5, gt=0.0, description="linear rule: highest lr factor.")
    tb_scale: float | None = Field(None, gt=0.0, description="sigmoid rule: one s for both "
                                   "sides (default: tb_scale_low / tb_scale_high).")
    tb_scale_low: float = Field(2.0, gt=0.0, description="sigmoid rule: s below the mean "
                                "alpha (the reference's 2).")
    tb_scale_high: float = Field(1.0, gt=0.0, description="sigmoid rule: s above the mean "
                                 "alpha (the reference's 1).")
    tb_every_steps: int | None = Field(None, ge=1, description="Recompute alpha every K "
                                       "optimiser steps (default: per epoch for linear, "
                                       "min(100, steps/10) for sigmoid).")
    tb_farms: bool = Field(False, description="TempBalance alpha on FARMS windows (the FARMS "
                           "reference's image-classification setting: 100 x 100, 9 x 9).")
    lora: int | None = Field(None, ge=1, description="LoRA rank r (None: full fine-tuning).")
    lora_alpha: float | None = Field(None, gt=0.0, description="LoRA alpha (default 2 r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    top_k: int = Field(2, ge=1, description="experts: experts per token.")
    max_length: int = Field(128, ge=4, description="Tokens per example (truncated).")
    device: str = Field("auto", description="auto, cpu or cuda.")
    keep_mask: bool = Field(False, description="Plain models: weights of Linear / Conv layers "
                            "that are exactly zero at the start (a pruned model's mask) stay "
                            "zero throughout (mask-preserving retraining).")

    @model_validator(mode="after")
    def _check(self) -> FinetuneParams:
        if self.tb_low >= self.tb_high:
            raise ValueError(f"tb_low ({self.tb_low}) must be below tb_high ({self.tb_high})")
        if self.warmup > 0 and self.schedule != "linear":
            raise ValueError(f"warmup ({self.warmup:g}) is for schedule linear only, not "
                             f"{self.schedule!r}")
        return self


def finetune_step(ctx: StepContext, params: FinetuneParams, inputs: dict[str, Path]) -> dict:
    if params.keep_mask and params.dataset not in PLAIN_DATASETS:
        raise ParamsError("step finetune: keep_mask is for plain models (mlp, cnn) trained on "
                          f"a scikit-learn dataset ({', '.join(PLAIN_DATASETS)}), not "
                          f"dataset {params.dataset!r}")
    if params.dataset in PLAIN_DATASETS:
        from steps.finetune.plain import finetune_plain_outputs

        return finetune_plain_outputs(ctx, params.model_dump(), inputs)
    from steps.core.training.text import low_data_subset, read_dataset, write_subset
    from steps.finetune import hf

    if "experts" in inputs and params.tempbalance != "none":
        raise ParamsError("step finetune: tempbalance with experts (AlphaLoRA) is not "
                          "supported: the experts are rank-r matrices, too small for an ESD fit; "
                          "AlphaLoRA already sets each block's capacity from alpha")
    outputs: dict[str, Output] = {}
    data_path = _data_path(ctx, params, inputs, outputs)
    data = read_dataset(data_path, seed=params.split_seed)
    subset = low_data_subset(data, params.fraction, params.seed, params.max_train_examples)
    outputs["subset"] = Output(write_subset(subset, ctx.workdir / "subset.json",
                                            ctx.input_digests.get("data")), "subset-indices",
                               "application/json")
    texts, labels = data.split("train")
    train = ([texts[i] for i in subset.indices], labels[subset.indices])
    val, test = (_capped(data.split(s), params.max_eval_examples, params.split_seed)
                 for s in ("validation", "test"))

    config = _config(params)
    model, tokenizer, heads = hf.load_classifier(inputs["model"], data.labels, seed=params.seed)
    mode = "experts" if "experts" in inputs else "lora" if params.lora else "full"
    if mode == "experts":
        model = _add_experts(model, heads, inputs["experts"], params)
    elif mode == "lora":
        model = hf.add_lora(model, params.lora, heads, lora_alpha=params.lora_alpha,
                            dropout=params.lora_dropout)
    if params.tempbalance == "none":
        view, groups = None, hf.plain_groups(model, params.lr)
    else:
        view, groups = hf.balance_view(model, params.lr)

    checkpoints = checkpoint_root() / f"finetune-{cache_key(STEP, params, ctx.input_digests)}"

    def log_epoch(record: hf.EpochRecord) -> None:
        ctx.log_metrics(_epoch_metrics(record), step=record.epoch)

    result = hf.finetune(model, tokenizer, view, groups, train, val if val[0] else None,
                         config, checkpoint_dir=checkpoints, on_epoch=log_epoch,
                         resume_from=inputs.get("checkpoint"))
    for record in result.records[1 : result.resumed_from + 1]:  # epochs of the earlier run
        log_epoch(record)
    metrics = _final_metrics(result, model, tokenizer, test, config, len(train[1]))
    ctx.log_metrics(metrics)

    outputs |= _model_outputs(ctx, model, tokenizer, mode)
    history = history_table(result.records)
    history_path = ctx.workdir / "history.parquet"
    pq.write_table(history, history_path)
    outputs["history"] = Output(history_path, "finetune-history", "application/vnd.apache.parquet")
    metrics_path = ctx.workdir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    outputs["metrics"] = Output(metrics_path, "metrics", "application/json")
    if params.tempbalance != "none":
        from steps.finetune.plots import plot_history

        plot_dir = ctx.workdir / "plots"
        for path in plot_history(history, plot_dir):
            ctx.log_file(path, "plots")
        outputs["plots"] = Output(plot_dir, "plots")
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: the outputs are in the store
    return outputs


def checkpoint_root() -> Path:
    """$TAILWISE_CHECKPOINT_DIR, else <cache dir>/checkpoints."""
    from steps.core.data import default_cache_dir

    return Path(os.environ.get(CHECKPOINT_ENV) or default_cache_dir() / "checkpoints")


def _data_path(ctx: StepContext, params: FinetuneParams, inputs: dict[str, Path],
               outputs: dict[str, Output]) -> Path:
    """The JSONL to train on: the data input, or the built-in set (then also an output)."""
    if ("data" in inputs) == (params.dataset is not None):
        raise ParamsError("step finetune: give either the data input (a JSONL file) or the "
                          "dataset param (fortunes, kjv-testament), not both or neither")
    if "data" in inputs:
        return inputs["data"]
    from steps.core.training.text import build_dataset, write_jsonl

    path = write_jsonl(build_dataset(params.dataset, seed=params.split_seed),
                       ctx.workdir / f"{params.dataset}.jsonl")
    outputs["data"] = Output(path, "text-classification", "application/jsonl")
    return path


def _capped(split: tuple[list[str], np.ndarray], cap: int | None, seed: int):
    from steps.core.training import low_data_indices

    texts, labels = split
    if cap is None or cap >= len(labels):
        return split
    keep = low_data_indices(labels, cap / len(labels), seed=seed)
    return [texts[i] for i in keep], labels[keep]


def _config(params: FinetuneParams):
    from steps.core.devices import resolve_device
    from steps.finetune.hf import FinetuneConfig

    return FinetuneConfig(
        epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
        optimizer=params.optimizer, weight_decay=params.weight_decay, schedule=params.schedule,
        warmup=params.warmup, tempbalance=params.tempbalance, tb_low=params.tb_low,
        tb_high=params.tb_high, tb_scale=params.tb_scale, tb_scale_low=params.tb_scale_low,
        tb_scale_high=params.tb_scale_high, tb_every_steps=params.tb_every_steps,
        tb_farms=params.tb_farms,
        max_length=params.max_length, seed=params.seed, device=str(resolve_device(params.device)))


def _add_experts(model, heads: list[str], experts: Path, params: FinetuneParams):
    """AlphaLoRA: MoLoRA experts per block from the decisions table; the head stays trainable."""
    from steps.finetune.molora import MoLoRAConfig, add_molora, expert_counts

    config = MoLoRAConfig(r=params.lora or 8, lora_alpha=params.lora_alpha or 2 * (params.lora
                          or 8), dropout=params.lora_dropout, top_k=params.top_k)
    add_molora(model, expert_counts(model, experts), config)
    for name, param in model.named_parameters():
        if any(name.startswith(head + ".") for head in heads):
            param.requires_grad_(True)
    return model


def _model_outputs(ctx: StepContext, model, tokenizer, mode: str) -> dict[str, Output]:
    from steps.finetune.hf import save_outputs

    base_ref = ctx.input_digests.get("model")
    if mode == "experts":
        from steps.finetune.molora import molora_layers, save_molora

        adapter = save_molora(model, ctx.workdir / "adapter.safetensors")
        for name, layer in molora_layers(model).items():  # the base model (+ trained head)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base_layer)
        model_dir, _ = save_outputs(model, tokenizer, ctx.workdir, lora=False)
        return {"model": Output(model_dir, "model"),
                "adapter": Output(adapter, "molora-adapter")}
    model_dir, adapter_dir = save_outputs(model, tokenizer, ctx.workdir, lora=mode == "lora",
                                          base_ref=base_ref)
    outputs = {"model": Output(model_dir, "model")}
    if adapter_dir is not None:
        outputs["adapter"] = Output(adapter_dir, "lora-adapter")
    return outputs


def _epoch_metrics(record) -> dict[str, float]:
    values = {"train_loss": record.train_loss, "val_loss": record.val_loss,
              "val_accuracy": record.val_metric}
    return {k: v for k, v in values.items() if v is not None}


def _final_metrics(result, model, tokenizer, test, config, train_examples: int) -> dict:
    from steps.core.training import encode, evaluate_classifier

    last = result.records[-1]
    metrics = {"train_examples": train_examples, "epochs": last.epoch,
               "train_loss": last.train_loss, "val_loss": last.val_loss,
               "val_accuracy": last.val_metric}
    if test[0]:
        test_loss, test_accuracy = evaluate_classifier(
            model, encode(tokenizer, test, config.max_length), config.device)
        metrics |= {"test_loss": test_loss, "test_accuracy": test_accuracy,
                    "test_examples": len(test[1])}
    return {k: v for k, v in metrics.items() if v is not None}


def history_table(records) -> pa.Table:
    """One row per (epoch, balanced layer): losses, alpha, lr factor, lr; a row per epoch with
    layer null when nothing is balanced. Epoch 0 is the state before training."""
    rows = []
    for r in records:
        layers = list(r.alphas) or [None]
        for layer in layers:
            rows.append({"epoch": r.epoch, "train_loss": r.train_loss, "val_loss": r.val_loss,
                         "val_accuracy": r.val_metric, "layer": layer,
                         "alpha": r.alphas.get(layer, float("nan")) if layer else None,
                         "lr_factor": r.factors.get(layer) if layer else 1.0,
                         "lr": r.lrs.get(layer) if layer else next(iter(r.lrs.values()))})
    schema = pa.schema([("epoch", pa.int64()), ("train_loss", pa.float64()),
                        ("val_loss", pa.float64()), ("val_accuracy", pa.float64()),
                        ("layer", pa.string()), ("alpha", pa.float64()),
                        ("lr_factor", pa.float64()), ("lr", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


STEP = Step(name="finetune", version="1", params=FinetuneParams, inputs=("model",),
            fn=finetune_step, optional_inputs=("data", "experts", "checkpoint"))
