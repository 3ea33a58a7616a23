"""Decoder blocks of any HF causal LM, and calibration statistics captured block by block.

    blocks = find_blocks(model)                       # "model.layers", the nn.ModuleList
    for block in calibrated_blocks(model, input_ids, hessian=True):
        block.layers   # {"model.layers.0.self_attn.q_proj": nn.Linear, ...}
        block.stats    # {name: LayerStats(sq_norms, hessian, tokens)}
        ...            # prune block.layers here; the next block then sees the pruned outputs

The block list is found without a hard-coded path (GPT-2 `transformer.h`, LLaMA/Mistral/Qwen
`model.layers`, OPT `model.decoder.layers`, ...): it is the container of identical-type
modules, each holding Linear/Conv1D layers, with the most parameters.

Calibration runs the model's stem (embeddings, rotary tables, masks) once per sequence until
the first block and keeps what that block receives (hidden states, plus the positional and
keyword arguments such as the attention mask and position embeddings). It then runs the blocks
one at a time, each moved to the compute device only while it runs, with forward hooks that
accumulate each layer's input statistics: memory is about one block plus the activations.
This is the one capture used by Wanda, SparseGPT and OWL's outlier ratios.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from steps.core.errors import TailwiseError

PRUNABLE_TYPES = (nn.Linear, Conv1D)
OWL_OUTLIER_M = 5.0


class BlocksNotFoundError(TailwiseError):
    """The model has no recognisable list of decoder blocks."""


class DeviceError(TailwiseError):
    """The requested compute device is not available."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but no CUDA GPU is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise DeviceError(f"device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


# ------------------------------------------------------------------------ finding blocks


@dataclass(frozen=True)
class Blocks:
    """The model's decoder block list and its qualified name (e.g. 'model.layers')."""

    prefix: str
    modules: nn.ModuleList | nn.Sequential

    def __len__(self) -> int:
        return len(self.modules)

    def layers(self, index: int) -> dict[str, nn.Module]:
        """Prunable layers of block `index`, by full module name."""
        return prunable_layers(self.modules[index], f"{self.prefix}.{index}")

    def all_layers(self) -> dict[str, nn.Module]:
        """Prunable layers of every block, by full module name, in model order."""
        return {name: layer for i in range(len(self)) for name, layer in self.layers(i).items()}


def prunable_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """nn.Linear and transformers Conv1D layers under module, by full name."""
    return {
        f"{prefix}.{name}" if prefix else name: layer
        for name, layer in module.named_modules()
        if name and isinstance(layer, PRUNABLE_TYPES)
    }


def _is_block_list(container: nn.Module) -> bool:
    """A non-empty list of same-type modules, each holding Linear/Conv1D layers."""
    children = list(container.children())
    if not children or len({type(child) for child in children}) != 1:
        return False
    return all(prunable_layers(child) for child in children)


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> Blocks:
    """The decoder block list: of all ModuleList/Sequential containers of identical-type
    modules holding Linear/Conv1D layers, the one with the most parameters (so a block
    list wins over a list of experts or heads nested inside its blocks)."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList | nn.Sequential) and _is_block_list(module)
    ]
    if not candidates:
        raise BlocksNotFoundError(
            f"{type(model).__name__}: no decoder block list found (expected a ModuleList of "
            "identical blocks containing Linear/Conv1D layers, like model.layers)"
        )
    prefix, modules = max(candidates, key=lambda item: _parameter_count(item[1]))
    return Blocks(prefix=prefix, modules=modules)


# ------------------------------------------------------------------ weights as (out, in)


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), a view of the parameter data: Conv1D stores (in, out)."""
    weight = layer.weight.data
    return weight.t() if isinstance(layer, Conv1D) else weight


