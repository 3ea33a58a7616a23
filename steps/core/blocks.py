"""Decoder blocks of any HF causal LM, and calibration statistics captured block by block.

    blocks = find_blocks(model)                       # "model.layers", the nn.ModuleList
    for block in calibrated_blocks(model, input_ids, hessian=True):
        block.layers   # {"model.layers.0.self_attn.q_proj": nn.Linear, ...}
        block.stats    # {name: LayerStats(sq_norms, hessian, tokens)}
        ...            # prune block.layers here; the next block then sees the pruned outputs

The block list is found without a hard-coded path (GPT-2 `transformer.h`, LLaMA/Mistral/Qwen
`model.layers`, OPT `model.decoder.layers`, ...): it is the container of identical-type
modules, each holding Linear/Conv1D layers, with the most parameters.

Calibration runs the model's stem (embeddings, rotary tables, masks) on chunks of a few
sequences (up to batch_tokens tokens) until the first block and keeps what that block
receives (hidden states, plus the positional and keyword arguments such as the attention mask
and position embeddings). It then runs the blocks one at a time, each moved to the compute
device only while it runs, with hooks that accumulate each layer's input statistics; each
block's outputs overwrite its inputs in one buffer: memory is about one block, the
activations of all sequences once, and one chunk's working memory inside the block.
This is the one capture used by Wanda, SparseGPT and OWL's outlier ratios.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from steps.core.devices import resolve_device
from steps.core.errors import TailwiseError

PRUNABLE_TYPES = (nn.Linear, Conv1D)
# OWL's outlier threshold M (|W| * ||X|| above M x the layer mean): 5, as OWL's LLaMA
# scripts run it (llama7b_wanda_owll.sh: Hyper_m 5); its main.py's argparse default is 3.
OWL_OUTLIER_M = 5.0
# Calibration tokens per block call. Sequences of 512 tokens or more (the papers' 2048) run
# at batch 1 like the reference code; shorter ones are grouped into fewer calls. A chunk's
# working memory inside a block (MLP intermediates ~ 3x ffn per token) stays small: on CPU
# larger chunks were no faster (SmolLM2, 8 x 256) but raised the peak RSS by ~30-90 MB,
# mostly freed memory that glibc keeps. A GPU may gain from more (fewer kernel launches).
DEFAULT_BATCH_TOKENS = 512


class BlocksNotFoundError(TailwiseError):
    """The model has no recognisable list of decoder blocks."""


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
    """Input statistics of one layer over the calibration tokens, accumulated in float64.

    sq_norms[j] = sum over tokens of x_j^2, so ||X_j||_2 = sqrt(sq_norms[j]) (Wanda, OWL);
    hessian = X^T X (SparseGPT), or None when not requested. Products of float32 inputs are
    exact in float64, so the sums barely depend on how the tokens were chunked or on the
    thread count: in float32 they did, and near-ties in the masks flipped with them.
    """

    sq_norms: torch.Tensor
    hessian: torch.Tensor | None
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, hessian: bool, device: torch.device) -> LayerStats:
        sq_norms = torch.zeros(in_features, dtype=torch.float64, device=device)
        square = (
            torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
            if hessian
            else None
        )
        return cls(sq_norms=sq_norms, hessian=square)

    def add(self, inputs: torch.Tensor, column_squares: torch.Tensor | None = None) -> None:
        """Accumulate a batch of layer inputs (..., in_features); column_squares, when
        given, is their sum of x^2 per column, already computed for another layer."""
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        self.sq_norms += column_square_sums(x) if column_squares is None else column_squares
        if self.hessian is not None:
            x = x.double()
            self.hessian.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 per input column, float32."""
        return self.sq_norms.sqrt().float()


