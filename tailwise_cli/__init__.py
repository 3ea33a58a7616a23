"""`tailwise`: the command line. One module per command group; `main` is the entry point."""

from __future__ import annotations

import os
import sys
import traceback

from steps.core.errors import TailwiseError
from steps.core.offline import OFFLINE_ENV
from tailwise_cli import (  # noqa: F401  (each module registers its commands on `app`)
    allocate,
    convert,
    demo,
    diagnose,
    evaluate,
    finetune,
    lineage,
    prune,
    report,
    run,
    spectral,
    store,
)
from tailwise_cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: user errors print one line and exit 2; `--debug` shows the traceback."""
    debug = "--debug" in sys.argv[1:]
    for key, value in OFFLINE_ENV.items():  # no telemetry, no hub downloads
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its database chatter
    try:
        app(standalone_mode=True)
    except TailwiseError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