def set_weight_matrix(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Write an (out, in) matrix into the layer's weight, in its storage layout and dtype."""
    weight_matrix(layer).copy_(matrix)


# ------------------------------------------------------------------------- calibration


@dataclass
class LayerStats:
    """Input statistics of one layer over the calibration tokens (float32).

    sq_norms[j] = sum over tokens of x_j^2, so ||X_j||_2 = sqrt(sq_norms[j]) (Wanda, OWL);
    hessian = X^T X (SparseGPT), or None when not requested.
    """

    sq_norms: torch.Tensor
    hessian: torch.Tensor | None
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, hessian: bool, device: torch.device) -> LayerStats:
        sq_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        square = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
            if hessian
            else None
        )
        return cls(sq_norms=sq_norms, hessian=square)

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs (..., in_features)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.sq_norms += x.square().sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 per input column."""
        return self.sq_norms.sqrt()


@dataclass
class CalibratedBlock:
    """One block on the compute device, with its prunable layers and their input statistics."""

    index: int
    module: nn.Module
    layers: dict[str, nn.Module]
    stats: dict[str, LayerStats]


@dataclass
class _FirstBlockInputs:
    hidden: list[torch.Tensor]  # one (1, L, d) tensor per sequence
    args: tuple[Any, ...]  # the other positional arguments (same for every sequence)
    kwargs: dict[str, Any]  # attention mask, position embeddings/ids, ...


class _ReachedFirstBlock(Exception):
    """Raised by the capture hook so the model stops before running any block."""


def _move(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to device; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _move_stem(model: nn.Module, blocks: Blocks, device: torch.device) -> None:
    """Move every parameter and buffer outside the blocks (embeddings, norms, head) to device."""
    inside = f"{blocks.prefix}."
    for name, module in model.named_modules():
        if name == blocks.prefix or name.startswith(inside):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            setattr(module, buffer_name, buffer.to(device))


@contextmanager
def _stem_on(model: nn.Module, blocks: Blocks, device: torch.device) -> Iterator[None]:
    home = next(model.parameters()).device
    _move_stem(model, blocks, device)
    try:
        yield
    finally:
        _move_stem(model, blocks, home)


def _capture_first_block_inputs(
    model: nn.Module, blocks: Blocks, input_ids: torch.Tensor, device: torch.device
) -> _FirstBlockInputs:
    """Run the stem for each sequence (batch 1) and keep what the first block receives."""
    captured = _FirstBlockInputs(hidden=[], args=(), kwargs={})

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        # Sequences have equal length and batch 1, so masks and positions are the same for all.
        captured.args, captured.kwargs = tuple(args[1:]), dict(kwargs)
        raise _ReachedFirstBlock

    handle = blocks.modules[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _stem_on(model, blocks, device):
            for row in input_ids:
                try:
                    model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
                except _ReachedFirstBlock:
                    continue
    finally:
        handle.remove()
    if len(captured.hidden) != len(input_ids):
        raise BlocksNotFoundError(
            f"{type(model).__name__}: the forward pass never reached {blocks.prefix}.0"
        )
    return captured


def _run_block(block: nn.Module, hidden: torch.Tensor, inputs: _FirstBlockInputs) -> torch.Tensor:
    output = block(hidden, *inputs.args, **inputs.kwargs)
    # Older and some remote-code blocks return (hidden_states, attentions, ...).
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def _recording(layers: dict[str, nn.Module], stats: dict[str, LayerStats]) -> Iterator[None]:
    """Forward hooks that feed each layer's inputs into its LayerStats."""
    handles = [
        layer.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, layer in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _in_features(layer: nn.Module) -> int:
    return weight_matrix(layer).shape[1]


@torch.no_grad()
def calibrated_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    hessian: bool = False,
    propagate: Literal["modified", "dense"] = "modified",
) -> Iterator[CalibratedBlock]:
    """Yield each decoder block with its layers' input statistics over input_ids (N, L).

    Between yields the caller may change the block's weights (prune it). With
    propagate="modified" (the pruning papers' choice) the block is run again afterwards, so
    the next block sees the changed block's outputs; with "dense" the outputs of the
    statistics pass are reused (one forward per block; the caller must not change the block).
    Each block is on `device` while it is yielded and goes back where it was afterwards.
    """
    device = resolve_device(device)
    blocks = find_blocks(model)
    inputs = _capture_first_block_inputs(model, blocks, input_ids, device)
    hidden = inputs.hidden
    for index, block in enumerate(blocks.modules):
        home = next(block.parameters()).device
        block.to(device)
        layers = blocks.layers(index)
        stats = {
            name: LayerStats.empty(_in_features(layer), hessian, device)
            for name, layer in layers.items()
        }
        with _recording(layers, stats):
            for j, states in enumerate(hidden):
                output = _run_block(block, states, inputs)
                if propagate == "dense":
                    hidden[j] = output
        yield CalibratedBlock(index=index, module=block, layers=layers, stats=stats)
        if propagate == "modified":
            for j, states in enumerate(hidden):
                hidden[j] = _run_block(block, states, inputs)
        block.to(home)


# ------------------------------------------------------------------ OWL outlier ratios


def wanda_scores(layer: nn.Module, stats: LayerStats) -> torch.Tensor:
    """Wanda's importance |W_ij| * ||X_j||_2, shape (out, in), float32."""
    return weight_matrix(layer).abs().float() * stats.column_norms().unsqueeze(0)


def outlier_ratios(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    m: float = OWL_OUTLIER_M,
    device: str | torch.device = "cpu",
) -> pa.Table:
    """OWL's layerwise outlier distribution: per layer, the fraction of Wanda scores
    |W_ij| * ||X_j|| above m times the mean score of its block.

    OWL (luuyin/OWL) pools a block's scores and compares them with the block's mean; a layer's
    ratio is counted against that same block threshold, so the parameter-weighted mean of a
    block's layer ratios is OWL's block ratio. Columns: name, block, outlier_ratio, N (out
    features), M (in features). Statistics come from the dense model (one forward per block).
    """
    rows: dict[str, list] = {"name": [], "block": [], "outlier_ratio": [], "N": [], "M": []}
    for block in calibrated_blocks(model, input_ids, device=device, propagate="dense"):
        scores = {
            name: wanda_scores(layer, block.stats[name]) for name, layer in block.layers.items()
        }
        total = sum(s.sum().item() for s in scores.values())
        threshold = m * total / sum(s.numel() for s in scores.values())
        for name, score in scores.items():
            rows["name"].append(name)
            rows["block"].append(block.index)
            rows["outlier_ratio"].append((score > threshold).float().mean().item())
            rows["N"].append(score.shape[0])
            rows["M"].append(score.shape[1])
    return pa.table(rows)


def model_context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (max_position_embeddings, n_positions)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_seqlen(model: nn.Module, seqlen: int) -> int:
    """seqlen, or the model's context when that is shorter (with a warning)."""
    context = model_context_length(model)
    if context is not None and seqlen > context:
        warnings.warn(
            f"sequence length {seqlen} exceeds the model's context {context}; using {context}",
            stacklevel=3,
        )
        return context
    return seqlen
