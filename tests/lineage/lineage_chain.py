"""A small chain of toy steps: text -> shout -> count."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from flows.common import RunSettings, flow_run_context
from steps.core.step import Output, Step, StepContext, run_step
from steps.core.store import ArtifactStore


class ShoutParams(BaseModel):
    times: int = Field(1, ge=1)


def shout(ctx: StepContext, params: ShoutParams, inputs: dict[str, Path]) -> dict:
    out = ctx.workdir / "loud.txt"
    out.write_text(inputs["text"].read_text().upper() * params.times)
    return {"loud": Output(out, "text", "text/plain")}


class CountParams(BaseModel):
    min_length: int = Field(0, ge=0)


def count(ctx: StepContext, params: CountParams, inputs: dict[str, Path]) -> dict:
    words = [w for w in inputs["text"].read_text().split() if len(w) >= params.min_length]
    out = ctx.workdir / "count.json"
    out.write_text(f'{{"words": {len(words)}}}')
    return {"count": Output(out, "table", "application/json")}


SHOUT = Step("shout", "1", ShoutParams, ("text",), shout)
COUNT = Step("count", "1", CountParams, ("text",), count)
STEPS = {"shout": SHOUT, "count": COUNT}


@dataclass
class Chain:
    store: ArtifactStore
    text: str
    loud: str
    count: str


def make_chain(store: ArtifactStore, root: Path, times: int = 2) -> Chain:
    source = root / "in.txt"
    source.write_text("to be or not to be, that is the question\n")
    text = store.put(source, "text").digest
    loud = run_step(SHOUT, {"times": times}, {"text": text}, store=store).digests()["loud"]
    counted = run_step(COUNT, {"min_length": 2}, {"text": loud}, store=store).digests()["count"]
    return Chain(store, text, loud, counted)


@flow
def toy_flow(source: str, settings: RunSettings) -> dict:
    with flow_run_context("toy", settings, {"source": source}) as run:
        text = run.source(source, "text")
        loud = run.step("shout", {"times": 2}, {"text": text}).digests()["loud"]
        counted = run.step("count", {"min_length": 2}, {"text": loud}).digests()["count"]
        other = run.step("shout", {"times": 3}, {"text": text}).digests()["loud"]
        return {"text": text, "loud": loud, "count": counted, "other": other}
