"""Pickled state dicts (.pth / .pt / .bin) -> safetensors, reading tensors only.

    summary = convert_checkpoint("model.pth", "out/", config="config.json")
    summary = convert_checkpoint("old_hf_dir/", "new_hf_dir/")   # shards + its config

A checkpoint is one file, a shard index (pytorch_model.bin.index.json) or a directory
(its index, else every .bin/.pt/.pth file in it; its config and tokenizer files come
along unless `config` names others).

The checkpoint is read with ``torch.load(weights_only=True)``: tensors, containers and
numbers only, never arbitrary objects, so a file that needs more (a pickled module, a
custom class) is refused with torch's reason, never unpickled. The output directory holds
``model.safetensors`` and, when a config is given, the config and tokenizer files beside
it: a Hugging Face model directory. It appears complete or not at all.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steps.core.errors import TailwiseError, one_line
from steps.core.hub import HF_SIDE_FILES
from steps.core.weights import WeightsError, index_files

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin")
# Where training scripts usually nest the weights inside a checkpoint dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")


class ConvertError(TailwiseError, ValueError):
    """The checkpoint cannot be converted: the message names the file and why."""


@dataclass
class Conversion:
    """What a conversion wrote: the directory, tensor count, and what it had to handle."""

    output: Path
    tensors: int
    shared: list[str] = field(default_factory=list)  # stored as copies of one storage
    ignored: list[str] = field(default_factory=list)  # non-tensor entries left out
    nested_key: str | None = None  # the checkpoint key the weights were read from
    side_files: list[str] = field(default_factory=list)


def convert_checkpoint(checkpoint: str | Path, output: str | Path,
                       config: str | Path | None = None, key: str | None = None) -> Conversion:
    """Write the checkpoint's tensors as `output`/model.safetensors (+ the config files).

    config: a config.json, or a directory whose config and tokenizer files are copied.
    key: the checkpoint entry holding the weights (default: the top level, else the first
        of STATE_DICT_KEYS that holds tensors).
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConvertError(f"--output {output}: exists and is not an empty directory")
    if config is None and (checkpoint / "config.json").is_file():
        config = checkpoint  # a directory's own config and tokenizer
    side_files = _side_files(Path(config)) if config is not None else []
    state, nested_key, ignored = {}, None, []
    for shard in checkpoint_files(checkpoint):
        part, nested_key, left_out = state_dict_of(load_checkpoint(shard), shard, key)
        if twice := sorted(set(part) & set(state)):
            raise ConvertError(f"{shard}: tensor {twice[0]!r} is also in an earlier shard")
        state.update(part)
        ignored += left_out
    tensors, shared = _without_shared_storage(state)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}-") as scratch:
        staging = Path(scratch) / "out"
        staging.mkdir()
        from safetensors.torch import save_file

        # transformers reads a safetensors checkpoint only with format "pt".
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        for source in side_files:
            shutil.copyfile(source, staging / source.name)
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
    return Conversion(output, len(tensors), shared, ignored, nested_key,
                      [f.name for f in side_files])


def checkpoint_files(path: Path) -> list[Path]:
    """The pickled files of a checkpoint: the file, an index's shards, or a directory's."""
    try:
        if path.name.endswith(".index.json"):
            return index_files(path)
        if path.is_dir():
            index = path / "pytorch_model.bin.index.json"
            if index.is_file():
                return index_files(index)
            files = sorted(p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
            if not files:
                raise ConvertError(f"{path}: no {', '.join(CHECKPOINT_SUFFIXES)} checkpoint in "
                                   "this directory")
            return files
    except WeightsError as error:
        raise ConvertError(str(error)) from None
    return [path]


def load_checkpoint(path: Path) -> object:
    """torch.load(weights_only=True) of `path`; ConvertError with the reason when it refuses."""
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        # A zip checkpoint (torch >= 1.6) is memory-mapped: tensors are not read twice.
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise ConvertError(f"{path}: refused, it holds more than tensors "
                           f"({_unpickler_reason(error)}); tailwise never unpickles arbitrary "
                           "objects: save model.state_dict() instead of the model") from None
    except Exception as error:  # torch raises many kinds for files that are not checkpoints
        raise ConvertError(f"{path}: not a torch checkpoint ({one_line(error)[:200]})") from None


def _unpickler_reason(error: Exception) -> str:
    """The one sentence of torch's long weights-only message that says what was refused."""
    text = " ".join(str(error).split())
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please |\. Check |$)", text)
    return one_line(found.group(1) if found else text[:200]).rstrip(".")


def state_dict_of(loaded: object, path: Path,
                  key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """(name -> tensor, the nested key used or None, the non-tensor entries left out)."""
    if key is not None:
        if not isinstance(loaded, Mapping) or key not in loaded:
            raise ConvertError(f"{path}: no entry {key!r} at the top level (it has "
                               f"{_keys_text(loaded)})")
        loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise ConvertError(f"{path}: holds a {type(loaded).__name__}, not a state dict "
                           "(a mapping of names to tensors)")
    nested = next((k for k in STATE_DICT_KEYS if key is None and _holds_tensors(loaded.get(k))),
                  None)
    if nested is not None and not _holds_tensors(loaded):
        return state_dict_of(loaded[nested], path)[0], nested, []
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvertError(f"{path}: no tensors at this level (it has {_keys_text(loaded)}); "
                           "name the entry holding the weights with --key")
    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise ConvertError(f"{path}: tensor names must be strings, found {bad[0]!r}")
    ignored = [str(k) for k in loaded if k not in tensors]
    return tensors, None, ignored


def _holds_tensors(value: object) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _keys_text(value: object) -> str:
    if not isinstance(value, Mapping):
        return f"a {type(value).__name__}"
    keys = [repr(k) for k in list(value)[:6]]
    return ("keys " + ", ".join(keys) + (", ..." if len(value) > 6 else "")) if keys else "no keys"


def _without_shared_storage(state: dict[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Contiguous tensors, none sharing memory: safetensors stores every name as its own
    data, so a tensor sharing a storage (a tied head, a view) is written as a copy and
    reads back with the same values under its own name."""
    seen: set[int] = set()
    tensors, shared = {}, []
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            shared.append(name)
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor.contiguous()
    return tensors, shared


def _side_files(config: Path) -> list[Path]:
    """The config (a file, or a directory's config + tokenizer files) to copy; checked first."""
    if config.is_dir():
        files = [config / name for name in HF_SIDE_FILES if (config / name).is_file()]
        config_json = config / "config.json"
    else:
        files, config_json = [config], config
    if not config_json.is_file():
        raise ConvertError(f"--config {config}: no config.json there")
    try:
        parsed = json.loads(config_json.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ConvertError(f"--config {config_json}: not a JSON config ({one_line(error)})") \
            from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ConvertError(f"--config {config_json}: not a Hugging Face config (no model_type)")
    if config_json.name != "config.json":
        raise ConvertError(f"--config {config_json}: name it config.json (or give its directory)")
    return files
