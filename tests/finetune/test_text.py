"""Text-classification data: built-in sets, seeded splits, the validating reader, subsets."""

from __future__ import annotations

import json

import pytest

from steps.core.training.text import (
    Example,
    TextDataError,
    assign_splits,
    build_dataset,
    low_data_subset,
    read_dataset,
    write_jsonl,
    write_subset,
)


def examples(n: int, labels=("a", "b")) -> list[Example]:
    return [Example(f"text number {i}", labels[i % len(labels)]) for i in range(n)]


def test_fortunes_is_labelled_by_category_and_split_80_10_10(tmp_path):
    built = build_dataset("fortunes")
    assert build_dataset("fortunes") == built  # deterministic
    labels = {e.label for e in built}
    assert labels == {"computers", "politics", "science", "men-women"}
    for label in labels:
        splits = [e.split for e in built if e.label == label]
        assert abs(splits.count("validation") / len(splits) - 0.1) < 0.01
        assert abs(splits.count("test") / len(splits) - 0.1) < 0.01
    data = read_dataset(write_jsonl(built, tmp_path / "f.jsonl"))
    assert data.examples == tuple(built) and data.labels == tuple(sorted(labels))


def test_kjv_testaments():
    verses = build_dataset("kjv-testament")
    old = [e for e in verses if e.label == "old"]
    new = [e for e in verses if e.label == "new"]
    assert len(old) == 23145 and len(new) == 7957  # the KJV's verse counts
    assert old[0].text.startswith("In the beginning God created")
    assert new[0].text.startswith("The book of the generation of Jesus Christ")


def test_splits_depend_on_the_seed_only():
    a, b = assign_splits(examples(100), 0), assign_splits(examples(100), 1)
    assert a == assign_splits(examples(100), 0) and a != b
    assert [e.text for e in a] == [e.text for e in examples(100)]  # file order kept


def test_file_without_splits_gets_the_seeded_split(tmp_path):
    path = write_jsonl(examples(40), tmp_path / "plain.jsonl")
    data = read_dataset(path, seed=3)
    assert [e.split for e in data.examples] == [e.split for e in assign_splits(examples(40), 3)]
    texts, labels = data.split("train")
    assert len(texts) == 32 and labels.tolist().count(0) == 16


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "x", "label": "a"}\n{"text": "y"}\n', "line 2: missing or empty 'label'"),
    ('{"text": "x", "label": ""}\n', "line 1: missing or empty 'label'"),
    ('{"text": "", "label": "a"}\n', "line 1: missing or empty 'text'"),
    ('{"text": "x", "label": true}\n', "line 1: missing or empty 'label'"),
    ('{"text": "x", "label": "a"}\nnot json\n', "line 2: not valid JSON"),
    ('["x", "a"]\n', "line 1: expected a JSON object"),
    ('{"text": "x", "label": "a", "split": "dev"}\n', "split 'dev' is not one of"),
    ('{"text": "x", "label": "a", "split": "train"}\n{"text": "y", "label": "b"}\n',
     "'split' is given on 1 of 2 lines"),
    ('{"text": "x", "label": "a"}\n' * 10, "the train split has 1 label"),
    ("\n\n", "no examples"),
])
def test_bad_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TextDataError, match=message) as err:
        read_dataset(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(TextDataError, match="does not exist"):
        read_dataset(tmp_path / "missing.jsonl")


def test_integer_labels_are_accepted(tmp_path):
    path = tmp_path / "ints.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n"
                            for i in range(30)))
    assert read_dataset(path).labels == ("0", "1", "2")


def test_low_data_subset_is_seeded_stratified_and_recorded(tmp_path):
    data = read_dataset(write_jsonl(assign_splits(examples(200, ("a", "b", "c", "d")), 0),
                                    tmp_path / "d.jsonl"))
    first = low_data_subset(data, 0.1, seed=5)
    assert (first.indices == low_data_subset(data, 0.1, seed=5).indices).all()
    assert (first.indices != low_data_subset(data, 0.1, seed=6).indices).any()
    _, labels = data.split("train")
    assert len(first.indices) == 16 and all((labels[first.indices] == k).sum() == 4
                                            for k in range(4))
    record = json.loads(write_subset(first, tmp_path / "s.json", "abc").read_text())
    assert record["lines"] == first.lines.tolist() and record["data"] == "abc"
    assert all(data.examples[line].split == "train" for line in record["lines"])
    capped = low_data_subset(data, 0.5, seed=5, max_examples=40)
    assert len(capped.indices) == 20
    with pytest.raises(ValueError, match="fraction"):
        low_data_subset(data, 0.0, seed=0)
