"""Turn a model name into a model-directory artifact.

Tiny random models come from the seeded factory; `minilm` and `smollm2` are real
pretrained models shipped by PyPI packages. SmolLM2's GGUF takes ~50 s to convert, so
the step cache (one artifact per name and seed) makes that a one-time cost per store.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from steps.core.step import Output, Step, StepContext

ModelName = Literal["tiny-gpt2", "tiny-llama", "cnn", "mlp", "minilm", "smollm2"]


class BuildModelParams(BaseModel):
    name: ModelName = Field("tiny-gpt2", description="Which model to build.")
    seed: int = Field(0, ge=0, description="Initialisation seed of the tiny random models.")
    width: int | None = Field(None, ge=1, description="Hidden width of mlp / cnn (model-zoo "
                              "grids); None: the default size.")


def build_model(ctx: StepContext, params: BuildModelParams, inputs: dict[str, Path]) -> dict:
    out = ctx.workdir / params.name
    if params.name == "minilm":
        from steps.core.pretrained import minilm_dir

        shutil.copytree(minilm_dir(), out)
    elif params.name == "smollm2":
        from steps.core.pretrained import smollm2_hf_dir

        out = smollm2_hf_dir(cache_dir=ctx.workdir)
    else:
        from steps.core.factory import LM_NAMES, build_model, byte_tokenizer, save_hf

        tokenizer = byte_tokenizer() if params.name in LM_NAMES else None
        save_hf(build_model(params.name, params.seed, params.width), tokenizer, out)
    return {"model": Output(out, "model")}


STEP = Step(name="build_model", version="1", params=BuildModelParams, inputs=(),
            fn=build_model)
