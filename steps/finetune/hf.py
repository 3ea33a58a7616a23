"""Fine-tuning an HF model directory as a text classifier: full or LoRA, with TempBalance,
checkpointed every epoch so that an interrupted run resumes where it stopped.

    model, tokenizer, heads = load_classifier(model_dir, labels, seed=0)
    model = add_lora(model, r=8, heads=heads)                  # or keep it for full FT
    view, groups = balance_view(model, config.lr)              # what TempBalance sees
    result = finetune(model, tokenizer, view, groups, train, val, config,
                      checkpoint_dir=Path("ckpt"))

Encoders (BERT, MiniLM, RoBERTa) and causal LMs (LLaMA, GPT-2) both load with
AutoModelForSequenceClassification: a causal LM's body is kept, its LM head dropped and a
classification head ("score") added; the new head's weights are the loading's "missing
keys", and that is how the head is found for any architecture.

TempBalance and LoRA. The balanced layers are the Linear / Conv1D layers of the repeated
blocks (attention and MLP); everything else (embeddings, norms outside blocks, pooler,
head) shares one group with lr factor 1. With LoRA, each adapted layer's alpha is measured
on its *effective* weight W0 + scale * B A and the factor is applied to that layer's LoRA
matrices A and B. A LoRA delta alone has rank r, i.e. r non-zero eigenvalues: far below the
50 that TempBalance needs for a power-law fit, whereas the effective weight is the matrix the
model computes with, whose spectrum HT-SR and the TempBalance fine-tuning paper measure.

Training is the shared loop (``steps.core.training.fit``) with the tokenised-text adapter
(``encode``); checkpoints (``checkpoint_dir/epoch-N``) are its ``checkpoints`` module's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from steps.core.errors import TailwiseError
from steps.core.farms import IMAGE_CLASSIFICATION_OPTIONS
from steps.core.naming import BLOCK_PATTERN
from steps.core.pretrained import ModelLoadError, check_declared_size, first_line
from steps.core.training import (
    Checkpointing,
    EpochRecord,
    TrainHistory,
    encode,
    evaluate_classifier,
    fit,
    with_default_interval,
)
from steps.core.weights import module_layer_type

__all__ = [
    "EpochRecord",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "add_lora",
    "balance_view",
    "encode",
    "evaluate_classifier",
    "finetune",
    "load_classifier",
    "save_outputs",
]

REST_GROUP = "rest"  # not a layer name: see balance_view
EVAL_BATCH_SIZE = 64
FinetuneResult = TrainHistory  # records (epoch 0 first), resumed_from, seconds


class FinetuneError(TailwiseError, ValueError):
    """Fine-tuning cannot run with this model, data or checkpoint."""


# ------------------------------------------------------------------------- loading


def load_classifier(model_dir: Path, labels: tuple[str, ...], *, seed: int = 0):
    """(model, tokenizer, head module names) for sequence classification over ``labels``.

    The new head is initialised from ``seed`` (the global RNG is left as it was).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model path {model_dir} has no config.json (expected an HF "
                             "model directory)")
    if not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"model path {model_dir} has no *.safetensors weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # many kinds; name the input in one line
        raise ModelLoadError(f"model path {model_dir}: no usable tokenizer "
                             f"({first_line(exc)})") from exc
    if tokenizer.pad_token is None:  # GPT-2 style: pad with end-of-text
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.pad_token_id = tokenizer.pad_token_id
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    check_declared_size(model_dir, AutoModelForSequenceClassification, config, weight_bytes)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir, config=config, local_files_only=True, use_safetensors=True,
                dtype=torch.float32, output_loading_info=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load {model_dir} as a sequence classifier: "
                                 f"{first_line(exc)}") from exc
    heads = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    if not heads:
        raise FinetuneError(f"{model_dir} already has a classification head; fine-tune an "
                            "encoder or causal LM directory")
    return model, tokenizer, heads


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report on stdout: its missing / unexpected keys are expected for a new head."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()




