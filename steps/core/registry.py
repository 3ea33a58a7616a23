"""Steps by name, imported only when asked for (flows must not pay for torch up front)."""

from __future__ import annotations

import importlib

from steps.core.errors import ParamsError
from steps.core.step import Step

STEP_NAMES = ("build_model", "build_text", "spectral", "allocate", "prune", "evaluate",
              "drift", "finetune", "diagnose")


def load_step(name: str) -> Step:
    if name not in STEP_NAMES:
        raise ParamsError(f"unknown step {name!r}; known steps: {', '.join(STEP_NAMES)}")
    return importlib.import_module(f"steps.{name}.step").STEP
