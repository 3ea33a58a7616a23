"""`python -m steps.<name> --request request.json`: the container command of every step."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from steps.core.errors import ParamsError, TailwiseError
from steps.core.step import Step, StepResult, run_step
from steps.core.store import open_store
from steps.core.tracking import open_tracker


class StepRequest(BaseModel):
    """What a runner asks a step process to do (unknown fields are refused: a typo such as
    `use_cach` must not be ignored silently)."""

    model_config = {"extra": "forbid"}

    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)
    store: str | None = None
    tracking: bool = True
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    flow_run_id: str | None = None
    flow_name: str | None = None
    use_cache: bool = True


def read_request(path: Path) -> StepRequest:
    try:
        return StepRequest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise ParamsError(f"request file {path} does not exist") from exc
    except OSError as exc:  # a directory, no permission, ...
        raise ParamsError(f"request file {path} cannot be read: {exc.strerror}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        # Keys come from the file: escaped and cut, so the message stays one short line.
        where = json.dumps(".".join(str(p) for p in first["loc"]))[1:-1][:100] or "request"
        raise ParamsError(f"request file {path}: {where}: {first['msg']}") from exc


def execute(step: Step, request: StepRequest) -> StepResult:
    return run_step(step, request.params, request.inputs, store=open_store(request.store),
                    tracker=open_tracker(request.tracking_uri, request.tracking),
                    parent_run_id=request.parent_run_id, flow_run_id=request.flow_run_id,
                    flow_name=request.flow_name, use_cache=request.use_cache)


def write_result(result: StepResult, path: Path | None) -> None:
    text = json.dumps(result.to_json(), indent=2)
    if path is None:
        print(text)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=".partial-")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def step_main(step: Step, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m steps.{step.name}",
                                     description=f"Run the {step.name} step from a request file.")
    parser.add_argument("--request", type=Path, required=True, help="request JSON")
    parser.add_argument("--result", type=Path, help="where to write the result JSON "
                        "(default: stdout)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        write_result(execute(step, read_request(args.request)), args.result)
    except TailwiseError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
