"""Every flow by name: its function, its params model and one line on what it does.

`tailwise run NAME` and `tailwise flows` read this table; flows/deployments.py registers
one deployment per entry. Add a flow here with one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from pydantic import BaseModel, ValidationError

from flows.alpha_prune import AlphaPruneParams, alpha_prune
from flows.common import RunSettings
from flows.demo import DemoParams, demo
from flows.finetune import (
    AlphaLoraFinetuneParams,
    TempBalanceFinetuneParams,
    alphalora_finetune,
    tempbalance_finetune,
)
from flows.model_zoo import ModelZooParams, model_zoo
from flows.prunability import PrunabilityParams, prunability
from flows.prune_sweep import PruneSweepParams, prune_sweep
from flows.spectral_audit import AuditParams, spectral_audit
from steps.core.errors import ParamsError, one_line


@dataclass(frozen=True)
class FlowEntry:
    """A flow as the CLI and the deployments see it."""

    flow: Any  # a Prefect Flow taking (params, settings)
    params: type[BaseModel]
    description: str
    deployment: str  # its deployment's name (flows/deployments.py): `<flow>/<deployment>`

    @property
    def name(self) -> str:
        return self.flow.name

    def validate(self, values: Mapping[str, Any]) -> tuple[BaseModel, RunSettings]:
        """The flow's params and run settings from one nested mapping (`settings` holds the
        run settings); an unknown or impossible value is a ParamsError naming the param."""
        values = dict(values)
        settings = values.pop("settings", {})
        if not isinstance(settings, Mapping):
            raise ParamsError(f"flow {self.name}: settings must be a mapping of run settings "
                              f"(settings.KEY=VALUE), got {settings!r}")
        check_known(self.name, values, self.params, "", self.names())
        check_known(self.name, settings, RunSettings, "settings.", self.names())
        return (validated(self.name, self.params, values, ""),
                validated(self.name, RunSettings, settings, "settings."))

    def names(self) -> list[str]:
        """Every param name the flow takes, settings as `settings.KEY`."""
        return [*self.params.model_fields, *(f"settings.{k}" for k in RunSettings.model_fields)]


def _entry(flow: Any, params: type[BaseModel], description: str,
           deployment: str | None = None) -> FlowEntry:
    return FlowEntry(flow, params, description, deployment or flow.name)


FLOWS: dict[str, FlowEntry] = {entry.name: entry for entry in (
    _entry(demo, DemoParams, "build_model -> spectral on a tiny model."),
    _entry(alpha_prune, AlphaPruneParams, "spectral -> allocate -> prune -> evaluate, "
           "AlphaPruning beside the uniform baseline and the dense model."),
    _entry(prune_sweep, PruneSweepParams, "prune + evaluate at every sparsity x method by "
           "one allocation policy, the cells in parallel (settings.executor)."),
    _entry(spectral_audit, AuditParams, "spectral per checkpoint -> drift: flag layers whose "
           "alpha moved since the previous checkpoint or audit.", deployment="nightly"),
    _entry(tempbalance_finetune, TempBalanceFinetuneParams, "spectral -> allocate -> "
           "finetune with TempBalance, beside the plain fine-tune."),
    _entry(alphalora_finetune, AlphaLoraFinetuneParams, "spectral -> allocate (experts) -> "
           "finetune with AlphaLoRA experts, beside the same budget spread uniformly."),
    _entry(model_zoo, ModelZooParams, "Train a grid of small models, measure their loss "
           "landscapes, fit the MD tree and report its transfer accuracy."),
    _entry(prunability, PrunabilityParams, "Train at each value of a temperature-like knob, "
           "magnitude-prune to each density, retrain seeds on the mask; LMC and CKA place "
           "every cell in regime I / II-A / II-B: advice, picks and the phase map."),
)}


def lookup(name: str) -> FlowEntry:
    """The flow called `name`; an unknown name is a ParamsError suggesting the closest."""
    if name in FLOWS:
        return FLOWS[name]
    raise ParamsError(f"unknown flow {name!r}{suggestion(name, list(FLOWS))}; "
                      f"flows: {', '.join(FLOWS)}")


def suggestion(name: str, known: list[str]) -> str:
    close = get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_known(flow: str, values: Mapping[str, Any], model: type[BaseModel], prefix: str,
                names: list[str]) -> None:
    """Refuse a misspelt param: it must not silently leave its default in place."""
    for key in values:
        if key not in model.model_fields:
            name = f"{prefix}{key}"
            raise ParamsError(f"flow {flow}: unknown param {name}{suggestion(name, names)}; "
                              f"see tailwise run --list")


def validated(flow: str, model: type[BaseModel], values: Mapping[str, Any],
              prefix: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if not where:  # a check across params (a model validator): its message names them
            raise ParamsError(f"flow {flow}: invalid params: {one_line(first['msg'])}") from exc
        raise ParamsError(f"flow {flow}: invalid param {prefix}{where}="
                          f"{one_line(repr(first['input']))[:80]}: {one_line(first['msg'])}") \
            from exc
