"""Fixtures shared by the tests of steps/core: the converted SmolLM2 directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from steps.core.data import default_cache_dir
from steps.core.pretrained import smollm2_hf_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors directory.

    Cached in data.default_cache_dir() ($TAILWISE_CACHE_DIR or .tailwise/cache), not in the
    pytest tmp root: the GGUF conversion takes ~50 s, and a later session reuses its result.
    """
    started = time.perf_counter()
    path = smollm2_hf_dir(default_cache_dir())
    print(f"\n[models] SmolLM2 HF dir ready in {time.perf_counter() - started:.1f} s: {path}")
    return path
