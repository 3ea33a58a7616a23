"""Accuracy of a fine-tuned text classifier on one split of a labelled JSONL data set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steps.core.errors import TailwiseError


class ClassifierEvalError(TailwiseError, ValueError):
    """The model is not a classifier of this data set's labels."""


def classifier_metrics(model_dir: str | os.PathLike[str], data: str | os.PathLike[str], *,
                       split: str = "test", max_examples: int | None = None,
                       max_length: int = 128, seed: int = 0,
                       device: str = "cpu") -> dict[str, Any]:
    """Accuracy and mean cross-entropy on `split` (capped, stratified and seeded, at
    `max_examples`), with the parameter count; labels are matched by name to the model's."""
    from steps.core.training import encode, evaluate_classifier, low_data_indices
    from steps.core.training.text import read_dataset
    from steps.evaluate.metrics import parameter_count

    model, tokenizer = _load_classifier(Path(model_dir))
    dataset = read_dataset(data, seed=seed)
    unknown = sorted(set(dataset.labels) - set(model.config.label2id))
    if unknown:
        raise ClassifierEvalError(f"{model_dir} does not classify the labels {unknown[:5]} of "
                                  f"{data}; evaluate it on the data it was fine-tuned for")
    texts, ids = dataset.split(split)
    if not texts:
        raise ClassifierEvalError(f"{data}: no {split} examples")
    labels = np.array([model.config.label2id[dataset.labels[i]] for i in ids], np.int64)
    if max_examples is not None and max_examples < len(labels):
        keep = low_data_indices(labels, max_examples / len(labels), seed=seed)
        texts, labels = [texts[i] for i in keep], labels[keep]
    loss, accuracy = evaluate_classifier(model.to(device), encode(tokenizer, (texts, labels),
                                                                  max_length), device)
    return {"accuracy": accuracy, "eval_loss": loss, "eval_examples": len(labels),
            "params": parameter_count(model)}


def _load_classifier(model_dir: Path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from steps.core.pretrained import ModelLoadError, check_declared_size, first_line

    weights = list(model_dir.glob("*.safetensors"))
    if not (model_dir / "config.json").is_file() or not weights:
        raise ModelLoadError(f"model path {model_dir}: expected an HF directory with "
                             "config.json and *.safetensors")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise ClassifierEvalError(f"{model_dir} is not a sequence classifier "
                                  f"({', '.join(config.architectures or ['no architecture'])})")
    check_declared_size(model_dir, AutoModelForSequenceClassification, config,
                        sum(f.stat().st_size for f in weights))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; name the input
        raise ModelLoadError(f"cannot load {model_dir}: {first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
