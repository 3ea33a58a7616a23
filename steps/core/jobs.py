"""The Kubernetes Job a Prefect worker would submit for a step, rendered without Prefect.

`render_job("finetune")` fills the work pool's base job template
(infra/k8s/prefect-base-job-template.json) with the step's image and resources
from containers/steps.yaml, the way Prefect does: a value that is exactly one
``{{ name }}`` placeholder is replaced by the variable's value (keeping its type),
and a key whose variable is unset (or null) is left out, so a CPU step gets no
``nvidia.com/gpu`` limit at all. Then it applies the few fixes the Kubernetes
worker makes before submitting (env dict -> list, command string -> args).

The same `job_variables(step)` are what a step's deployment passes to Prefect
as ``job_variables``. Reads the repository's files, so it works from a checkout.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS_FILE = REPO / "containers" / "steps.yaml"
TEMPLATE_FILE = REPO / "infra" / "k8s" / "prefect-base-job-template.json"

# Prefect's placeholder syntax (prefect.utilities.templating).
PLACEHOLDER = re.compile(r"{{\s*([\w.\-\[\]$]+)\s*}}")
# What Prefect's base job configuration runs when a deployment sets no command.
FLOW_RUN_COMMAND = "prefect flow-run execute"
_UNSET = object()
DEFAULT_RETRIES = {"retries": 2, "delay_s": [2, 10]}


def steps_file() -> Path:
    """containers/steps.yaml, or the file $TAILWISE_STEPS_FILE names (a site's own resources
    and retry policy, without editing the checkout)."""
    override = os.environ.get("TAILWISE_STEPS_FILE")
    return Path(override) if override else STEPS_FILE


def load_steps(path: Path | None = None) -> dict[str, Any]:
    with open(path or steps_file()) as fh:
        return yaml.safe_load(fh)


def load_template(path: Path = TEMPLATE_FILE) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


def job_variables(step_name: str, steps: dict[str, Any] | None = None) -> dict[str, Any]:
    """The work-pool variables for a step: image, cpu, memory, gpu (only when > 0), labels."""
    steps = steps if steps is not None else load_steps()
    if step_name not in steps["steps"]:
        raise KeyError(f"step {step_name!r} is not in containers/steps.yaml; "
                       f"known: {', '.join(sorted(steps['steps']))}")
    spec = steps["steps"][step_name]
    variables = {
        "name": "tailwise-" + step_name.replace("_", "-"),
        "image": steps["images"][spec["image"]],
        "cpu": str(spec["cpu"]),
        "memory": str(spec["memory"]),
        "labels": {"app.kubernetes.io/name": "tailwise", "app.kubernetes.io/component": step_name},
    }
    if int(spec.get("gpu", 0)) > 0:
        # Kubernetes quantities are strings; "0" would still ask the device plugin.
        variables["gpu"] = str(int(spec["gpu"]))
    return variables


def retry_policy(step_name: str, steps: dict[str, Any] | None = None) -> tuple[int, list[float]]:
    """How often a step's task is retried on a transient failure, and the waits between.

    Without containers/steps.yaml (an installed package, not a checkout) the defaults hold.
    """
    if steps is None:
        steps = load_steps() if steps_file().is_file() else {"steps": {}}
    policy = DEFAULT_RETRIES | steps.get("retries", {}) | steps["steps"].get(step_name, {})
    retries = int(policy.get("retries", 0))
    delays = [float(d) for d in policy.get("delay_s", [0])]
    if retries < 0 or not delays or min(delays) < 0:
        raise ValueError(f"containers/steps.yaml: bad retry policy for {step_name!r}: {policy}")
    return retries, delays


def substitute(template: Any, values: dict[str, Any]) -> Any:
    """Fill ``{{ name }}`` placeholders like Prefect's ``apply_values`` (plain names only)."""
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole:
            return values.get(whole.group(1), _UNSET)
        return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else "",
                               template)
    if isinstance(template, dict):
        filled = {key: substitute(value, values) for key, value in template.items()}
        return {key: value for key, value in filled.items() if value is not _UNSET}
    if isinstance(template, list):
        return [item for item in (substitute(v, values) for v in template) if item is not _UNSET]
    return template


def render_job(step_name: str, overrides: dict[str, Any] | None = None, *,
               template: dict[str, Any] | None = None,
               steps: dict[str, Any] | None = None) -> dict[str, Any]:
    """The batch/v1 Job manifest for `step_name`; `overrides` are extra job variables."""
    template = copy.deepcopy(template if template is not None else load_template())
    # Prefect drops null defaults so that their placeholders disappear.
    values = {name: prop["default"] for name, prop in template["variables"]["properties"].items()
              if prop.get("default") is not None}
    values |= job_variables(step_name, steps)
    values |= overrides or {}
    config = substitute(template["job_configuration"], values)
    job = config["job_manifest"]

    # What the Kubernetes worker adds before it submits the Job:
    container = job["spec"]["template"]["spec"]["containers"][0]
    # A null value is dropped (the template's own entry, e.g. a secretKeyRef, stays).
    env = {key: value for key, value in (config.get("env") or {}).items() if value is not None}
    listed = [{"name": key, "value": value} for key, value in env.items()]
    container["env"] = listed + [e for e in container.get("env", []) if e["name"] not in env]
    args = config.get("command") or FLOW_RUN_COMMAND
    container["args"] = shlex.split(args) if isinstance(args, str) else args
    labels = {**job["metadata"].get("labels", {}), **(config.get("labels") or {})}
    job["metadata"]["labels"] = labels
    job["spec"]["template"].setdefault("metadata", {})["labels"] = dict(labels)
    if job["metadata"].get("generateName", "-") == "-":
        job["metadata"]["generateName"] = "prefect-job-"
    return job
