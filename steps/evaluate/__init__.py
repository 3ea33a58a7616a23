"""evaluate: perplexity (the pruning papers' way), accuracy, sparsity, size, one row per model.

Takes: a model (and a text for perplexity, or a labelled JSONL for a classifier).
Gives: an evaluation table (Parquet, one row per model).
Start reading: step.py, then rows.py (language models) and classify.py (classifiers).

from steps.evaluate import evaluate_model_dir, write_rows
row = evaluate_model_dir("pruned/", perplexity_text="test.txt")
write_rows([row], "metrics.parquet")
rows = zero_shot(model, tokenizer, ["kjv_next_verse", "arc_easy"], limit=500)  # lm-eval
"""

from steps.evaluate.metrics import (
    EvaluationError,
    accuracy,
    achieved_sparsity,
    default_seqlen,
    parameter_count,
    perplexity,
    perplexity_of_ids,
    size_on_disk,
    tokenize_file,
)
from steps.evaluate.rows import (
    ROW_SCHEMA,
    evaluate_model,
    evaluate_model_dir,
    rows_table,
    write_rows,
)
from steps.evaluate.zeroshot import ZeroShotError, load_tasks, zero_shot, zero_shot_dir

__all__ = [
    "ROW_SCHEMA",
    "EvaluationError",
    "ZeroShotError",
    "accuracy",
    "achieved_sparsity",
    "default_seqlen",
    "evaluate_model",
    "evaluate_model_dir",
    "load_tasks",
    "parameter_count",
    "perplexity",
    "perplexity_of_ids",
    "rows_table",
    "size_on_disk",
    "tokenize_file",
    "write_rows",
    "zero_shot",
    "zero_shot_dir",
]
