"""`tailwise finetune`: fine-tune a text classifier (LoRA, TempBalance, AlphaLoRA)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from steps.core.store import open_store
from tailwise_cli.app import StoreOption, app, console, input_ref, key_values, run_and_report

BUILT_IN_MODELS = ("tiny-gpt2", "tiny-llama", "minilm", "smollm2")
BUILT_IN_DATA = ("fortunes", "kjv-testament")


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(
        help="HF encoder or causal LM directory, artifact digest, or a built-in name "
        f"({', '.join(BUILT_IN_MODELS)}).")],
    data: Annotated[str, typer.Option(
        help="Text-classification JSONL (text, label [, split] per line), a digest, or a "
        f"built-in set ({', '.join(BUILT_IN_DATA)}).")],
    fraction: Annotated[float, typer.Option(
        help="Share of the training split to use (seeded, stratified).")] = 1.0,
    tempbalance: Annotated[str, typer.Option(
        help="none, linear (TB) or sigmoid (TB_Sigmoid, the low-data fine-tuning rule).")
    ] = "none",
    lora: Annotated[int | None, typer.Option(help="LoRA rank r [default: full fine-tuning].")
                    ] = None,
    experts: Annotated[str | None, typer.Option(
        help="AlphaLoRA: a decisions table with an experts column (tailwise allocate "
        "--policy alphalora), or a digest.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of subset, head, shuffling, dropout.")] = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    schedule: Annotated[str, typer.Option(
        help="Learning-rate schedule: cosine (per epoch) or linear (per optimiser step, warmup "
        "then decay to 0, as HF's Trainer and the TB_Sigmoid paper).")] = "cosine",
    warmup: Annotated[float, typer.Option(
        help="linear schedule: share of all optimiser steps warming up (TB_Sigmoid: 0.06).")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 128,
    max_train_examples: Annotated[int | None, typer.Option(
        help="Cap the training split before taking the fraction.")] = None,
    max_eval_examples: Annotated[int | None, typer.Option(
        help="Cap validation and test.")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Any other step param as KEY=VALUE (repeatable), e.g. "
        "-o tb_low=0.7 -o weight_decay=0.01.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    output: Annotated[Path | None, typer.Option(
        help="Write the fine-tuned model (and adapter, history, metrics) here.")] = None,
    store: StoreOption = None,
) -> None:
    """Fine-tune a text classifier: full or LoRA, optional TempBalance, on a low-data subset."""
    params = {"fraction": fraction, "tempbalance": tempbalance, "lora": lora, "epochs": epochs,
              "seed": seed, "lr": lr, "optimizer": optimizer, "schedule": schedule,
              "warmup": warmup, "batch_size": batch_size,
              "max_length": max_length, "max_train_examples": max_train_examples,
              "max_eval_examples": max_eval_examples, "device": device}
    params |= key_values(option)
    from steps.core.registry import load_step

    load_step("finetune").validate(params)  # bad params fail before anything is stored
    the_store = open_store(store)
    if model in BUILT_IN_MODELS and not Path(model).exists():
        _, built = run_and_report("build_model", {"name": model}, {}, store)
        inputs = {"model": built.outputs["model"].digest}
    else:
        inputs = {"model": input_ref(the_store, model, "model")}
    if data in BUILT_IN_DATA and not Path(data).exists():
        params["dataset"] = data
    else:
        inputs["data"] = input_ref(the_store, data, "text-classification")
    if experts:
        inputs["experts"] = input_ref(the_store, experts, "decisions")
    _, result = run_and_report("finetune", params, inputs, store)
    with tempfile.TemporaryDirectory() as scratch:
        path = the_store.get(result.outputs["metrics"].digest, Path(scratch) / "metrics.json")
        for key, value in json.loads(path.read_text()).items():
            console.print(f"{key:>16}: {value:.4f}" if isinstance(value, float)
                          else f"{key:>16}: {value}")
    if output:
        for name in ("model", "adapter", "history", "metrics", "subset", "plots"):
            if name in result.outputs:
                suffix = {"history": ".parquet", "metrics": ".json", "subset": ".json"}
                dest = output / f"{name}{suffix.get(name, '')}"
                if name == "adapter" and not result.outputs[name].is_dir:
                    dest = output / "adapter.safetensors"
                the_store.get(result.outputs[name].digest, dest)
        console.print(f"written to {output}")
