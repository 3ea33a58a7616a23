"""Offline datasets: text corpora from Debian packages and labelled arrays from scikit-learn.

Everything here is deterministic (no randomness in the corpus splits, a seed for the
array splits) and reads only what is installed on the machine:

- King James Bible from Debian's ``bible-kjv`` (the ``bible`` command), split by chapter
  into train / validation / test text files;
- Debian's ``fortunes`` (files under /usr/share/games/fortunes, records separated by
  ``%`` lines), labelled by the category file they come from;
- scikit-learn's bundled labelled sets (digits, iris, wine, breast_cancer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steps.core.errors import TailwiseError

SPLITS = ("train", "validation", "test")

# Every 20th chapter (and every 20th record) goes to validation, the next one to test:
# 90/5/5, spread evenly over the whole text instead of taking whole books out.
_SPLIT_PERIOD = 20
_VALIDATION_SLOT = _SPLIT_PERIOD - 2
_TEST_SLOT = _SPLIT_PERIOD - 1

FORTUNES_DIR = Path("/usr/share/games/fortunes")
_KJV_RANGE = "gen1:1-rev22:21"


class MissingDataError(TailwiseError):
    """A data source that comes from a system package is not installed."""


def _missing_debian_package(package: str, what: str) -> MissingDataError:
    return MissingDataError(
        f"{what} not found: install the Debian package '{package}' "
        f"(sudo apt-get install -y {package})"
    )


def default_cache_dir() -> Path:
    """Where generated data and converted models are cached: $TAILWISE_CACHE_DIR, else
    .tailwise/cache under the current directory."""
    return Path(os.environ.get("TAILWISE_CACHE_DIR", ".tailwise/cache"))


def split_of(index: int) -> str:
    """Which split the index-th chapter/record belongs to (deterministic, 90/5/5)."""
    slot = index % _SPLIT_PERIOD
    if slot == _VALIDATION_SLOT:
        return "validation"
    if slot == _TEST_SLOT:
        return "test"
    return "train"


def _write_atomically(path: Path, text: str) -> None:
    """Write text so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- KJV


