"""Stream a model's weight matrices one at a time.

Sources: an in-memory ``torch.nn.Module``, a ``.safetensors`` file, a sharded
checkpoint (``model.safetensors.index.json``) or a Hugging Face model directory.
Files are read through ``safetensors.safe_open`` (memory-mapped), one tensor per
opening: a long-lived mapping keeps every page it has touched resident, so a
single handle would grow the process to the size of the model.

Each matrix comes with a layer type:

- ``linear``: nn.Linear, or a 2-D file tensor that is neither of the others;
- ``conv1d``: nn.Conv1d (out, in, k), and Hugging Face ``Conv1D`` (GPT-2), which
  stores (in, out): it is yielded transposed to (out, in) like every 2-D matrix;
- ``conv2d``: (out, in, kh, kw);
- ``embedding``: nn.Embedding, or a file tensor named like one (embed, wte, wpe).

Only float tensors whose name ends in ``weight`` with 2 to 4 dimensions are
matrices (biases, norms, masks and integer buffers are not). Tied weights
(an output head sharing the input embedding's storage, or holding identical
data in a file) are yielded once, under the first name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from steps.core.errors import TailwiseError, one_line
from steps.core.hub import is_hub_id, resolve_hub_model
from steps.core.sparse_format import (
    FORMAT,
    FORMAT_KEY,
    SparseFormatError,
    read_dense,
    read_shape,
    stored_names,
)

LAYER_TYPES = ("linear", "conv1d", "conv2d", "embedding")

# Model types whose checkpoints use Hugging Face's Conv1D (weights stored (in, out)).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_CONV1D_NAME = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")
_EMBEDDING_NAME = re.compile(r"(embed|(^|\.)(wte|wpe|shared)\.weight$)")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class WeightsError(TailwiseError, ValueError):
    """The weights cannot be read: the message names the path and the problem."""


class WeightMatrix(NamedTuple):
    name: str  # tensor name without a trailing ".weight" (the module name in memory)
    layer_type: str
    tensor: torch.Tensor  # (out, in), (out, in, k) or (out, in, kh, kw); not copied


@dataclass(frozen=True)
class MatrixInfo:
    """What is known about a matrix before its data is read."""

    name: str
    layer_type: str
    shape: tuple[int, ...]  # in the yielded orientation
    index: int  # position in the model's list of matrices (stable across filters)


class _Source:
    """A model whose matrices can be listed cheaply and loaded one by one."""

    def infos(self) -> list[MatrixInfo]:
        raise NotImplementedError

    def load(self, info: MatrixInfo) -> torch.Tensor:
        raise NotImplementedError


def open_weights(source: torch.nn.Module | str | Path) -> _Source:
    """Resolve a module, a path or a Hub id (`org/name[@revision]`, when no such path
    exists; steps/core/hub.py) into a matrix source (raises WeightsError, HubError)."""
    if isinstance(source, torch.nn.Module):
        return _ModuleSource(source)
    if isinstance(source, str) and is_hub_id(source):
        return _SafetensorsSource(resolve_hub_model(source).snapshot)
    if isinstance(source, str | Path):
        return _SafetensorsSource(Path(source))
    raise WeightsError(f"{source!r}: expected a torch.nn.Module or a path to safetensors weights")


def list_weight_matrices(source: torch.nn.Module | str | Path) -> list[MatrixInfo]:
    """Names, layer types and shapes of all matrices, without reading any data
    (except to detect tied weights stored twice in a file)."""
    return open_weights(source).infos()


def iter_weight_matrices(
    source: torch.nn.Module | str | Path,
    *,
    select: Callable[[MatrixInfo], bool] | None = None,
) -> Iterator[WeightMatrix]:
    """Yield (name, layer_type, tensor) one matrix at a time, in model order.

    ``select`` sees each matrix's name, type and shape before its data is read;
    matrices it rejects are never loaded.
    """
    opened = open_weights(source)
    for info in opened.infos():
        if select is None or select(info):
            yield WeightMatrix(info.name, info.layer_type, opened.load(info))


# --- in-memory modules -------------------------------------------------------------


class _ModuleSource(_Source):
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.weights: dict[str, torch.Tensor] = {}

    def infos(self) -> list[MatrixInfo]:
        infos, seen = [], set()
        for name, module in self.model.named_modules():
            layer_type = module_layer_type(module)
            weight = getattr(module, "weight", None)
            if layer_type is None or not isinstance(weight, torch.Tensor) or weight.is_meta:
                continue
            key = (weight.data_ptr(), tuple(weight.shape))
            if key in seen:  # tied to a matrix already listed
                continue
            seen.add(key)
            tensor = weight.detach()
            if type(module).__name__ == "Conv1D":
                tensor = tensor.t()  # HF Conv1D stores (in, out)
            name = name or type(module).__name__
            self.weights[name] = tensor
            infos.append(MatrixInfo(name, layer_type, tuple(tensor.shape), len(infos)))
        return infos

    def load(self, info: MatrixInfo) -> torch.Tensor:
        return self.weights[info.name]


def module_layer_type(module: torch.nn.Module) -> str | None:
    """The layer type of a module whose ``weight`` is a matrix, else None."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv2d"
    if isinstance(module, torch.nn.Conv1d):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    # transformers.pytorch_utils.Conv1D, matched by name to avoid importing transformers.
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return "conv1d"
    return None