def add_lora(model: nn.Module, r: int, heads: list[str], *, lora_alpha: float | None = None,
             dropout: float = 0.0):
    """Wrap with PEFT LoRA on every Linear / Conv1D of the repeated blocks; heads trainable."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, module in model.named_modules()
               if module_layer_type(module) in ("linear", "conv1d")
               and BLOCK_PATTERN.search(name) and not _under(name, heads)]
    if not targets:
        raise FinetuneError(f"{type(model).__name__}: no Linear layer inside repeated blocks "
                            "(layers.N, layer.N, h.N, blocks.N) to put LoRA on")
    config = LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
                        lora_dropout=dropout, target_modules=targets,
                        modules_to_save=list(heads), fan_in_fan_out=_is_conv1d(model, targets))
    return get_peft_model(model, config)


def _is_conv1d(model: nn.Module, targets: list[str]) -> bool:
    kinds = {type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets}
    return kinds == {True}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ------------------------------------------------------------- what TempBalance sees


class _EffectiveLinear(nn.Linear):
    """A LoRA layer seen as one Linear whose weight is W0 + scale * B A (out, in), detached.

    The LoRA layer is kept outside the module tree, so the view lists this matrix only.
    """

    def __init__(self, lora_layer: nn.Module):
        nn.Module.__init__(self)
        object.__setattr__(self, "_lora", lora_layer)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        with torch.no_grad():
            base = self._lora.get_base_layer()
            delta = sum(self._lora.get_delta_weight(a) for a in self._lora.active_adapters)
            weight = base.weight + delta
            return (weight.T if type(base).__name__ == "Conv1D" else weight).detach()


def balance_view(model: nn.Module, lr: float) -> tuple[nn.Module, list[dict[str, Any]]]:
    """(view, param groups): the modules TempBalance measures, and one group per block layer.

    The view lists, in model order: the first layer of the model, every block layer with
    trainable weights (a LoRA layer as its effective weight), and the last layer; TempBalance
    leaves its first and last layer out, so it balances exactly the block layers. Trainable
    parameters of a block that are not a layer (norms) follow the block layer before them;
    all trainable parameters outside the blocks go to one group named after the last layer
    (factor 1). Names drop PEFT's wrappers ("base_model.model.", ".modules_to_save.default").
    """
    layers: list[tuple[str, nn.Module]] = []  # every layer: the first and last go in the view
    entries: list[tuple[str, nn.Module]] = []  # block layers with trainable weights
    groups: list[dict[str, Any]] = []
    rest: list[nn.Parameter] = []
    seen: set[int] = set()
    hidden: list[str] = []  # PEFT internals under a LoRA layer or a frozen original module
    for raw_name, module in model.named_modules():
        if _under(raw_name, hidden):
            continue
        name = _clean_name(raw_name)
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            hidden.append(raw_name)
            params = _fresh(module.parameters(), seen)
            layers.append((name, _EffectiveLinear(module)))
            if params:
                entries.append(layers[-1])
                groups.append(_group(name, params, lr))
            continue
        if raw_name.endswith(".original_module"):
            hidden.append(raw_name)
            continue
        params = _fresh(module.parameters(recurse=False), seen)
        in_block = BLOCK_PATTERN.search(name) is not None
        if module_layer_type(module) is not None:
            layers.append((name, module))
            if in_block and params:
                entries.append(layers[-1])
                groups.append(_group(name, params, lr))
                continue
        if in_block and groups and _same_block(groups[-1]["name"], name):
            groups[-1]["params"].extend(params)
        else:
            rest.extend(params)
    if not groups:
        raise FinetuneError(f"{type(model).__name__}: no trainable layer inside repeated blocks "
                            "to balance (TempBalance needs layers.N / layer.N / h.N names)")
    (first, _), (last, _) = layers[0], layers[-1]
    if BLOCK_PATTERN.search(first) or BLOCK_PATTERN.search(last):
        raise FinetuneError(f"{type(model).__name__}: the first and last layers ({first!r}, "
                            f"{last!r}) must be outside the blocks (an embedding, a head)")
    if rest:
        groups.append(_group(last, rest, lr))
    return _tree([layers[0], *entries, layers[-1]]), groups


def plain_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """All trainable parameters in one group (no TempBalance)."""
    return [_group(REST_GROUP, [p for p in model.parameters() if p.requires_grad], lr)]


def _fresh(params, seen: set[int]) -> list[nn.Parameter]:
    out = [p for p in params if p.requires_grad and id(p) not in seen]
    seen.update(id(p) for p in out)
    return out


def _group(name: str, params: list[nn.Parameter], lr: float) -> dict[str, Any]:
    return {"params": params, "lr": lr, "name": name}


def _same_block(a: str, b: str) -> bool:
    ma, mb = BLOCK_PATTERN.search(a), BLOCK_PATTERN.search(b)
    return bool(ma and mb and a[: ma.end()] == b[: mb.end()])


def _clean_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".modules_to_save.default", "")


def _tree(entries: list[tuple[str, nn.Module]]) -> nn.Module:
    """A module tree whose named_modules() lists the entries under their dotted names."""
    root = nn.Module()
    for name, module in entries:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


# ------------------------------------------------------------------------ training


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-5
    optimizer: Literal["sgd", "adamw"] = "adamw"
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear"] = "cosine"  # linear: per step, HF's (TB_Sigmoid's)
    warmup: float = 0.0  # linear: warmup steps as a fraction of all (TB_Sigmoid: 0.06)
    tempbalance: Literal["none", "linear", "sigmoid"] = "none"
    tb_low: float = 0.5  # linear rule: factor range
    tb_high: float = 1.5
    tb_scale: float | None = None  # sigmoid rule: one s for both sides, else the two below
    tb_scale_low: float = 2.0  # sigmoid rule: s below the mean alpha (the reference's)
    tb_scale_high: float = 1.0  # ... and above it
    tb_every_steps: int | None = None  # None: per epoch (linear), TB_Sigmoid's K (sigmoid)
    tb_farms: bool = False  # alpha on FARMS windows (the reference's image-classification setting)
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"


Split = tuple[list[str], np.ndarray]


def finetune(model: nn.Module, tokenizer, view: nn.Module | None, groups: list[dict[str, Any]],
             train: Split, val: Split | None, config: FinetuneConfig, *,
             checkpoint_dir: Path | None = None,
             on_epoch: Callable[[EpochRecord], None] | None = None,
             resume_from: Path | None = None) -> TrainHistory:
    """Train ``model`` in place with the shared loop (``steps.core.training.fit``) on the
    tokenised texts; checkpoint after every epoch and resume from the last one.

    view / groups: from ``balance_view`` (TempBalance) or (None, ``plain_groups``).
    checkpoint_dir: where ``epoch-N`` checkpoints go; an existing one is resumed from.
    resume_from: a checkpoint directory to start from instead (e.g. one given as an input).
    on_epoch: called after each epoch is checkpointed (a raise there leaves the checkpoint).
    """
    train_batches = encode(tokenizer, train, config.max_length)
    val_batches = encode(tokenizer, val, config.max_length) if val is not None else None
    steps_per_epoch = math.ceil(len(train[1]) / config.batch_size)
    return fit(model, _optimizer(groups, config), train_batches, val_batches,
               epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
               eval_batch_size=EVAL_BATCH_SIZE, schedule=config.schedule, warmup=config.warmup,
               tempbalance=_tempbalance_options(config, steps_per_epoch), balance_view=view,
               checkpoints=Checkpointing(checkpoint_dir, asdict(config), resume_from),
               on_epoch=on_epoch, device=config.device)


def _optimizer(groups: list[dict[str, Any]], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _tempbalance_options(config: FinetuneConfig, steps_per_epoch: int) -> dict | None:
    if config.tempbalance == "none":
        return None
    return with_default_interval(
        {"rule": config.tempbalance, "lr_range": (config.tb_low, config.tb_high),
         "scale": config.tb_scale, "scale_low": config.tb_scale_low,
         "scale_high": config.tb_scale_high, "every_steps": config.tb_every_steps,
         "device": config.device,
         "farms": IMAGE_CLASSIFICATION_OPTIONS if config.tb_farms else None},
        steps_per_epoch)


# ------------------------------------------------------------------------- saving


def save_outputs(model: nn.Module, tokenizer, out_dir: Path, *, lora: bool,
                 base_ref: str | None = None) -> tuple[Path, Path | None]:
    """(model dir, adapter dir or None): the fine-tuned model as an HF safetensors directory.

    With LoRA the adapter (PEFT format, its base named by ``base_ref``) is written first,
    then merged into the base weights, so the model directory loads without PEFT.
    """
    adapter_dir = None
    if lora:
        adapter_dir = out_dir / "adapter"
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_ref  # not a scratch path: stable digests
        # save_embedding_layers=False: embeddings are never adapted here, and "auto" would
        # look for the base model's config at base_ref.
        model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
        (adapter_dir / "README.md").unlink(missing_ok=True)  # a model card template
        model = model.merge_and_unload()
    model_dir = out_dir / "model"
    model.to("cpu").save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir, adapter_dir
