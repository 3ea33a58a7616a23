"""`tailwise model` and `tailwise demo`: build a model; AlphaPruning vs uniform on SmolLM2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tailwise_cli.app import StoreOption, app, run_and_report
from tailwise_cli.run import assignments, merge, prefect_defaults, run_flow

# The mission on a 2-core CPU in a few minutes: Wanda at 70 % on SmolLM2-135M. Calibration
# and evaluation are far smaller than the papers' (128 x 2048 tokens), so the numbers are
# a quick look (printed as such), not the reference setting.
# The flow's seqlen is the calibration and the evaluation window: 1024 as bench/alphapruning.py
# evaluates (2 x 1024 tokens, where the dense model scores its 16.67).
DEMO_PARAMS = {"model": "smollm2", "method": "wanda", "sparsity": 0.7, "epsilon": 0.3,
               "nsamples": 2, "seqlen": 1024, "eval_windows": 2, "text_chars": 200_000}


@app.command()
def model(
    name: Annotated[str, typer.Argument(
        help="tiny-gpt2, tiny-llama, cnn, mlp (seeded random) or minilm, smollm2 (pretrained, "
        "shipped by PyPI packages).")],
    seed: Annotated[int, typer.Option(help="Seed of the tiny random models.")] = 0,
    output: Annotated[Path | None, typer.Option(
        help="Also write the model directory here.")] = None,
    store: StoreOption = None,
) -> None:
    """Build a model and store it as an artifact (an HF directory with safetensors)."""
    the_store, result = run_and_report("build_model", {"name": name, "seed": seed}, {}, store)
    if output is not None:
        print(the_store.get(result.outputs["model"].digest, output))


@app.command()
def demo(
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="Override an alpha_prune param, KEY=VALUE (see `tailwise run "
        "--list`), e.g. -p nsamples=32.")] = None,
) -> None:
    """AlphaPruning beside uniform and the dense model: Wanda at 70 % on SmolLM2-135M.

    Runs the alpha_prune flow on the embedded default (no servers), prints the perplexity
    table, the HT-SR report and the lineage command. A rerun reuses every step.
    """
    prefect_defaults()
    from flows.registry import lookup

    entry = lookup("alpha_prune")
    params, settings = entry.validate(merge(DEMO_PARAMS, assignments(param or [])))
    run_flow(entry, params, settings, note=quick_setting(params))


def quick_setting(params) -> str:
    windows = params.eval_windows or "all"
    return (f"{params.method} at {params.sparsity:.0%} on {params.model}, perplexity on KJV test "
            f"text. Quick setting for a 2-core CPU: calibration {params.nsamples} x "
            f"{params.seqlen} tokens of KJV train text, evaluation {windows} x {params.seqlen} "
            f"tokens; not the papers' 128 x 2048 (raise with -p nsamples=128 -p seqlen=2048).")
