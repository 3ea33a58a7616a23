"""prune: magnitude, Wanda and SparseGPT on any HF causal LM's decoder blocks.

Takes: a model (and an allocation decisions table, calibration text for Wanda/SparseGPT).
Gives: the pruned model (HF directory) and its sparsity report.
Start reading: step.py, then api.py (prune) and the method modules.

from steps.prune import prune, save_pruned
report = prune(model, tokenizer, method="wanda", sparsity=0.5, calibration_text=path)
save_pruned(model, tokenizer, "pruned/", report)
"""

from steps.core.blocks import DEFAULT_BATCH_TOKENS
from steps.core.calibration import (
    DEFAULT_NSAMPLES,
    DEFAULT_SEQLEN,
    CalibrationError,
    calibration_input_ids,
)
from steps.prune.api import (
    METHODS,
    REPORT_FILE,
    PruneError,
    layer_patterns,
    parse_nm,
    prune,
    read_allocation,
    report_calibration,
    save_pruned,
    sparsity_report,
)
from steps.prune.masks import Pattern, PatternError

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_NSAMPLES",
    "DEFAULT_SEQLEN",
    "METHODS",
    "REPORT_FILE",
    "CalibrationError",
    "Pattern",
    "PatternError",
    "PruneError",
    "calibration_input_ids",
    "layer_patterns",
    "parse_nm",
    "prune",
    "read_allocation",
    "report_calibration",
    "save_pruned",
    "sparsity_report",
]
