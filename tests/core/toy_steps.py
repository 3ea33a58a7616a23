"""Two tiny steps for testing the step machinery without any model code."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from steps.core.step import Output, Step, StepContext


class ShoutParams(BaseModel):
    times: int = Field(1, ge=1)


def shout(ctx: StepContext, params: ShoutParams, inputs: dict[str, Path]) -> dict:
    out = ctx.workdir / "loud.txt"
    out.write_text(inputs["text"].read_text().upper() * params.times)
    ctx.log_metrics({"chars": len(out.read_text())})
    return {"loud": Output(out, "text")}


class CountParams(BaseModel):
    min_length: int = Field(0, ge=0)


def count(ctx: StepContext, params: CountParams, inputs: dict[str, Path]) -> dict:
    words = [w for w in inputs["text"].read_text().split() if len(w) >= params.min_length]
    out = ctx.workdir / "count.json"
    out.write_text(f'{{"words": {len(words)}}}')
    ctx.log_file(out)
    return {"count": Output(out, "table", "application/json")}


def crash(ctx: StepContext, params: ShoutParams, inputs: dict[str, Path]) -> dict:
    (ctx.workdir / "half.txt").write_text("half")
    raise RuntimeError("step crashed half way")


SHOUT = Step("shout", "1", ShoutParams, ("text",), shout)
COUNT = Step("count", "1", CountParams, ("text",), count)
CRASH = Step("crash", "1", ShoutParams, ("text",), crash)