def kjv_chapters() -> list[str]:
    """The King James Bible as a list of chapters, in canonical order (1189 of them).

    Each chapter is its heading ("Genesis 1") followed by one verse per line, without
    verse numbers, so the text reads as plain prose for language modelling.
    """
    bible = shutil.which("bible")
    if bible is None:
        raise _missing_debian_package("bible-kjv", "the 'bible' command")
    # -l with a huge width turns off line wrapping: one verse per output line.
    out = subprocess.run(
        [bible, "-l1000000", _KJV_RANGE],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    return _parse_bible_output(out)


def _parse_bible_output(out: str) -> list[str]:
    """Group the `bible` output (headings flush left, verses indented + numbered) by chapter."""
    chapters: list[list[str]] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            chapters.append([line.strip()])
            continue
        _number, _, verse = line.strip().partition(" ")
        chapters[-1].append(verse)
    return ["\n".join(lines) for lines in chapters]


def kjv_splits(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write (once) and return the KJV train/validation/test text files under cache_dir/kjv.

    Chapters are separated by a blank line; the split is by chapter index (90/5/5).
    """
    out_dir = Path(cache_dir or default_cache_dir()) / "kjv"
    paths = {split: out_dir / f"{split}.txt" for split in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index, chapter in enumerate(kjv_chapters()):
        by_split[split_of(index)].append(chapter)
    for split, chapters in by_split.items():
        _write_atomically(paths[split], "\n\n".join(chapters) + "\n")
    return paths


# ---------------------------------------------------------------------- fortunes


@dataclass(frozen=True)
class Fortune:
    text: str
    label: str  # the category = name of the fortune file it comes from


def fortune_categories(fortunes_dir: Path = FORTUNES_DIR) -> list[str]:
    """Sorted category names: the fortune files that have a strfile index (<name>.dat)."""
    if not fortunes_dir.is_dir():
        raise _missing_debian_package("fortunes", f"fortune files ({fortunes_dir})")
    names = sorted(p.stem for p in fortunes_dir.glob("*.dat"))
    categories = [n for n in names if (fortunes_dir / n).is_file()]
    if not categories:
        raise _missing_debian_package("fortunes", f"fortune files in {fortunes_dir}")
    return categories


def parse_fortune_file(text: str) -> list[str]:
    """Split a fortune file into records: separated by lines holding only '%'."""
    records, current = [], []
    for line in text.splitlines():
        if line.rstrip() == "%":
            records.append("\n".join(current))
            current = []
        else:
            current.append(line)
    records.append("\n".join(current))
    return [r.strip("\n") for r in records if r.strip()]


def load_fortunes(
    categories: Iterable[str] | None = None, fortunes_dir: Path = FORTUNES_DIR
) -> list[Fortune]:
    """All fortunes of the given categories (default: all installed), in file order."""
    chosen = list(categories) if categories is not None else fortune_categories(fortunes_dir)
    fortunes = []
    for category in chosen:
        path = fortunes_dir / category
        if not path.is_file():
            raise _missing_debian_package("fortunes", f"fortune category '{category}' ({path})")
        # A few files carry Latin-1 bytes; replace rather than fail on them.
        text = path.read_text(encoding="utf-8", errors="replace")
        fortunes += [Fortune(text=t, label=category) for t in parse_fortune_file(text)]
    return fortunes


def fortunes_splits(
    cache_dir: str | os.PathLike[str] | None = None, categories: Iterable[str] | None = None
) -> dict[str, Path]:
    """Write (once) and return fortunes train/validation/test JSONL files ({"text", "label"}).

    The split is by record index within each category (90/5/5), so every category appears
    in every split that it has enough records for. The cache is keyed by the category list.
    """
    chosen = sorted(categories) if categories is not None else fortune_categories()
    key = "all" if categories is None else "-".join(chosen)
    out_dir = Path(cache_dir or default_cache_dir()) / "fortunes" / key
    paths = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    for category in chosen:
        for index, fortune in enumerate(load_fortunes([category])):
            record = {"text": fortune.text, "label": fortune.label}
            lines[split_of(index)].append(json.dumps(record, ensure_ascii=False))
    for split, rows in lines.items():
        _write_atomically(paths[split], "".join(row + "\n" for row in rows))
    return paths


TEXT_CORPORA = ("kjv", "fortunes")


def corpus_text(corpus: str, split: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A built-in corpus split as plain text: KJV chapters, or every fortune of the split
    (all categories) separated by a blank line."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if corpus == "kjv":
        return kjv_splits(cache_dir)[split].read_text(encoding="utf-8")
    if corpus == "fortunes":
        records = read_jsonl(fortunes_splits(cache_dir)[split])
        return "\n\n".join(record["text"] for record in records) + "\n"
    raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(TEXT_CORPORA)}")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """Read a JSONL file written by fortunes_splits."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------ labelled arrays


LABELLED_SETS = ("digits", "iris", "wine", "breast_cancer")


@dataclass(frozen=True)
class LabelledData:
    x_train: np.ndarray  # float32, (n, features)
    y_train: np.ndarray  # int64, (n,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def load_labelled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A scikit-learn bundled set as (X float32, y int64). Shipped in the wheel: no download."""
    from sklearn import datasets  # deferred: sklearn import is slow and not always needed

    loaders = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }
    if name not in loaders:
        raise ValueError(f"unknown labelled set '{name}'; choose one of {', '.join(LABELLED_SETS)}")
    bunch = loaders[name]()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def labelled_dataset(name: str, seed: int = 0, test_fraction: float = 0.2) -> LabelledData:
    """A seeded, stratified train/test split of a scikit-learn bundled set."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_labelled(name)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return LabelledData(x_train, y_train, x_test, y_test, num_classes=int(y.max()) + 1)


def digits_images(x: np.ndarray) -> np.ndarray:
    """Reshape flat 8x8 digits (n, 64) into images (n, 1, 8, 8) scaled to [0, 1] for a CNN."""
    return (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
