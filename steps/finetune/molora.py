"""A mixture of LoRA experts (MoLoRA) on the projections of an HF decoder, with a per-block
expert count: the adapter that AlphaLoRA allocates experts for (METHODS.md section 2).

    counts = expert_counts(model, "decisions.parquet")   # or 4, or {0: 2, 1: 6, ...}
    add_molora(model, counts, MoLoRAConfig(r=8, lora_alpha=16, top_k=2))
    ... train (only adapter and router parameters require grad) ...
    save_molora(model, "adapter.safetensors")
    load_molora(fresh_base_model, "adapter.safetensors")

Design (MoLA, the AlphaLoRA reference's base, METHODS.md "MoLA-style LoRA experts on all 7
projections, router per layer with top-k gating"): every adapted projection W of block l gets
n_l LoRA experts (A_e: r x in, B_e: out x r) and its own router, a bias-free Linear from the
projection's input to n_l logits. Per token, the top-k logits are softmaxed into gates (the
same as MoLA's softmax-then-renormalise over the top k) and

    y = W x + scaling * sum_{e in top-k(x)} g_e(x) B_e A_e dropout(x),  scaling = lora_alpha / r.

Blocks with a single expert have no router (its gate is always 1) and use k = 1, as
AlphaLoRA's policy sets top_k = 1 where n_l = 1; such a layer is exactly PEFT's LoRA. The
initialisation follows PEFT's LoRA (A: kaiming-uniform with a = sqrt(5), B: zeros) and MoLA's
router (kaiming-uniform), so a fresh adapter leaves the model's outputs unchanged.

No load-balancing loss: METHODS.md and the AlphaLoRA paper do not use one. (MoLA's code has
an optional Switch-style balance term, coefficient 0.001, that is off unless asked for;
`router_stats` shows the per-expert load instead.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from steps.core.blocks import BlocksNotFoundError, find_blocks
from steps.core.errors import TailwiseError
from steps.core.naming import BLOCK_PATTERN

__all__ = [
    "LLAMA_TARGETS",
    "MoLoRAConfig",
    "MoLoRAError",
    "MoLoRALinear",
    "add_molora",
    "expert_counts",
    "load_molora",
    "merge_molora",
    "molora_state_dict",
    "reset_router_stats",
    "router_stats",
    "save_molora",
    "trainable_parameter_count",
    "uniform_counts",
]

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METADATA_KEY = "tailwise.molora"
FORMAT_VERSION = 1

Experts = int | Mapping[int, int] | str | os.PathLike | pa.Table


class MoLoRAError(TailwiseError, ValueError):
    """Bad expert counts, adapter configuration or adapter file; one line naming the input."""


@dataclass(frozen=True)
class MoLoRAConfig:
    """LoRA expert shape and routing, shared by every adapted projection."""

    r: int = 8
    lora_alpha: float = 16
    dropout: float = 0.05
    top_k: int = 2  # experts per token; blocks with one expert use 1
    targets: tuple[str, ...] = field(default=LLAMA_TARGETS)

    def __post_init__(self) -> None:
        # JSON (the adapter file's metadata) gives lists back; keep the frozen dataclass hashable.
        object.__setattr__(self, "targets", tuple(self.targets))
        if not (isinstance(self.r, int) and self.r >= 1):
            raise MoLoRAError(f"MoLoRAConfig r={self.r!r}: the LoRA rank must be an int >= 1")
        if not self.lora_alpha > 0:
            raise MoLoRAError(f"MoLoRAConfig lora_alpha={self.lora_alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise MoLoRAError(f"MoLoRAConfig dropout={self.dropout!r}: must be in [0, 1)")
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise MoLoRAError(f"MoLoRAConfig top_k={self.top_k!r}: must be an int >= 1")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise MoLoRAError(f"MoLoRAConfig targets={self.targets!r}: need module names")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def top_k_for(self, experts: int) -> int:
        """The layer's k: 1 with a single expert (AlphaLoRA), else top_k (<= experts)."""
        return 1 if experts == 1 else self.top_k


