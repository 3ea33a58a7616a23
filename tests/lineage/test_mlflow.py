"""MLflow side: a step's run lists its input artifacts as datasets (digest, source) and its
model outputs as logged models; a flow's parent run carries the lineage page."""

from __future__ import annotations

from pathlib import Path

from lineage_chain import SHOUT, ShoutParams, toy_flow
from mlflow.tracking import MlflowClient

from flows.common import RunSettings
from steps.core.step import Output, Step, StepContext, run_step
from steps.core.store import open_store
from steps.core.tracking import Tracker


def tiny_model(ctx: StepContext, params: ShoutParams, inputs: dict[str, Path]) -> dict:
    folder = ctx.workdir / "model"
    folder.mkdir()
    (folder / "weights.txt").write_text(inputs["text"].read_text() * params.times)
    return {"model": Output(folder, "model")}


TRAIN = Step("train", "1", ShoutParams, ("text",), tiny_model)


def test_step_runs_record_inputs_as_datasets_and_models_as_outputs(tmp_path):
    store = open_store(str(tmp_path / "store"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    source = tmp_path / "in.txt"
    source.write_text("some text\n")
    text = store.put(source, "text").digest
    loud = run_step(SHOUT, {}, {"text": text}, store=store, tracker=tracker)
    trained = run_step(TRAIN, {"times": 2}, {"text": loud.digests()["loud"]}, store=store,
                       tracker=tracker)
    client = MlflowClient(uri)
    run = client.get_run(trained.mlflow_run_id)
    [dataset] = run.inputs.dataset_inputs
    digest = loud.digests()["loud"]
    assert (dataset.dataset.name, dataset.dataset.digest) == ("text", digest[:12])
    assert dataset.dataset.source == store.uri(digest)
    assert {t.key: t.value for t in dataset.tags} == {"mlflow.data.context": "text"}
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.tags["tailwise.digest"] == trained.digests()["model"]
    assert model.source_run_id == trained.mlflow_run_id
    assert run.data.tags["tailwise.output.model"] == trained.digests()["model"]


def test_flow_parent_run_carries_the_lineage_page(tmp_path, source, toy_registry, prefect_api,
                                                 monkeypatch):
    monkeypatch.delenv("OPENLINEAGE_URL", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    made = toy_flow(source, RunSettings(store=str(tmp_path / "store"), tracking_uri=uri))
    client = MlflowClient(uri)
    [parent] = client.search_runs([client.get_experiment_by_name("tailwise").experiment_id],
                                  "tags.`tailwise.kind` = 'flow'")
    page = Path(client.download_artifacts(parent.info.run_id, "lineage.html", str(tmp_path)))
    html = page.read_text()
    assert html.startswith("<!doctype html>")
    for digest in made.values():
        assert f'id="{digest}"' in html
