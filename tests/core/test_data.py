"""Corpora from Debian packages (bible-kjv, fortunes) and scikit-learn's bundled sets."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from steps.core import data


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def kjv_paths(tmp_path_factory):
    return data.kjv_splits(tmp_path_factory.mktemp("kjv-cache"))


def test_split_of_is_90_5_5():
    splits = [data.split_of(i) for i in range(200)]
    assert splits.count("train") == 180
    assert splits.count("validation") == 10
    assert splits.count("test") == 10


def test_kjv_has_every_chapter_in_canonical_order():
    chapters = data.kjv_chapters()
    assert len(chapters) == 1189  # chapters in the 66 books of the KJV
    assert chapters[0].startswith("Genesis 1\nIn the beginning God created the heaven")
    assert chapters[-1].startswith("Revelation 22\n")
    assert chapters[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_kjv_splits_sizes_and_disjointness(kjv_paths):
    texts = {split: path.read_text() for split, path in kjv_paths.items()}
    sizes = {split: len(text) for split, text in texts.items()}
    total = sum(sizes.values())
    assert 4_000_000 < total < 4_600_000  # the whole KJV, ~4.3 MB
    assert 0.85 < sizes["train"] / total < 0.95
    for split in ("validation", "test"):
        assert 0.02 < sizes[split] / total < 0.08
    headings = {
        split: {block.splitlines()[0] for block in text.strip().split("\n\n")}
        for split, text in texts.items()
    }
    assert len(headings["train"]) + len(headings["validation"]) + len(headings["test"]) == 1189
    assert not headings["train"] & headings["test"]
    assert not headings["validation"] & headings["test"]
    assert "Genesis 19" in headings["validation"] and "Genesis 20" in headings["test"]


def test_kjv_splits_are_deterministic_and_cached(kjv_paths, tmp_path):
    again = data.kjv_splits(tmp_path)
    for split in data.SPLITS:
        assert _digest(again[split]) == _digest(kjv_paths[split])
    # A second call reuses the files instead of rewriting them.
    mtimes = {split: path.stat().st_mtime_ns for split, path in again.items()}
    data.kjv_splits(tmp_path)
    assert {split: path.stat().st_mtime_ns for split, path in again.items()} == mtimes


def test_missing_bible_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda _name: None)
    with pytest.raises(data.MissingDataError, match=r"bible-kjv.*apt-get install -y bible-kjv"):
        data.kjv_chapters()


def test_parse_fortune_file_splits_on_percent_lines():
    text = "first\n  line two\n%\nsecond\n%\n%\nthird\n"
    assert data.parse_fortune_file(text) == ["first\n  line two", "second", "third"]


def test_fortunes_are_labelled_by_category():
    categories = data.fortune_categories()
    assert {"computers", "science", "linux"} <= set(categories)
    fortunes = data.load_fortunes(["science", "linux"])
    labels = {f.label for f in fortunes}
    assert labels == {"science", "linux"}
    assert len(fortunes) > 500
    assert all(f.text.strip() and "\n%\n" not in f.text for f in fortunes)


def test_fortunes_splits_are_deterministic_and_cover_categories(tmp_path):
    first = data.fortunes_splits(tmp_path / "a", categories=["science", "linux"])
    second = data.fortunes_splits(tmp_path / "b", categories=["linux", "science"])
    rows = {split: data.read_jsonl(path) for split, path in first.items()}
    for split in data.SPLITS:
        assert _digest(first[split]) == _digest(second[split])
        assert {row["label"] for row in rows[split]} == {"science", "linux"}
    train_texts = {row["text"] for row in rows["train"]}
    assert len(rows["train"]) > 8 * len(rows["test"])
    assert not train_texts & {row["text"] for row in rows["test"]}


def test_missing_fortunes_names_the_debian_package(tmp_path):
    with pytest.raises(data.MissingDataError, match="apt-get install -y fortunes"):
        data.fortune_categories(tmp_path / "nowhere")


def test_labelled_digits_split_is_seeded_and_stratified():
    first = data.labelled_dataset("digits", seed=3)
    second = data.labelled_dataset("digits", seed=3)
    other = data.labelled_dataset("digits", seed=4)
    assert first.x_train.shape == (1437, 64) and first.x_test.shape == (360, 64)
    assert first.x_train.dtype == np.float32 and first.y_train.dtype == np.int64
    assert first.num_classes == 10
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    assert not np.array_equal(first.y_test, other.y_test)
    assert set(np.unique(first.y_test)) == set(range(10))  # stratified: every class appears


def test_digits_images_shape_and_range():
    x, _ = data.load_labelled("digits")
    images = data.digits_images(x[:5])
    assert images.shape == (5, 1, 8, 8)
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("name, classes", [("iris", 3), ("wine", 3), ("breast_cancer", 2)])
def test_other_labelled_sets(name, classes):
    x, y = data.load_labelled(name)
    assert x.ndim == 2 and len(x) == len(y)
    assert len(np.unique(y)) == classes


def test_unknown_labelled_set_and_bad_fraction():
    with pytest.raises(ValueError, match="unknown labelled set 'mnist'"):
        data.load_labelled("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        data.labelled_dataset("iris", test_fraction=1.5)
