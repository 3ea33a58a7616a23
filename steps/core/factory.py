"""Tiny, seeded, random models from named configs, and a tokenizer that needs no download.

    build_model("tiny-gpt2", seed=0)   # transformers GPT2LMHeadModel, 2 layers, width 128
    build_model("tiny-llama", seed=0)  # transformers LlamaForCausalLM, 2 layers, width 128
    build_model("cnn", seed=0)         # Conv2d+BatchNorm CNN for 1x8x8 digits, 10 classes
    build_model("mlp", seed=0)         # 64 -> 128 -> 128 -> 10 MLP for flat digits

The same name and seed give bit-identical weights. The language models share a byte-level
tokenizer (`byte_tokenizer`): 256 byte tokens plus one end-of-text token. It has no merges,
so it needs no training corpus and no download, and it can encode any text.

`save_hf` writes a directory that `load_model` rebuilds: an HF directory (config.json +
model.safetensors) for transformers models, and model.safetensors + tailwise_model.json for
the plain torch CNN/MLP.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

MODEL_NAMES = ("tiny-gpt2", "tiny-llama", "cnn", "mlp")
LM_NAMES = ("tiny-gpt2", "tiny-llama")

BYTE_VOCAB_SIZE = 256
EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = BYTE_VOCAB_SIZE  # right after the 256 byte tokens
TINY_LM_VOCAB_SIZE = BYTE_VOCAB_SIZE + 1
TINY_LM_CONTEXT = 256

PLAIN_CONFIG_FILE = "tailwise_model.json"
WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------- plain torch models


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 8  # 8 for sklearn digits, 28 for MNIST-shaped inputs
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    num_classes: int = 10


class TinyCNN(nn.Module):
    """Two conv blocks (Conv2d + BatchNorm + ReLU), a 2x2 max-pool, and a 2-layer head."""

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        pooled = config.image_size // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * pooled * pooled, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 64  # flat 8x8 digits
    hidden: tuple[int, ...] = (128, 128)
    num_classes: int = 10


class TinyMLP(nn.Module):
    """Linear + ReLU layers, then a linear classifier."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


_PLAIN_MODELS = {"cnn": (TinyCNN, CNNConfig), "mlp": (TinyMLP, MLPConfig)}


# ------------------------------------------------------------------- tiny causal LMs


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY_LM_VOCAB_SIZE,
        n_positions=TINY_LM_CONTEXT,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    return GPT2LMHeadModel(config)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_LM_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in real LLaMA-family models
        max_position_embeddings=TINY_LM_CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    return LlamaForCausalLM(config)


def _plain_config(name: str, width: int | None):
    """The plain model's config; `width` scales its hidden layers (a model-zoo knob)."""
    config = _PLAIN_MODELS[name][1]()
    if width is None:
        return config
    if name == "mlp":
        return MLPConfig(hidden=(width,) * len(config.hidden))
    return CNNConfig(channels=(width, 2 * width), hidden=4 * width)


def _construct(name: str, width: int | None = None) -> nn.Module:
    if name in _PLAIN_MODELS:
        return _PLAIN_MODELS[name][0](_plain_config(name, width))
    if width is not None:
        raise ValueError(f"width applies to the plain models ({', '.join(_PLAIN_MODELS)}), "
                         f"not to {name!r}")
    if name == "tiny-gpt2":
        return _tiny_gpt2()
    if name == "tiny-llama":
        return _tiny_llama()
    raise ValueError(f"unknown model name '{name}'; choose one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, seed: int = 0, width: int | None = None) -> nn.Module:
    """A freshly initialised tiny model; the same (name, seed, width) gives identical weights.

    width: hidden width of the plain models (mlp: every hidden layer; cnn: channels
    (w, 2w), head 4w); None keeps the defaults. The global torch RNG is left as it was:
    initialisation runs in a forked RNG state.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name '{name}'; choose one of {', '.join(MODEL_NAMES)}")
    if width is not None and width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _construct(name, width)
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer for the tiny LMs: ids 0-255 are the bytes, 256 is end-of-text.

    Built with the `tokenizers` library (ByteLevel pre-tokenizer, BPE without merges), so it
    round-trips any UTF-8 text, saves with save_pretrained and reloads with AutoTokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel maps each of the 256 bytes to a printable character; those are the vocabulary
    # (sorted, so ids are stable across runs).
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS_TOKEN] = EOS_TOKEN_ID
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=TINY_LM_CONTEXT,
    )


# ------------------------------------------------------------------------ save / load


def _is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def save_hf(model: nn.Module, tokenizer, out_dir: str | os.PathLike[str]) -> Path:
    """Write model (and tokenizer, if given) to out_dir as safetensors + config; returns it.

    transformers models go through save_pretrained(safe_serialization=True); the plain
    CNN/MLP write model.safetensors and tailwise_model.json (kind + config) instead.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_hf_model(model):
        model.save_pretrained(out, safe_serialization=True)
    else:
        kind = plain_kind(model)
        if kind is None:
            raise TypeError(f"cannot save {type(model).__name__}: expected a transformers "
                            f"PreTrainedModel or one of "
                            f"{', '.join(cls.__name__ for cls, _ in _PLAIN_MODELS.values())}")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        config = {"kind": kind, "config": asdict(model.config)}
        (out / PLAIN_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def plain_kind(model: nn.Module) -> str | None:
    """'mlp' or 'cnn' for a plain factory model, None for anything else."""
    for kind, (model_cls, _) in _PLAIN_MODELS.items():
        if type(model) is model_cls:
            return kind
    return None


def load_model(model_dir: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved by save_hf (or any HF directory with config.json + safetensors)."""
    from safetensors.torch import load_file

    path = Path(model_dir)
    plain_config = path / PLAIN_CONFIG_FILE
    if not plain_config.is_file():
        from steps.core.pretrained import load_hf_model

        return load_hf_model(path)
    from steps.core.pretrained import ModelLoadError
    from steps.core.sparse_format import SPARSE_WEIGHTS_FILE, load_sparse

    try:
        spec = json.loads(plain_config.read_text())
        kind, config = spec.get("kind"), spec["config"]
        # JSON turns tuples into lists; the frozen dataclasses want tuples back.
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {PLAIN_CONFIG_FILE} is not a "
                             f"model description ({type(exc).__name__})") from exc
    if kind not in _PLAIN_MODELS:
        raise ModelLoadError(f"cannot load model from {path}: unknown model kind {kind!r}")
    model_cls, config_cls = _PLAIN_MODELS[kind]
    try:
        sparse = path / SPARSE_WEIGHTS_FILE
        state = load_sparse(sparse) if sparse.is_file() else load_file(str(path / WEIGHTS_FILE))
        # Built on the meta device: a config that declares huge layers costs nothing, and the
        # file's tensors (checked against the declared shapes) become the parameters.
        with torch.device("meta"):
            model = model_cls(config_cls(**fields))
        model.load_state_dict(state, assign=True)
    except Exception as exc:  # safetensors, dataclass and torch errors: name the input
        # One line for the CLI (torch lists each mismatch on a line of its own).
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelLoadError(f"cannot load model from {path}: {reason}") from exc
    return model.eval()