def column_square_sums(inputs: torch.Tensor) -> torch.Tensor:
    """sum of x^2 over all tokens, per input column, in float64."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    return x.square().sum(dim=0)


@dataclass
class CalibratedBlock:
    """One block on the compute device, with its prunable layers and their input statistics."""

    index: int
    module: nn.Module
    layers: dict[str, nn.Module]
    stats: dict[str, LayerStats]


@dataclass
class _Chunk:
    """A few calibration sequences as the first (then the current) block receives them."""

    hidden: torch.Tensor  # (sequences, L, d): a slice of the one buffer of all sequences
    args: tuple[Any, ...]  # the block's other positional arguments
    kwargs: dict[str, Any]  # attention mask, position embeddings/ids, ...


class _ReachedFirstBlock(Exception):
    """Raised by the capture hook so the model stops before running any block."""


class _StatisticsComplete(Exception):
    """Raised at the input of a block's last prunable layer: the rest of the block is not
    needed for its statistics."""


def sequences_per_chunk(input_ids: torch.Tensor, batch_tokens: int) -> int:
    """How many calibration sequences of input_ids (N, L) run through a block at once: as
    many as fit in batch_tokens, at least one."""
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    return max(1, min(len(input_ids), batch_tokens // max(1, input_ids.shape[1])))


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
    model: nn.Module, blocks: Blocks, input_ids: torch.Tensor, device: torch.device, size: int
) -> list[_Chunk]:
    """Run the stem on chunks of `size` sequences and keep what the first block receives.

    The hidden states of all sequences live in one (N, L, d) buffer, each chunk a slice of
    it, and every block's outputs overwrite their chunk's inputs: one block's activations
    plus one chunk's at a time, allocated once.
    """
    chunks: list[_Chunk] = []
    buffer: list[torch.Tensor] = []  # the (N, L, d) buffer, made at the first chunk
    # Sequences have equal length and no padding, so masks and positions depend only on the
    # chunk's shape: chunks of one size share them (all but a smaller last chunk).
    context_by_size: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if not buffer:
            shape = (len(input_ids), *hidden.shape[1:])
            buffer.append(torch.empty(shape, dtype=hidden.dtype, device=hidden.device))
        start = sum(len(chunk.hidden) for chunk in chunks)
        states = buffer[0][start : start + len(hidden)]
        states.copy_(hidden)
        other_args, other_kwargs = context_by_size.setdefault(
            len(hidden), (tuple(args[1:]), dict(kwargs))
        )
        chunks.append(_Chunk(hidden=states, args=other_args, kwargs=other_kwargs))
        raise _ReachedFirstBlock

    handle = blocks.modules[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _stem_on(model, blocks, device):
            for start in range(0, len(input_ids), size):
                try:
                    model(input_ids=input_ids[start : start + size].to(device), use_cache=False)
                except _ReachedFirstBlock:
                    continue
    finally:
        handle.remove()
    if sum(len(chunk.hidden) for chunk in chunks) != len(input_ids):
        raise BlocksNotFoundError(
            f"{type(model).__name__}: the forward pass never reached {blocks.prefix}.0"
        )
    return chunks


def _run_block(block: nn.Module, chunk: _Chunk) -> torch.Tensor:
    output = block(chunk.hidden, *chunk.args, **chunk.kwargs)
    # Older and some remote-code blocks return (hidden_states, attentions, ...).
    return output[0] if isinstance(output, tuple | list) else output


class _Recorder:
    """Forward pre-hooks that feed each layer's inputs into its LayerStats, while a block runs.

    Layers fed the very same tensor (q/k/v, gate/up projections) share its sums of squares.
    With stop_at (a layer name) the run stops at that layer's input, once every prunable layer
    of the block has run exactly once: nothing after it adds statistics. `calls` lists the
    layers of the current run in the order they ran.
    """

    def __init__(self, layers: dict[str, nn.Module], stats: dict[str, LayerStats]):
        self.layers, self.stats = layers, stats
        self.stop_at: str | None = None
        self.calls: list[str] = []
        self._handles: list[Any] = []
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None  # input, version, squares

    def __enter__(self) -> _Recorder:
        self._handles = [
            layer.register_forward_pre_hook(lambda _m, args, name=name: self._record(name, args))
            for name, layer in self.layers.items()
        ]
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _record(self, name: str, args: tuple) -> None:
        inputs = args[0]
        # Holding the input keeps it alive, so `is` cannot match a new tensor at its address;
        # the version counter tells whether it was changed in place since.
        last = self._last
        if last is None or last[0] is not inputs or last[1] != inputs._version:
            last = self._last = (inputs, inputs._version, column_square_sums(inputs))
        self.stats[name].add(inputs, column_squares=last[2])
        self.calls.append(name)
        if name == self.stop_at and len(self.calls) == len(self.layers) == len(set(self.calls)):
            raise _StatisticsComplete

    def run(self, block: nn.Module, chunk: _Chunk) -> torch.Tensor | None:
        """The block's output for the chunk, or None when the run stopped early."""
        self.calls = []
        try:
            return _run_block(block, chunk)
        except _StatisticsComplete:
            return None
        finally:
            self._last = None

    def last_layer_of_run(self) -> str | None:
        """The layer that ran last in the run just done, when every layer ran exactly once."""
        complete = len(self.calls) == len(self.layers) == len(set(self.calls))
        return self.calls[-1] if complete else None


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library is not glibc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> None:
    """Give the heap pages freed by a block's temporaries back to the OS.

    glibc keeps freed small and mid-sized allocations (torch's CPU tensors below its
    adaptive mmap threshold) in the heap; block after block this grew the process by ~50 MB
    over SmolLM2, memory no tensor held any more. A trim per block costs well under a ms.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> Iterator[CalibratedBlock]:
    """Yield each decoder block with its layers' input statistics over input_ids (N, L).

    Between yields the caller may change the block's weights (prune it). With
    propagate="modified" (the pruning papers' choice) the block is run again afterwards, so
    the next block sees the changed block's outputs; with "dense" the outputs of the
    statistics pass are reused (one forward per block; the caller must not change the block).
    Each block is on `device` while it is yielded and goes back where it was afterwards.

    Sequences run through a block in chunks of up to batch_tokens tokens (at least one
    sequence; the last chunk may be smaller): the statistics are the same sums as at batch 1,
    up to float rounding, with fewer, larger calls. With "modified", the statistics pass of a
    block stops at its last prunable layer's input (found on the first full run), since the
    block's output is only needed from the second pass, which the last block skips.
    """
    device = resolve_device(device)
    blocks = find_blocks(model)
    size = sequences_per_chunk(input_ids, batch_tokens)
    chunks = _capture_first_block_inputs(model, blocks, input_ids, device, size)
    last_layer: str | None = None  # relative to the block, e.g. "mlp.down_proj"
    for index, block in enumerate(blocks.modules):
        home = next(block.parameters()).device
        block.to(device)
        prefix = f"{blocks.prefix}.{index}."
        layers = blocks.layers(index)
        stats = {
            name: LayerStats.empty(_in_features(layer), hessian, device)
            for name, layer in layers.items()
        }
        with _Recorder(layers, stats) as recorder:
            for chunk in chunks:
                if propagate == "modified" and last_layer is not None:
                    recorder.stop_at = prefix + last_layer
                output = recorder.run(block, chunk)
                if propagate == "dense":
                    chunk.hidden.copy_(output)  # the chunk's inputs are no longer needed
                elif output is not None and last_layer is None:
                    found = recorder.last_layer_of_run()
                    last_layer = found.removeprefix(prefix) if found else None
        yield CalibratedBlock(index=index, module=block, layers=layers, stats=stats)
        if propagate == "modified" and index < len(blocks) - 1:  # the last output is unused
            for chunk in chunks:
                chunk.hidden.copy_(_run_block(block, chunk))
        block.to(home)
        release_freed_heap()


# ------------------------------------------------------------------ OWL outlier ratios


def wanda_scores(layer: nn.Module, stats: LayerStats, rows: slice = slice(None)) -> torch.Tensor:
    """Wanda's importance |W_ij| * ||X_j||_2 of the given rows (default all), shape
    (rows, in), float32."""
    # abs() already copies (float() too, for half weights): scale that copy in place.
    return weight_matrix(layer)[rows].abs().float().mul_(stats.column_norms())


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
