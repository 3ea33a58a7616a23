"""Run the alpha_prune flow as its own process (the fault tests kill and restart it).

    python tests/faults/flow_process.py spec.json rows.json

spec.json holds {"params": AlphaPruneParams fields, "settings": RunSettings fields}; the
flow's comparison rows are written to rows.json when it completes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.alpha_prune import AlphaPruneParams, alpha_prune
from flows.common import RunSettings

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    rows = alpha_prune(AlphaPruneParams(**spec["params"]), RunSettings(**spec["settings"]))
    Path(sys.argv[2]).write_text(json.dumps(rows))
