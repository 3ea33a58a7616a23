"""Zero-shot evaluation through lm-evaluation-harness: the shipped KJV task, lm-eval's accuracy
against a log-likelihood computed with plain transformers, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from steps.core.data import default_cache_dir, kjv_chapters
from steps.core.pretrained import load_hf_model, smollm2_hf_dir
from steps.evaluate.kjv_task import KJV_TASK_DIR, KJV_TASK_FILE, next_verse_examples
from steps.evaluate.zeroshot import ZeroShotError, load_tasks, zero_shot

SUBSET = 8  # examples scored twice (lm-eval, then by hand) on SmolLM2-135M
TASK = "kjv_next_verse"


def read_examples(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_task_is_the_seeded_generator_output() -> None:
    shipped = read_examples(KJV_TASK_FILE)
    assert shipped == next_verse_examples(kjv_chapters(), len(shipped), seed=0)
    assert len(shipped) == 500
    for example in shipped:
        assert len(set(example["choices"])) == 4 and 0 <= example["label"] < 4


@pytest.fixture
def short_task_dir(tmp_path):
    """A user's task dir: the shipped YAML with the shortest examples of the shipped JSONL."""
    examples = sorted(read_examples(KJV_TASK_FILE),
                      key=lambda e: len(e["context"]) + sum(map(len, e["choices"])))[:SUBSET]
    shutil.copy(KJV_TASK_DIR / f"{TASK}.yaml", tmp_path / f"{TASK}.yaml")
    (tmp_path / f"{TASK}.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return tmp_path, examples


@torch.no_grad()
def choice_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """log p(delimiter + choice | context): the continuation's tokens are those the whole
    string has beyond the context's (how the prompt would be tokenised as one text)."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + "\n" + choice)["input_ids"]
    assert whole[: len(context_ids)] == context_ids
    logits = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(logits[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def mean_and_stderr(hits: list[bool]) -> tuple[float, float]:
    n = len(hits)
    mean = sum(hits) / n
    variance = sum((h - mean) ** 2 for h in hits) / (n - 1)
    return mean, math.sqrt(variance / n)


@pytest.mark.slow
def test_lm_eval_accuracy_equals_plain_transformers_loglikelihood(short_task_dir) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    task_dir, examples = short_task_dir
    path = smollm2_hf_dir(default_cache_dir())
    model, tokenizer = load_hf_model(path), AutoTokenizer.from_pretrained(path)
    [row] = zero_shot(model, tokenizer, [TASK], task_dir=task_dir)

    hits, norm_hits = [], []
    for example in examples:
        scores = [choice_loglikelihood(model, tokenizer, example["context"], choice)
                  for choice in example["choices"]]
        per_char = [s / len(c) for s, c in zip(scores, example["choices"], strict=True)]
        hits.append(max(range(4), key=scores.__getitem__) == example["label"])
        norm_hits.append(max(range(4), key=per_char.__getitem__) == example["label"])
    acc, acc_stderr = mean_and_stderr(hits)
    acc_norm, acc_norm_stderr = mean_and_stderr(norm_hits)
    assert row["task"] == TASK and row["examples"] == SUBSET
    assert row["acc"] == pytest.approx(acc, abs=1e-12)
    assert row["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert row["acc_stderr"] == pytest.approx(acc_stderr, rel=1e-9)
    assert row["acc_norm_stderr"] == pytest.approx(acc_norm_stderr, rel=1e-9)
    assert acc > 0.25  # SmolLM2 knows how the text flows better than chance


def test_a_task_dir_without_the_named_task_is_one_line(tmp_path) -> None:
    (tmp_path / "other.yaml").write_text("task: other\ndataset_path: json\n")
    with pytest.raises(ZeroShotError, match=f"'nope' is not in task dir {tmp_path}"):
        load_tasks(["nope"], tmp_path)


def tailwise(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tailwise_cli", *args], capture_output=True,
                          text=True, timeout=600, env=os.environ | env)


@pytest.mark.slow
def test_cli_bad_tasks_exit_2_in_one_line_and_write_nothing(tmp_path) -> None:
    store = tmp_path / "store"
    env = {"TAILWISE_STORE": str(store), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    model = smollm2_hf_dir(default_cache_dir())
    empty = tmp_path / "tasks"
    empty.mkdir()
    cases = {("--tasks", "mine", "--task-dir", str(empty)): "'mine' is not in task dir",
             ("--tasks", "boolq"): "dataset aps/super_glue/boolq is not on this machine and "
                                   "the hub is offline"}
    for args, message in cases.items():
        done = tailwise("evaluate", str(model), *args, env=env)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr
    assert not store.exists() or not any(store.rglob("*"))


def test_compressed_weights_give_the_dense_model_s_accuracy(tmp_path) -> None:
    """tailwise's loader reads the bitmask format; lm-eval sees the same pruned model."""
    from steps.core.factory import build_model, byte_tokenizer, save_hf
    from steps.core.sparse_format import SPARSE_WEIGHTS_FILE, compress_dir
    from steps.evaluate.zeroshot import zero_shot_dir

    model = build_model("tiny-llama", seed=0)
    with torch.no_grad():  # half of every block matrix zeroed, as pruning leaves it
        for name, parameter in model.named_parameters():
            if name.startswith("model.layers.") and parameter.ndim == 2:
                parameter[:, ::2] = 0
    dense = save_hf(model, byte_tokenizer(), tmp_path / "dense")
    packed = save_hf(model, byte_tokenizer(), tmp_path / "packed")
    compress_dir(packed)
    assert (packed / SPARSE_WEIGHTS_FILE).is_file()
    rows = [zero_shot_dir(path, [TASK], limit=8, device="cpu") for path in (dense, packed)]
    assert rows[0] == rows[1] and rows[0][0]["examples"] == 8