# ------------------------------------------------------------------------ expert counts


def expert_counts(model: nn.Module, experts: Experts) -> dict[int, int]:
    """Experts per decoder block, {block index: n >= 1}, for every block of the model.

    experts: an int (the same count in every block), a mapping {block: count}, or a decisions
    table from `steps.allocate` policy `alphalora` (a Parquet path or a pyarrow Table with
    an `experts` column and a `block` column, or block indices in the `name` column).
    """
    num_blocks = _num_blocks(model)
    if isinstance(experts, bool):
        raise MoLoRAError(f"experts={experts!r}: give an int, a mapping or a decisions table")
    if isinstance(experts, int | np.integer):
        counts = dict.fromkeys(range(num_blocks), int(experts))
        source = f"experts={experts}"
    elif isinstance(experts, Mapping):
        counts = _counts_from_mapping(experts)
        source = "experts mapping"
    elif isinstance(experts, str | os.PathLike | pa.Table):
        counts = _counts_from_table(experts)
        source = str(experts) if not isinstance(experts, pa.Table) else "decisions table"
    else:
        raise MoLoRAError(
            f"experts of type {type(experts).__name__}: give an int, a mapping or a table path"
        )
    return _checked_counts(counts, num_blocks, source)


def uniform_counts(model_or_blocks: nn.Module | int, total: int) -> dict[int, int]:
    """A total expert budget spread as evenly as possible over the blocks (the uniform
    baseline at AlphaLoRA's budget T); leftovers go to the first blocks."""
    num_blocks = (
        model_or_blocks if isinstance(model_or_blocks, int) else _num_blocks(model_or_blocks)
    )
    if total < num_blocks:
        raise MoLoRAError(
            f"expert budget {total} is smaller than the {num_blocks} layers (each needs >= 1)"
        )
    share, leftover = divmod(total, num_blocks)
    return {b: share + (1 if b < leftover else 0) for b in range(num_blocks)}


def _num_blocks(model: nn.Module) -> int:
    try:
        return len(find_blocks(model))
    except BlocksNotFoundError as exc:
        raise MoLoRAError(str(exc)) from None


def _counts_from_mapping(experts: Mapping) -> dict[int, int]:
    counts = {}
    for block, n in experts.items():
        try:
            counts[int(block)] = int(n)
        except (TypeError, ValueError):
            raise MoLoRAError(f"experts mapping entry {block!r}: {n!r} is not an int") from None
    return counts


def _counts_from_table(source: str | os.PathLike | pa.Table) -> dict[int, int]:
    """{block: experts} from an alphalora decisions table (one row per block)."""
    if isinstance(source, pa.Table):
        table, where = source, "decisions table"
    else:
        path = Path(source)
        if not path.is_file():
            raise MoLoRAError(f"expert table {path} does not exist")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise MoLoRAError(f"expert table {path}: not a Parquet file ({exc})") from None
        where = str(path)
    if "experts" not in table.column_names:
        have = ", ".join(table.column_names) or "none"
        raise MoLoRAError(f"{where}: no `experts` column (has: {have}); use policy alphalora")
    blocks = _table_blocks(table, where)
    experts = table["experts"].to_pylist()
    if any(n is None or float(n) != int(n) for n in experts):
        raise MoLoRAError(f"{where}: column experts must hold integers with no missing values")
    counts: dict[int, int] = {}
    for block, n in zip(blocks, experts, strict=True):
        if block in counts:
            raise MoLoRAError(f"{where}: block {block} appears more than once")
        counts[block] = int(n)
    return counts


