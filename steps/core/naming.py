"""Which block (transformer block, residual stage) a weight matrix belongs to, from its name.

Every step that groups matrices by block reads it here, so allocate, finetune and spectral
agree on what "block 3" is.
"""

from __future__ import annotations

import re

# `model.layers.3.`, `model.decoder.layers.3.`, `transformer.h.3.`, `encoder.layer.3.`,
# `blocks.3.`: the leftmost match wins, so nested indices (experts.5) are ignored.
BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
# Also ResNet-style stages (`layer3.`) and `block.3.`: what the spectral table records.
_STAGE_PATTERN = re.compile(
    r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?:\.|$)|(?:^|\.)layer(\d+)(?:\.|$)"
)


def block_of(name: str) -> int | None:
    """Block / stage index in a layer name: model.layers.3., transformer.h.3.,
    encoder.layer.3., blocks.3., layer3. -> 3; None when the name has none."""
    match = _STAGE_PATTERN.search(name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))
