"""Text-classification data sets, kept at their old import path: they live in
``steps.core.training.text``."""

from steps.core.training.text import (
    DATASETS,
    Example,
    LowDataSubset,
    TextDataError,
    TextDataset,
    assign_splits,
    build_dataset,
    low_data_subset,
    read_dataset,
    write_jsonl,
    write_subset,
)

__all__ = ["DATASETS", "Example", "LowDataSubset", "TextDataError", "TextDataset",
           "assign_splits", "build_dataset", "low_data_subset", "read_dataset", "write_jsonl",
           "write_subset"]
