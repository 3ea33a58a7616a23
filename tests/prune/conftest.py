"""Fixtures for the prune tests: tiny seeded LMs (GPT-2, LLaMA, OPT), text, SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steps.core.data import kjv_splits
from steps.core.factory import build_model, byte_tokenizer


def tiny_opt(seed: int = 0) -> torch.nn.Module:
    """An OPT-shaped causal LM (model.decoder.layers), small and random."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=257,
        hidden_size=64,
        word_embed_proj_dim=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OPTForCausalLM(config).eval()


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    return tiny_opt(seed) if name == "tiny-opt" else build_model(name, seed=seed)


TINY_LMS = ("tiny-gpt2", "tiny-llama", "tiny-opt")


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def kjv() -> dict[str, Path]:
    return kjv_splits()


@pytest.fixture(scope="session")
def calibration_ids(kjv: dict[str, Path], tokenizer) -> torch.Tensor:
    """4 sequences x 64 byte tokens of KJV validation text, fixed seed."""
    from steps.core.calibration import sample_windows, tokenize_text

    return sample_windows(tokenize_text(tokenizer, kjv["validation"]), 4, 64, seed=0)