# --- safetensors files ---------------------------------------------------------------


@dataclass(frozen=True)
class _FileTensor:
    key: str
    file: Path
    transpose: bool
    parts: str | None = None  # "key." of a compressed sparse tensor (steps/core/sparse_format)


class _SafetensorsSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        self.files, config_dir = _resolve_files(path)
        self.config = _read_config(config_dir / "config.json")
        self.tensors: dict[str, _FileTensor] = {}

    def infos(self) -> list[MatrixInfo]:
        conv1d_naming = self.config.get("model_type") in CONV1D_MODEL_TYPES or (
            "model_type" not in self.config
        )
        found = []
        for file in self.files:
            for key, shape, dtype, parts in _read_header(file):
                layer_type = file_layer_type(key, shape, dtype, conv1d_naming)
                if layer_type is None:
                    continue
                transpose = layer_type == "conv1d" and len(shape) == 2
                if transpose:
                    shape = shape[::-1]
                name = key.removesuffix(".weight")
                self.tensors[name] = _FileTensor(key, file, transpose, parts)
                found.append((name, layer_type, shape))
        found.sort(key=lambda item: _natural_key(item[0]))
        found = self._drop_tied(found)
        return [MatrixInfo(name, kind, shape, i) for i, (name, kind, shape) in enumerate(found)]

    def _drop_tied(self, found: list[tuple]) -> list[tuple]:
        """Drop a matrix that repeats an embedding's data (a tied output head saved twice).

        The embedding keeps the row even when the head sorts first (lm_head < model.*).
        Only same-shape pairs are compared, so untied models cost one extra read at most.
        """
        embeddings = [(pos, item) for pos, item in enumerate(found) if item[1] == "embedding"]
        kept = []
        for pos, (name, layer_type, shape) in enumerate(found):
            twins = [
                other
                for other_pos, other in embeddings
                if other[2] == shape
                and other[0] != name
                and (layer_type != "embedding" or other_pos < pos)
            ]
            if any(self._same_data(twin[0], name) for twin in twins):
                continue
            kept.append((name, layer_type, shape))
        return kept

    def _same_data(self, name_a: str, name_b: str) -> bool:
        return torch.equal(self._load_name(name_a), self._load_name(name_b))

    def load(self, info: MatrixInfo) -> torch.Tensor:
        return self._load_name(info.name)

    def _load_name(self, name: str) -> torch.Tensor:
        entry = self.tensors[name]
        from safetensors import safe_open

        try:
            # A fresh mapping per tensor: see the module docstring.
            with safe_open(str(entry.file), framework="pt") as handle:
                if entry.parts is None:
                    tensor = handle.get_tensor(entry.key)
                else:
                    tensor = read_dense(handle, entry.key, entry.parts)
        except SparseFormatError as err:
            raise WeightsError(f"{entry.file}: {err}") from None
        except Exception as err:  # SafetensorError is not importable by a stable name
            raise WeightsError(f"{entry.file}: cannot read tensor {entry.key!r} "
                               f"({one_line(err)})") from err
        return tensor.t() if entry.transpose else tensor


