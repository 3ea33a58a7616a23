"""Offline text-classification data: built-in sets from the corpora, a JSONL artifact format
with a validating reader, and the recorded low-data subset.

    write_jsonl(build_dataset("fortunes"), path)   # {"text", "label", "split"} per line
    data = read_dataset(path)                      # validated; splits made here if absent
    subset = low_data_subset(data, 0.01, seed=0)   # stratified; written with write_subset

Built-in sets (Debian packages, no download):
- ``fortunes``: quotes from four ``fortunes`` category files (computers, politics, science,
  men-women; 580-1050 records each), labelled by their file;
- ``kjv-testament``: the King James verses labelled ``old`` / ``new`` testament.

Splits are seeded and stratified: within each label, a seeded permutation puts 80 % in
train, 10 % in validation and 10 % in test. A JSONL file without ``split`` fields gets the
same seeded split when read, so any ``{"text", "label"}`` file can be fine-tuned on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steps.core.data import SPLITS, kjv_chapters, load_fortunes
from steps.core.errors import TailwiseError
from steps.core.training.subsets import low_data_indices

__all__ = [
    "DATASETS",
    "Example",
    "LowDataSubset",
    "TextDataError",
    "TextDataset",
    "build_dataset",
    "low_data_subset",
    "read_dataset",
    "write_jsonl",
    "write_subset",
]

FORTUNE_CATEGORIES = ("computers", "politics", "science", "men-women")
DATASETS = ("fortunes", "kjv-testament")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, validation, test
_OLD_TESTAMENT_BOOKS = 39  # Genesis .. Malachi, in canonical order


class TextDataError(TailwiseError, ValueError):
    """A text-classification data set that cannot be used; names the file and line."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    split: str | None = None


@dataclass(frozen=True)
class TextDataset:
    """Examples with a split each, and the sorted label names (label id = position)."""

    examples: tuple[Example, ...]
    labels: tuple[str, ...]

    def split(self, name: str) -> tuple[list[str], np.ndarray]:
        """(texts, label ids) of one split, in file order."""
        chosen = [e for e in self.examples if e.split == name]
        ids = {label: i for i, label in enumerate(self.labels)}
        return [e.text for e in chosen], np.array([ids[e.label] for e in chosen], np.int64)

    def lines(self, name: str) -> np.ndarray:
        """0-based line numbers (in the JSONL file) of one split's examples, in order."""
        return np.array([i for i, e in enumerate(self.examples) if e.split == name], np.int64)


# ------------------------------------------------------------------ built-in sets


def build_dataset(name: str, seed: int = 0) -> list[Example]:
    """A built-in data set with seeded stratified splits (see the module docstring)."""
    if name == "fortunes":
        raw = [Example(f.text, f.label) for f in load_fortunes(FORTUNE_CATEGORIES)]
    elif name == "kjv-testament":
        raw = list(_kjv_verses_by_testament())
    else:
        raise TextDataError(f"unknown data set {name!r}; built-in: {', '.join(DATASETS)}")
    return assign_splits(raw, seed)


def _kjv_verses_by_testament() -> Iterable[Example]:
    books: list[str] = []
    for chapter in kjv_chapters():
        heading, *verses = chapter.split("\n")
        book = heading.rsplit(" ", 1)[0]  # "Song of Solomon 3" -> "Song of Solomon"
        if not books or books[-1] != book:
            books.append(book)
        label = "old" if len(books) <= _OLD_TESTAMENT_BOOKS else "new"
        yield from (Example(verse, label) for verse in verses if verse.strip())


def assign_splits(examples: list[Example], seed: int) -> list[Example]:
    """Seeded, stratified 80/10/10 train/validation/test split; file order is kept."""
    rng = np.random.default_rng(seed)
    split_of = [""] * len(examples)
    by_label: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(i)
    for label in sorted(by_label):
        members = rng.permutation(by_label[label])
        n_val = math.floor(SPLIT_FRACTIONS[1] * len(members) + 0.5)
        n_test = math.floor(SPLIT_FRACTIONS[2] * len(members) + 0.5)
        n_train = len(members) - n_val - n_test
        for position, i in enumerate(members):
            split_of[i] = SPLITS[0 if position < n_train else 1 if position < n_train + n_val
                                 else 2]
    return [Example(e.text, e.label, s) for e, s in zip(examples, split_of, strict=True)]


