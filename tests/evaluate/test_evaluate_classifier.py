"""The evaluate step on a fine-tuned text classifier: accuracy on the data's test split."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from steps.core.registry import load_step
from steps.core.step import run_step
from steps.core.store import open_store
from steps.evaluate.classify import ClassifierEvalError

TINY = {"dataset": "fortunes", "max_train_examples": 32, "max_eval_examples": 16,
        "epochs": 1, "batch_size": 16, "max_length": 32, "lr": 1e-3}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("store")))
    model = run_step(load_step("build_model"), {"name": "tiny-llama"}, {}, store=store)
    result = run_step(load_step("finetune"), TINY, {"model": model.digests()["model"]},
                      store=store)
    return store, model.digests()["model"], result.digests()


def test_accuracy_matches_the_fine_tune_on_the_same_examples(tuned, tmp_path):
    store, _, outputs = tuned
    evaluation = run_step(load_step("evaluate"), {"name": "tuned", "max_examples": 16,
                                                  "max_length": 32},
                          {"model": outputs["model"], "data": outputs["data"]}, store=store)
    row = pq.read_table(store.get(evaluation.digests()["evaluation"],
                                  tmp_path / "e.parquet")).to_pylist()[0]
    metrics = json.loads(store.get(outputs["metrics"], tmp_path / "m.json").read_text())
    assert row["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert row["eval_examples"] == 16 and row["params"] > 0 and row["size_bytes"] > 0


def test_a_model_that_is_not_a_classifier_is_refused(tuned):
    store, base, outputs = tuned
    before = {m.digest for m in store.list()}
    with pytest.raises(ClassifierEvalError, match="is not a sequence classifier"):
        run_step(load_step("evaluate"), {}, {"model": base, "data": outputs["data"]},
                 store=store)
    assert {m.digest for m in store.list()} == before


def test_data_with_other_labels_is_refused(tuned, tmp_path):
    store, _, outputs = tuned
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"verse {i}", "label": label}) + "\n"
                             for i, label in enumerate(["psalm", "gospel"] * 10)))
    with pytest.raises(ClassifierEvalError, match=r"does not classify the labels \['gospel'"):
        run_step(load_step("evaluate"), {}, {"model": outputs["model"],
                                            "data": store.put(other, "text").digest},
                 store=store)
