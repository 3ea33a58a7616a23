"""A malicious pickle offered as a model never runs: every loading path refuses it.

The payload's __reduce__ would create a marker file when unpickled; each test proves it was
not unpickled by that file's absence. Paths that read safetensors only refuse pickles
outright; `load_hf_model` reads pytorch_model.bin only through torch.load(weights_only=True),
which refuses anything but plain tensors and containers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from steps.core import factory, pretrained
from steps.core.backends import LocalBackend
from steps.core.errors import TailwiseError
from steps.core.step import run_step
from steps.core.store import ArtifactStore
from steps.core.weights import WeightsError, list_weight_matrices

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this object opens (creates) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the pickle payload ran"


def tiny_llama_config(model_dir: Path) -> None:
    config = factory.build_model("tiny-llama").config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(model_dir)


def evil_bin(path: Path, marker: Path, *, whole: bool) -> Path:
    """A torch checkpoint with the payload as the whole object or hidden among tensors."""
    state = Payload(marker) if whole else {
        "model.embed_tokens.weight": torch.zeros(257, 128), "lm_head.weight": Payload(marker)}
    torch.save(state, path)
    assert not marker.exists()
    return path


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("loader", [pretrained.load_hf_model, factory.load_model])
def test_hf_dir_with_only_a_malicious_bin_is_refused(tmp_path: Path, marker: Path, whole: bool,
                                                     loader) -> None:
    model = tmp_path / "model"
    tiny_llama_config(model)
    evil_bin(model / "pytorch_model.bin", marker, whole=whole)
    with pytest.raises(pretrained.ModelLoadError, match=f"cannot load model from {model}:"):
        loader(model)


def test_malicious_bin_beside_safetensors_is_never_read(tmp_path: Path, marker: Path) -> None:
    model = factory.save_hf(factory.build_model("tiny-llama"), None, tmp_path / "model")
    evil_bin(model / "pytorch_model.bin", marker, whole=True)
    loaded = pretrained.load_hf_model(model)
    assert isinstance(loaded, torch.nn.Module)


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "weights.pth", "model.ckpt"])
def test_a_pickle_file_path_is_refused_by_every_loader(tmp_path: Path, marker: Path,
                                                       name: str) -> None:
    path = evil_bin(tmp_path / name, marker, whole=True)
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        list_weight_matrices(path)
    with pytest.raises(pretrained.ModelLoadError, match="is not a directory"):
        pretrained.load_hf_model(path)
    with pytest.raises(TailwiseError):
        factory.load_model(path)
    from steps.spectral import analyze

    with pytest.raises(WeightsError):
        analyze(path, device="cpu")


def test_pickle_dir_is_refused_by_the_weight_reader(tmp_path: Path, marker: Path) -> None:
    model = tmp_path / "model"
    tiny_llama_config(model)
    evil_bin(model / "pytorch_model.bin", marker, whole=True)
    with pytest.raises(WeightsError, match="pickled checkpoints .* are never loaded"):
        list_weight_matrices(model)


def test_plain_model_dir_with_a_pickle_instead_of_safetensors(tmp_path: Path,
                                                               marker: Path) -> None:
    """A tailwise_model.json directory (CNN/MLP) whose weights are a pickle."""
    model = factory.save_hf(factory.build_model("mlp"), None, tmp_path / "mlp")
    (model / factory.WEIGHTS_FILE).unlink()
    evil_bin(model / "pytorch_model.bin", marker, whole=True)
    with pytest.raises(pretrained.ModelLoadError, match=str(model)):
        factory.load_model(model)
    evil_bin(model / factory.WEIGHTS_FILE, marker, whole=True)  # a pickle named .safetensors
    with pytest.raises(pretrained.ModelLoadError, match=str(model)):
        factory.load_model(model)


@pytest.mark.parametrize("step_name", ["spectral", "prune", "evaluate"])
def test_steps_refuse_a_pickled_model_artifact(tmp_path: Path, marker: Path,
                                               step_name: str) -> None:
    """The artifact path: a pickled model stored in the store, then given to a step."""
    import importlib

    step = importlib.import_module(f"steps.{step_name}.step").STEP
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    model = tmp_path / "model"
    tiny_llama_config(model)
    evil_bin(model / "pytorch_model.bin", marker, whole=True)
    assert step.inputs == ("model",)
    inputs = {"model": store.put(model, "model").digest}
    before = {m.digest for m in store.list()}
    # A valid request (prune refuses one without a sparsity before it reads the model).
    params = {"method": "magnitude", "sparsity": 0.5} if step_name == "prune" else {}
    with pytest.raises(Exception) as err:  # noqa: B017 - the type is checked below
        run_step(step, params, inputs, store=store)
    assert isinstance(err.value, TailwiseError), repr(err.value)
    assert re.search(r"pickled checkpoints .* never loaded|Weights only load failed",
                     str(err.value)), str(err.value)
    assert {m.digest for m in store.list()} == before  # no output stored


# Calls that unpickle, or that let transformers do it without the weights-only guard.
UNSAFE = [
    (r"pickle\.loads?\(|cloudpickle|dill\.load|joblib\.load", "pickle loading"),
    (r"weights_only\s*=\s*False", "torch.load with weights_only=False"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle"),
    (r"use_safetensors\s*=\s*False", "from_pretrained allowed to unpickle"),
    (r"trust_remote_code\s*=\s*True", "remote code"),
]


def test_no_loading_path_in_steps_unpickles() -> None:
    """Static guard over steps/ and flows/: every torch.load is weights-only, and nothing
    calls pickle or lets transformers run untrusted code."""
    offences = []
    for source in sorted([*REPO.glob("steps/**/*.py"), *REPO.glob("flows/**/*.py")]):
        text = source.read_text()
        for pattern, what in UNSAFE:
            offences += [f"{source.relative_to(REPO)}: {what}" for _ in re.finditer(pattern, text)]
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end():call.end() + 300].split(")")[0]
            if "weights_only=True" not in args:
                offences.append(f"{source.relative_to(REPO)}: torch.load without weights_only")
        for call in re.finditer(r"(AutoModel\w*|\w+For\w+|PeftModel)\.from_pretrained\(", text):
            args = text[call.end():text.find(")", call.end()) + 200]
            if not re.search(r"use_safetensors|gguf_file|weights_only=True", args):
                offences.append(f"{source.relative_to(REPO)}: {call.group(1)}.from_pretrained "
                                "without use_safetensors / weights_only")
    assert offences == []