# --------------------------------------------------------------------- JSONL files


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike[str]) -> Path:
    """One {"text", "label"[, "split"]} object per line (UTF-8, keys in that order)."""
    out = Path(path)
    with out.open("w", encoding="utf-8") as f:
        for e in examples:
            record = {"text": e.text, "label": e.label}
            if e.split is not None:
                record["split"] = e.split
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def read_dataset(path: str | os.PathLike[str], seed: int = 0) -> TextDataset:
    """Read and validate a JSONL text-classification file.

    Every line is an object with a non-empty string ``text`` and a non-empty ``label``
    (string or integer); ``split``, if any line has one, must be on every line and be one
    of train / validation / test. Without splits the seeded 80/10/10 split is made here.
    The train split must hold at least two labels.
    """
    file = Path(path)
    if not file.is_file():
        raise TextDataError(f"data file {file} does not exist")
    examples = []
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(_parse_line(file, number, line))
    if not examples:
        raise TextDataError(f"{file}: no examples (expected one JSON object per line)")
    with_split = sum(e.split is not None for e in examples)
    if 0 < with_split < len(examples):
        raise TextDataError(f"{file}: 'split' is given on {with_split} of {len(examples)} "
                            "lines; give it on every line or on none")
    if with_split == 0:
        examples = assign_splits(examples, seed)
    labels = tuple(sorted({e.label for e in examples}))
    train_labels = {e.label for e in examples if e.split == "train"}
    if len(train_labels) < 2:
        raise TextDataError(f"{file}: the train split has {len(train_labels)} label(s); a "
                            "classifier needs at least 2")
    return TextDataset(tuple(examples), labels)


def _parse_line(file: Path, number: int, line: str) -> Example:
    where = f"{file}: line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TextDataError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise TextDataError(f"{where}: expected a JSON object with 'text' and 'label'")
    text, label, split = record.get("text"), record.get("label"), record.get("split")
    if not isinstance(text, str) or not text.strip():
        raise TextDataError(f"{where}: missing or empty 'text'")
    if isinstance(label, bool) or not isinstance(label, str | int) or str(label).strip() == "":
        raise TextDataError(f"{where}: missing or empty 'label' (a string or an integer)")
    if split is not None and split not in SPLITS:
        raise TextDataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    return Example(text, str(label), split)


# ---------------------------------------------------------------- low-data subset


@dataclass(frozen=True)
class LowDataSubset:
    """Which training examples a low-data run used (indices into the train split)."""

    fraction: float
    seed: int
    train_size: int
    indices: np.ndarray  # sorted positions within the train split
    lines: np.ndarray  # the same examples as 0-based line numbers of the JSONL file

    def to_json(self, data_digest: str | None = None) -> dict:
        return {"fraction": self.fraction, "seed": self.seed, "data": data_digest,
                "train_size": self.train_size, "subset_size": len(self.indices),
                "indices": self.indices.tolist(), "lines": self.lines.tolist()}


def low_data_subset(data: TextDataset, fraction: float, seed: int,
                    max_examples: int | None = None) -> LowDataSubset:
    """A stratified, seeded subset holding ``fraction`` of the training split.

    max_examples: first cap the training split to this many examples (a stratified, seeded
    choice as well), then take the fraction of that: fast runs on a small machine.
    """
    _, labels = data.split("train")
    pool = np.arange(len(labels))
    if max_examples is not None and max_examples < len(labels):
        pool = low_data_indices(labels, max_examples / len(labels), seed=seed)
    chosen = pool[low_data_indices(labels[pool], fraction, seed=seed)]
    return LowDataSubset(float(fraction), int(seed), len(labels), chosen,
                         data.lines("train")[chosen])


def write_subset(subset: LowDataSubset, path: str | os.PathLike[str],
                 data_digest: str | None = None) -> Path:
    out = Path(path)
    out.write_text(json.dumps(subset.to_json(data_digest), indent=1) + "\n", encoding="utf-8")
    return out
