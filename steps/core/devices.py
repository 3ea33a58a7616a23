"""The compute device a step runs on: "auto" (a GPU when usable), "cpu" or "cuda[:N]"."""

from __future__ import annotations

import torch

from steps.core.errors import TailwiseError

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(TailwiseError, ValueError):
    """The requested compute device is not available."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but no CUDA GPU is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
