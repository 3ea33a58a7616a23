"""Fine-tuning flows: TempBalance and AlphaLoRA, each beside its plain baseline.

- `tempbalance_finetune`: spectral (hill) -> allocate (tempbalance: the layer factors at
  the start) -> finetune with TempBalance -> evaluate, and the same without TempBalance;
- `alphalora_finetune`: spectral (alpha_peak) -> allocate (alphalora: experts per block)
  -> finetune with those experts -> evaluate, and with the same budget spread uniformly.

Both runs of a comparison share the model, data, subset and seed, so the only difference
is the method. The result is a comparison table (also a Prefect table artifact).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow.parquet as pq
from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.common import FlowRun, RunSettings, flow_run_context, model_digest
from steps.core.step import StepResult


class FinetuneData(BaseModel):
    """What every fine-tuning comparison shares."""

    dataset: Literal["fortunes", "kjv-testament"] = Field(
        "fortunes", description="Built-in text-classification set.")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of the training split "
                            "(a seeded low-data subset).")
    max_train_examples: int | None = Field(256, ge=1, description="Cap the training split "
                                           "first (None: all).")
    max_eval_examples: int | None = Field(128, ge=1, description="Cap validation and test.")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    max_length: int = Field(64, ge=4, description="Tokens per example.")
    seed: int = Field(0, ge=0)

    def shared(self) -> dict[str, Any]:
        """The finetune step's params that both runs of a comparison share."""
        return self.model_dump(include=set(FinetuneData.model_fields))


class TempBalanceFinetuneParams(FinetuneData):
    model: str = Field("minilm", description="minilm, tiny-llama, smollm2, or a model dir / "
                       "artifact digest.")
    rule: Literal["linear", "sigmoid"] = Field("sigmoid", description="sigmoid (TB_Sigmoid) "
                                               "for fine-tuning; linear for training.")
    lora: int | None = Field(None, ge=1, description="LoRA rank (None: full fine-tuning).")


class AlphaLoraFinetuneParams(FinetuneData):
    model: str = Field("tiny-llama", description="A decoder LM: tiny-llama, smollm2, or a "
                       "model dir / artifact digest.")
    total: int = Field(8, ge=1, description="Total experts over all blocks (same for both).")
    beta: float = Field(2.5, ge=0, description="AlphaLoRA's exponent on the block alpha.")
    rank: int = Field(8, ge=1, description="LoRA rank of each expert.")
    top_k: int = Field(2, ge=1, description="Experts per token.")
    lr: float = Field(5e-4, gt=0)


@flow(name="tempbalance_finetune", log_prints=True)
def tempbalance_finetune(params: TempBalanceFinetuneParams = TempBalanceFinetuneParams(),
                         settings: RunSettings = RunSettings()) -> list[dict]:
    """Fine-tune with and without TempBalance; compare test accuracy."""
    with flow_run_context("tempbalance_finetune", settings, params.model_dump()) as run:
        model = model_digest(run, params.model)
        metrics = run.step("spectral", {"estimator": "hill", "plots": False},
                           {"model": model}).digests()["metrics"]
        run.step("allocate", {"policy": "tempbalance", "options": {"variant": params.rule}},
                 {"metrics": metrics})
        common = params.shared() | {"lora": params.lora}
        rows = []
        for name, rule in (("plain", "none"), ("tempbalance", params.rule)):
            tuned = run.step("finetune", common | {"tempbalance": rule}, {"model": model},
                             label=f"finetune-{name}")
            rows.append(evaluated_row(run, name, tuned, params))
    publish(rows, "tempbalance-comparison", f"{params.model} on {params.dataset} at "
            f"{params.fraction:.0%} of the data: plain vs TempBalance ({params.rule})")
    return rows


@flow(name="alphalora_finetune", log_prints=True)
def alphalora_finetune(params: AlphaLoraFinetuneParams = AlphaLoraFinetuneParams(),
                       settings: RunSettings = RunSettings()) -> list[dict]:
    """Mixture-of-LoRA experts allocated by AlphaLoRA vs uniformly, at the same budget."""
    with flow_run_context("alphalora_finetune", settings, params.model_dump()) as run:
        model = model_digest(run, params.model)
        metrics = run.step("spectral", {"estimator": "alpha_peak", "plots": False},
                           {"model": model}).digests()["metrics"]
        allocations = {"uniform": 0.0, "alphalora": params.beta}  # beta 0: equal shares
        common = params.shared() | {"lora": params.rank, "top_k": params.top_k}
        rows = []
        for name, beta in allocations.items():
            experts = run.step("allocate", {"policy": "alphalora", "options": {
                "total": params.total, "beta": beta}}, {"metrics": metrics},
                label=f"allocate-{name}").digests()["decisions"]
            tuned = run.step("finetune", common, {"model": model, "experts": experts},
                             label=f"finetune-{name}")
            rows.append(evaluated_row(run, name, tuned, params))
    publish(rows, "alphalora-comparison", f"{params.model} on {params.dataset}: "
            f"{params.total} experts by AlphaLoRA vs uniform")
    return rows


def evaluated_row(run: FlowRun, method: str, tuned: StepResult, data: FinetuneData) -> dict:
    """Evaluate the fine-tuned model on the test split; its row beside the fine-tune's."""
    outputs = tuned.digests()
    evaluation = run.step("evaluate", {"name": method, "max_examples": data.max_eval_examples,
                                       "max_length": data.max_length},
                          {"model": outputs["model"], "data": outputs["data"]},
                          label=f"evaluate-{method}").digests()["evaluation"]
    metrics = json.loads(run.store.get(outputs["metrics"], run.scratch / "metrics.json")
                         .read_text())
    row = pq.read_table(run.store.get(evaluation, run.scratch / "evaluation.parquet"))
    return {"method": method, "test_accuracy": row["accuracy"][0].as_py(),
            "val_accuracy": metrics.get("val_accuracy"), "train_loss": metrics.get("train_loss"),
            "train_examples": metrics.get("train_examples"), "metrics": outputs["metrics"],
            "evaluation": evaluation}


def publish(rows: list[dict], key: str, description: str) -> None:
    create_table_artifact(rows, key=key, description=description)
