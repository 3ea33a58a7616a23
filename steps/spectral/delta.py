"""Fine-tune delta spectra: analyse W - W_base per matrix, or a LoRA adapter's B A.

WeightWatcher's users mostly analyse fine-tunes; what the fine-tune changed is the delta,
not the weights (whose spectrum the base model dominates):

- ``analyze(model, base=BASE)``: per matrix of the model that the base has too (same name,
  or the same name under a different prefix, e.g. ``bert.encoder...`` vs ``encoder...``),
  W - W_base. Shapes must match; a base of another architecture (config ``model_type``) or
  one sharing no matrix is refused.
- ``analyze(ADAPTER_DIR)`` on a PEFT LoRA adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``): per adapted matrix the product B A (out x in), as
  WeightWatcher's ``peft=True`` forms it (no lora_alpha / r scaling). Its ESD has at most
  r nonzero eigenvalues; they are kept with the zeros (``ks`` drops the zeros, as it drops
  any eigenvalue <= 1e-5).

The ``analysed`` column says which: "W - W_base" or "lora_BA".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from steps.core.errors import TailwiseError
from steps.core.weights import MatrixInfo, open_weights

ADAPTER_CONFIG = "adapter_config.json"
_LORA_KEY = re.compile(r"^(?P<target>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?$")
_PEFT_PREFIX = "base_model.model."


class DeltaError(TailwiseError, ValueError):
    """A base model or adapter that cannot be compared (architecture, shapes, no matrices)."""


def is_adapter_dir(path) -> bool:
    return isinstance(path, str | os.PathLike) and (Path(path) / ADAPTER_CONFIG).is_file()


def open_analysed(model_or_path, base=None):
    """The matrix source `analyze` reads, and what its rows are ("" for plain weights)."""
    if is_adapter_dir(model_or_path):
        if base is not None:
            raise DeltaError(f"{model_or_path} is a LoRA adapter: its B A is already a delta, "
                             "give no base")
        return LoraProductSource(Path(model_or_path)), "lora_BA"
    if base is not None:
        return DeltaSource(model_or_path, base), "W - W_base"
    return open_weights(model_or_path), ""


def model_type(path) -> str | None:
    """`model_type` of the config.json beside a model's weights (None when there is none)."""
    if not isinstance(path, str | os.PathLike):
        config = getattr(path, "config", None)
        return getattr(config, "model_type", None)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_base(model, base) -> None:
    """Refuse a base of another architecture (as far as both configs say)."""
    mine, theirs = model_type(model), model_type(base)
    if mine and theirs and mine != theirs:
        raise DeltaError(f"base {base} is a {theirs} model and {model} a {mine} model: "
                         "give the base model the fine-tune started from")


class DeltaSource:
    """W - W_base for every matrix of the model that the base has (matched by name)."""

    def __init__(self, model, base):
        check_base(model, base)
        self.model, self.base = open_weights(model), open_weights(base)
        self.model_name, self.base_name = model, base
        self.base_infos: dict[str, MatrixInfo] = {}

    def infos(self) -> list[MatrixInfo]:
        base_infos = {info.name: info for info in self.base.infos()}
        common = []
        for info in self.model.infos():
            twin = _twin(info.name, base_infos)
            if twin is None:
                continue  # a new head: nothing to subtract
            if twin.shape != info.shape:
                raise DeltaError(f"matrix {info.name} is {_shape(info.shape)} in {self.model_name}"
                                 f" but {_shape(twin.shape)} in base {self.base_name}")
            self.base_infos[info.name] = twin
            common.append(info)
        if not common:
            raise DeltaError(f"base {self.base_name} shares no weight matrix with "
                             f"{self.model_name}")
        return common

    def load(self, info: MatrixInfo) -> torch.Tensor:
        # Close float32 values subtract exactly; bf16/fp16 are widened first.
        return (self.model.load(info).float()
                - self.base.load(self.base_infos[info.name]).float())


def _twin(name: str, base_infos: dict[str, MatrixInfo]) -> MatrixInfo | None:
    """The base matrix of the same name, or of the same name under another prefix."""
    if name in base_infos:
        return base_infos[name]
    matches = [info for other, info in base_infos.items()
               if name.endswith("." + other) or other.endswith("." + name)]
    return matches[0] if len(matches) == 1 else None


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


class LoraProductSource:
    """B A for every (lora_A, lora_B) pair of a PEFT adapter, named by the adapted matrix."""

    def __init__(self, adapter_dir: Path):
        self.adapter_dir = adapter_dir
        self.weights = open_weights(adapter_dir)
        self.pairs: dict[str, tuple[MatrixInfo, MatrixInfo]] = {}

    def infos(self) -> list[MatrixInfo]:
        halves: dict[str, dict[str, MatrixInfo]] = {}
        for info in self.weights.infos():
            match = _LORA_KEY.match(info.name)
            if match and info.layer_type == "linear":
                halves.setdefault(match["target"], {})[match["side"]] = info
        infos = []
        for target, sides in halves.items():
            if set(sides) != {"A", "B"} or sides["B"].shape[1] != sides["A"].shape[0]:
                raise DeltaError(f"adapter {self.adapter_dir}: {target} has no matching "
                                 "lora_A / lora_B pair")
            name = target.removeprefix(_PEFT_PREFIX)
            self.pairs[name] = (sides["A"], sides["B"])
            shape = (sides["B"].shape[0], sides["A"].shape[1])
            infos.append(MatrixInfo(name, "linear", shape, len(infos)))
        if not infos:
            raise DeltaError(f"adapter {self.adapter_dir} has no LoRA matrices")
        return infos

    def load(self, info: MatrixInfo) -> torch.Tensor:
        a, b = self.pairs[info.name]
        return self.weights.load(b).float() @ self.weights.load(a).float()