def file_layer_type(
    key: str, shape: tuple[int, ...], dtype: str, conv1d_naming: bool
) -> str | None:
    """Layer type of a stored tensor from its name, shape and dtype (None: not a matrix)."""
    if not key.endswith("weight") or dtype not in _FLOAT_DTYPES:
        return None
    if len(shape) == 4:
        return "conv2d"
    if len(shape) == 3:
        return "conv1d"
    if len(shape) != 2:
        return None
    if _EMBEDDING_NAME.search(key):
        return "embedding"
    if conv1d_naming and _CONV1D_NAME.search(key):
        return "conv1d"
    return "linear"


def _resolve_files(path: Path) -> tuple[list[Path], Path]:
    """The safetensors files behind a path, and the directory holding config.json."""
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            return index_files(index), path
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightsError(
                f"{path}: no safetensors weights in this directory (pickled checkpoints such "
                f"as pytorch_model.bin are never loaded: {convert_hint(path)})"
            )
        return files, path
    if path.name.endswith(".json"):
        return index_files(path), path.parent
    if path.suffix != ".safetensors":
        hint = f" ({convert_hint(path)})" if path.suffix in (".pth", ".pt", ".bin") else ""
        raise WeightsError(f"{path}: not a .safetensors file, index json or model directory"
                           f"{hint}")
    return [path], path.parent


def convert_hint(path: Path) -> str:
    """How to turn a pickled checkpoint at (or in) `path` into weights tailwise reads."""
    return f"convert it: tailwise convert {path} --output DIR"


def index_files(index: Path) -> list[Path]:
    """The shard files a checkpoint index (`weight_map`) names, checked to exist below it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise WeightsError(f"{index}: not a checkpoint index ({err})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise WeightsError(f"{index}: not a safetensors index (weight_map must map names to "
                           "shard file names)")
    files = sorted({_shard_path(index, shard) for shard in weight_map.values()})
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise WeightsError(f"{index}: missing shard(s) {', '.join(missing)}")
    return files


def _shard_path(index: Path, shard: str) -> Path:
    """A shard named by the index: a relative path below it, never one out of the model
    directory (`../x`, `/etc/x`) that would read files the model does not own."""
    parts = shard.split("/")
    if "\\" in shard or "\x00" in shard or any(p in ("", ".", "..") for p in parts):
        raise WeightsError(f"{index}: shard {shard!r} is not a file in {index.parent}")
    return index.parent / shard


def _read_config(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: absurd nesting
        raise WeightsError(f"{path}: unreadable config ({err})") from err
    return config if isinstance(config, dict) else {}


def _read_header(file: Path) -> list[tuple[str, tuple[int, ...], str, str | None]]:
    """(name, shape, dtype, parts) of every tensor; parts is the "name." prefix of a tensor
    stored compressed (its shape read from its __shape__ part), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            sparse = (handle.metadata() or {}).get(FORMAT_KEY) == FORMAT
            keys = list(handle.keys())
            names = stored_names(keys) if sparse else dict.fromkeys(keys)
            entries = []
            for key, parts in names.items():
                if parts is None:
                    tensor_slice = handle.get_slice(key)
                    shape = tuple(tensor_slice.get_shape())
                else:
                    tensor_slice = handle.get_slice(parts + "__values__")
                    shape = read_shape(handle, parts)
                entries.append((key, shape, tensor_slice.get_dtype(), parts))
    except SparseFormatError as err:
        raise WeightsError(f"{file}: {err}") from None
    except Exception as err:  # corrupt, truncated or not safetensors at all
        raise WeightsError(f"{file}: not a readable safetensors file ({one_line(err)})") from err
    if not entries:
        raise WeightsError(f"{file}: the safetensors file holds no tensors")
    return entries


def _natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
