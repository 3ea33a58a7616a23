"""A workspace for CLI tests: a tiny seeded LLaMA with a tokenizer, a text, a store and MLflow."""

from __future__ import annotations

from pathlib import Path

from steps.core.factory import build_model, byte_tokenizer, save_hf


def tiny_llama_workspace(root: Path) -> tuple[Path, Path, Path, dict[str, str]]:
    """(root, model dir, text file, env with TAILWISE_STORE and MLFLOW_TRACKING_URI)."""
    model = save_hf(build_model("tiny-llama", seed=0), byte_tokenizer(), root / "llama")
    text = root / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 300)
    env = {"TAILWISE_STORE": str(root / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    return root, model, text, env
