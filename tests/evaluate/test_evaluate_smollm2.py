"""The dense SmolLM2-135M (weights 4-bit quantised and expanded back) on held-out KJV text."""

from __future__ import annotations

import pytest

from steps.core.data import default_cache_dir, kjv_splits
from steps.core.pretrained import load_hf_model, smollm2_hf_dir
from steps.evaluate import perplexity


@pytest.mark.slow
def test_dense_smollm2_perplexity_on_kjv_is_sane() -> None:
    from transformers import AutoTokenizer

    path = smollm2_hf_dir(default_cache_dir())
    model = load_hf_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # Two windows of 2048 tokens, the papers' evaluation length.
    value = perplexity(model, tokenizer, kjv_splits()["test"], max_windows=2, device="cpu")
    assert 13 < value < 25