def _table_blocks(table: pa.Table, where: str) -> list[int]:
    """Block index per row: the `block` column, else parsed from `name` (model.layers.3)."""
    if "block" in table.column_names:
        values = table["block"].to_pylist()
        if any(v is None for v in values):
            raise MoLoRAError(f"{where}: column block has missing values")
        return [int(v) for v in values]
    if "name" not in table.column_names:
        raise MoLoRAError(f"{where}: needs a `block` or a `name` column to place the experts")
    blocks = []
    for name in table["name"].to_pylist():
        match = BLOCK_PATTERN.search(str(name))
        if match is None:
            raise MoLoRAError(f"{where}: cannot find a block index in name {name!r}")
        blocks.append(int(match.group(1)))
    return blocks


def _checked_counts(counts: dict[int, int], num_blocks: int, source: str) -> dict[int, int]:
    extra = sorted(b for b in counts if not 0 <= b < num_blocks)
    if extra:
        raise MoLoRAError(
            f"{source}: names block(s) {extra[:5]} but the model has blocks 0-{num_blocks - 1}"
        )
    missing = [b for b in range(num_blocks) if b not in counts]
    if missing:
        raise MoLoRAError(f"{source}: no expert count for block(s) {missing[:5]}")
    low = [b for b, n in counts.items() if n < 1]
    if low:
        raise MoLoRAError(
            f"{source}: block {low[0]} gets {counts[low[0]]} experts; every layer needs >= 1"
        )
    return {b: counts[b] for b in range(num_blocks)}


# --------------------------------------------------------------------------- the layer


