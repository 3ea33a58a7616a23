"""`tailwise convert`: a pickled state dict (.pth/.pt/.bin) -> safetensors, tensors only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tailwise_cli.app import app, console


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(
        help="A state dict saved with torch.save (.pth, .pt, .bin), a shard index "
        "(pytorch_model.bin.index.json) or a directory of them (its config comes along).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write "
                                         "(model.safetensors, + config files with --config).")],
    config: Annotated[Path | None, typer.Option(
        help="config.json, or a directory with config.json and tokenizer files: makes the "
        "output a Hugging Face model directory.")] = None,
    key: Annotated[str | None, typer.Option(
        help="The checkpoint entry holding the weights (default: found, e.g. state_dict).")
    ] = None,
) -> None:
    """Pickled state dict -> safetensors, reading tensors only (never a full unpickle)."""
    from steps.core.convert import convert_checkpoint

    done = convert_checkpoint(checkpoint, output, config=config, key=key)
    notes = [f"{done.tensors} tensors"]
    if done.nested_key:
        notes.append(f"read from entry {done.nested_key!r}")
    if done.shared:
        notes.append(f"{len(done.shared)} sharing memory with another, stored as copies "
                     f"({', '.join(done.shared[:3])}{', ...' if len(done.shared) > 3 else ''})")
    if done.ignored:
        notes.append(f"left out non-tensor entries {', '.join(done.ignored[:5])}")
    if done.side_files:
        notes.append(f"with {', '.join(done.side_files)}")
    console.print(f"converted {checkpoint} -> {done.output}/model.safetensors: "
                  f"{'; '.join(notes)}", soft_wrap=True)