class MoLoRALinear(nn.Module):
    """A frozen nn.Linear plus n LoRA experts and a top-k router (none when n = 1)."""

    def __init__(self, base: nn.Linear, experts: int, config: MoLoRAConfig, block: int):
        super().__init__()
        self.base_layer = base
        self.block = block
        self.num_experts = experts
        self.top_k = config.top_k_for(experts)
        self.r = config.r
        self.scaling = config.scaling
        weight = base.weight
        like = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(experts, config.r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, config.r, **like))
        self.router = (
            nn.Linear(base.in_features, experts, bias=False, **like) if experts > 1 else None
        )
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Tokens routed to each expert since the last reset (not part of the state dict).
        self.register_buffer("usage", torch.zeros(experts, dtype=torch.long), persistent=False)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's LoRA init per expert (A kaiming-uniform a=sqrt(5), B zero), MoLA's router."""
        for expert in self.lora_A:  # per (r x in) slice: fan_in is in_features, as in PEFT
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        self.lora_B.zero_()
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (..., n): softmax over the top-k logits, 0 elsewhere."""
        if self.router is None:
            return x.new_ones(*x.shape[:-1], 1)
        logits = self.router(x)
        top_logits, chosen = logits.topk(self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        return torch.zeros_like(logits).scatter(-1, chosen, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_dropout(x)
        if self.router is None:  # one expert: exactly PEFT's lora_B(lora_A(dropout(x)))
            delta = F.linear(F.linear(h, self.lora_A[0]), self.lora_B[0])
            self._count(None, x)
            return result + delta * self.scaling
        gates = self.gates(x)
        self._count(gates, x)
        # Every expert's A on every token, then the gates zero the unchosen ones: with r = 8
        # the experts cost little next to W, and two plain GEMMs over the stacked experts
        # (n*r wide) beat a per-expert gather of tokens.
        n, r = self.num_experts, self.r
        z = F.linear(h, self.lora_A.reshape(n * r, -1)).unflatten(-1, (n, r))
        z = (z * gates.unsqueeze(-1)).flatten(-2)
        delta = F.linear(z, self.lora_B.permute(1, 0, 2).reshape(-1, n * r))
        return result + delta * self.scaling

    @torch.no_grad()
    def _count(self, gates: torch.Tensor | None, x: torch.Tensor) -> None:
        if gates is None:
            self.usage[0] += x[..., 0].numel()
        else:
            self.usage += (gates > 0).reshape(-1, self.num_experts).sum(0)

    def extra_repr(self) -> str:
        return f"block={self.block}, experts={self.num_experts}, top_k={self.top_k}, r={self.r}"


# --------------------------------------------------------------------- add / find / remove


def add_molora(model: nn.Module, experts: Experts, config: MoLoRAConfig | None = None) -> nn.Module:
    """Wrap the target projections of every block with MoLoRA experts, in place.

    Every base parameter is frozen; only the experts (lora_A, lora_B) and routers train.
    Raises MoLoRAError when the model already has MoLoRA, a block lacks a target projection,
    or top_k exceeds a block's expert count (for blocks with more than one expert).
    """
    config = config or MoLoRAConfig()
    if molora_layers(model):
        raise MoLoRAError(f"{type(model).__name__} already has MoLoRA adapters")
    counts = expert_counts(model, experts)
    too_few = {b: n for b, n in counts.items() if 1 < n < config.top_k}
    if too_few:
        block, n = next(iter(too_few.items()))
        raise MoLoRAError(f"top_k={config.top_k} exceeds the {n} experts of block {block}")
    targets = _target_layers(model, config.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for (block, _), (parent, child, layer) in targets.items():
        setattr(parent, child, MoLoRALinear(layer, counts[block], config, block))
    model.molora_config = config  # read by save_molora
    return model


def _target_layers(
    model: nn.Module, targets: tuple[str, ...]
) -> dict[tuple[int, str], tuple[nn.Module, str, nn.Linear]]:
    """{(block, qualified name): (parent, attribute, Linear)} for every target in every block."""
    blocks = find_blocks(model)
    found = {}
    for index, block in enumerate(blocks.modules):
        for target in targets:
            matches = [
                name
                for name, _ in block.named_modules()
                if name == target or name.endswith(f".{target}")
            ]
            if not matches:
                raise MoLoRAError(f"block {blocks.prefix}.{index} has no module named {target!r}")
            for name in matches:
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                layer = getattr(parent, child)
                if not isinstance(layer, nn.Linear):
                    raise MoLoRAError(
                        f"{blocks.prefix}.{index}.{name} is a {type(layer).__name__}; "
                        "MoLoRA adapts nn.Linear projections only"
                    )
                found[(index, f"{blocks.prefix}.{index}.{name}")] = (parent, child, layer)
    return found


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    """The MoLoRA wrappers of a model, by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLoRALinear)}


def _unwrap(model: nn.Module) -> None:
    """Put every wrapper's base layer back in its place."""
    for name, layer in molora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if hasattr(model, "molora_config"):
        del model.molora_config


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------- save / load


def molora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (experts and routers), by qualified parameter name."""
    layers = molora_layers(model)
    if not layers:
        raise MoLoRAError(f"{type(model).__name__} has no MoLoRA adapters")
    state = {}
    for name, layer in layers.items():
        for key, param in layer.named_parameters():
            if not key.startswith("base_layer."):
                state[f"{name}.{key}"] = param.detach().contiguous().cpu()
    return state


def _counts_of(model: nn.Module) -> dict[int, int]:
    return {layer.block: layer.num_experts for layer in molora_layers(model).values()}


def save_molora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter weights to a safetensors file, config and counts in its metadata."""
    from safetensors.torch import save_file

    state = molora_state_dict(model)
    config = getattr(model, "molora_config", None) or MoLoRAConfig()
    counts = _counts_of(model)
    metadata = {
        "version": FORMAT_VERSION,
        "config": asdict(config),
        "experts": {str(b): n for b, n in sorted(counts.items())},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    return path


def read_molora_metadata(path: str | os.PathLike) -> tuple[MoLoRAConfig, dict[int, int]]:
    """(config, expert counts) stored in an adapter file by save_molora."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MoLoRAError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise MoLoRAError(f"adapter file {path}: not a safetensors file ({exc})") from None
    if raw is None:
        raise MoLoRAError(f"adapter file {path}: no {METADATA_KEY} metadata (not from save_molora)")
    meta = json.loads(raw)
    if meta.get("version") != FORMAT_VERSION:
        raise MoLoRAError(f"adapter file {path}: unknown format version {meta.get('version')!r}")
    return MoLoRAConfig(**meta["config"]), {int(b): int(n) for b, n in meta["experts"].items()}


def load_molora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the adapters described by the file's metadata on a base model and load their
    weights. The model is left unchanged when the file does not fit it."""
    from safetensors.torch import load_file

    config, counts = read_molora_metadata(path)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        add_molora(model, counts, config)
    except MoLoRAError as exc:
        raise MoLoRAError(f"adapter file {path} does not fit the model: {exc}") from None
    state = load_file(str(path))
    expected = molora_state_dict(model)
    problem = _state_mismatch(expected, state)
    if problem:
        _unwrap(model)
        for name, param in model.named_parameters():  # add_molora froze them; undo that too
            param.requires_grad_(trainable[name])
        raise MoLoRAError(f"adapter file {path} does not fit the model: {problem}")
    with torch.no_grad():
        for name, layer in molora_layers(model).items():
            for key, param in layer.named_parameters():
                if not key.startswith("base_layer."):
                    param.copy_(state[f"{name}.{key}"])
    return model


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"missing tensor {missing[0]} ({len(missing)} in all)"
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        return f"unexpected tensor {unexpected[0]} ({len(unexpected)} in all)"
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            return (
                f"{key} has shape {tuple(found[key].shape)}, the model needs {tuple(tensor.shape)}"
            )
    return ""


# ------------------------------------------------------------------------------- merging


@torch.no_grad()
def merge_molora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove the wrappers, in place.

    Only possible when every layer's gates do not depend on the input: a single expert
    (gate 1), or a router whose weights are all zero (constant gates). Otherwise, or when
    the model has no adapters, raises MoLoRAError and leaves the model unchanged.
    """
    layers = molora_layers(model)
    if not layers:
        raise MoLoRAError(f"{type(model).__name__} has no MoLoRA adapters to merge")
    routed = [name for name, layer in layers.items() if not _input_independent(layer)]
    if routed:
        raise MoLoRAError(
            f"cannot merge: {len(routed)} layer(s) route tokens by input, e.g. {routed[0]} "
            f"({layers[routed[0]].num_experts} experts, top_k {layers[routed[0]].top_k}); "
            "merging needs one expert per layer (or constant gates)"
        )
    for layer in layers.values():
        base = layer.base_layer
        gates = layer.gates(base.weight.new_zeros(1, base.in_features))[0]  # constant gates
        delta = torch.einsum("e,eor,eri->oi", gates, layer.lora_B, layer.lora_A)
        base.weight += delta * layer.scaling
    _unwrap(model)
    return model


def _input_independent(layer: MoLoRALinear) -> bool:
    return layer.router is None or not layer.router.weight.any()


# ------------------------------------------------------------------------ router usage


def router_stats(model: nn.Module) -> list[dict]:
    """Per block: expert count, k, tokens seen and each expert's share of the routed
    assignments (summed over the block's projections) since the last reset."""
    per_block: dict[int, dict] = {}
    for layer in molora_layers(model).values():
        row = per_block.setdefault(
            layer.block,
            {
                "block": layer.block,
                "experts": layer.num_experts,
                "top_k": layer.top_k,
                "usage": torch.zeros(layer.num_experts, dtype=torch.long),
            },
        )
        row["usage"] += layer.usage.cpu()
    rows = []
    for block in sorted(per_block):
        row = per_block[block]
        usage = row.pop("usage")
        total = int(usage.sum())
        row["assignments"] = total
        row["load"] = (usage.double() / total).tolist() if total else [0.0] * len(usage)
        # Max share over the fair share 1/n: 1.0 is perfectly balanced.
        row["max_load_ratio"] = max(row["load"]) * row["experts"] if total else float("nan")
        rows.append(row)
    return rows


def reset_router_stats(model: nn.Module) -> None:
    for layer in molora_layers(model).values():
        layer.usage.zero_()
