"""Zero-shot accuracy through lm-evaluation-harness (`lm-eval`), on a model already in memory.

The model comes from tailwise's own loader (dense or compressed weights) and is handed to
lm-eval's Hugging Face wrapper (`HFLM(pretrained=<module>)`); lm-eval builds the prompts,
scores every choice by log-likelihood and aggregates acc / acc_norm and their standard
errors exactly as the pruning papers report them (AlphaPruning's Table 2).

Tasks are found, in order, in a user's task dir (lm-eval YAML + local data files), in the
tasks tailwise ships (`steps/evaluate/tasks/`: `kjv_next_verse`, offline), and among
lm-eval's own tasks (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge,
openbookqa, ...), whose datasets come from the machine's Hugging Face cache or the hub.
A YAML's relative `data_files` are read next to the YAML (lm-eval would read them from the
working directory).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from steps.core.devices import resolve_device
from steps.core.factory import load_model
from steps.evaluate.metrics import EvaluationError

SHIPPED_TASKS = Path(__file__).parent / "tasks"
METRICS = ("acc", "acc_norm")
ZERO_SHOT_SCHEMA = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("acc", pa.float64()),
    ("acc_stderr", pa.float64()), ("acc_norm", pa.float64()), ("acc_norm_stderr", pa.float64()),
    ("examples", pa.int64()),
])


class ZeroShotError(EvaluationError):
    """A zero-shot task that cannot be found or whose dataset is not available."""


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], *,
              task_dir: str | os.PathLike[str] | None = None, limit: int | None = None,
              batch_size: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """One row per task: task, acc, acc_stderr, acc_norm, acc_norm_stderr, examples.

    The model is evaluated where it is (move it to the device first); `limit` keeps the
    first examples of each task.
    """
    return run_tasks(model, tokenizer, load_tasks(tasks, task_dir), limit=limit,
                     batch_size=batch_size, seed=seed)


def run_tasks(model: nn.Module, tokenizer, tasks: dict, *, limit: int | None = None,
              batch_size: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """`zero_shot` on tasks already loaded (`load_tasks`)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    with torch.no_grad(), quiet_lm_eval():
        # The tasks are built already; without a manager of its own lm-eval would index
        # all of its task files (~40 s) before looking at them.
        manager = TaskManager(include_path=SHIPPED_TASKS, include_defaults=False)
        results = simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit,
                                  task_manager=manager,
                                  num_fewshot=0, log_samples=False, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    return [task_row(name, results) for name in tasks]


def zero_shot_dir(model_dir: str | os.PathLike[str], tasks: list[str], *,
                  task_dir: str | os.PathLike[str] | None = None, limit: int | None = None,
                  device: str = "auto") -> list[dict[str, Any]]:
    """`zero_shot` on a saved model (dense or compressed weights, read by tailwise's loader)
    with the tokenizer saved beside it."""
    from transformers import AutoTokenizer

    loaded = load_tasks(tasks, task_dir)  # a missing task or dataset fails before loading
    model = load_model(model_dir).to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return run_tasks(model, tokenizer, loaded, limit=limit)


def write_zero_shot_rows(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Zero-shot rows as Parquet (ZERO_SHOT_SCHEMA); returns the path."""
    table = pa.Table.from_pylist([{k: row.get(k) for k in ZERO_SHOT_SCHEMA.names}
                                  for row in rows], schema=ZERO_SHOT_SCHEMA)
    pq.write_table(table, path)
    return Path(path)


def task_row(name: str, results: dict) -> dict[str, Any]:
    """A task's metrics from lm-eval's results (`acc,none`, `acc_stderr,none`, ...)."""
    metrics = results["results"][name]
    row: dict[str, Any] = {"task": name}
    for metric in METRICS:
        row[metric] = _number(metrics.get(f"{metric},none"))
        row[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
    row["examples"] = int(results["n-samples"][name]["effective"])
    return row


def _number(value: Any) -> float | None:
    """lm-eval writes 'N/A' where a metric or its stderr does not exist."""
    return float(value) if isinstance(value, int | float) else None


def load_tasks(names: list[str], task_dir: str | os.PathLike[str] | None = None) -> dict:
    """lm-eval Task objects by name (see the module docstring for where they are looked up)."""
    from lm_eval.tasks import TaskManager

    if not names:
        raise ZeroShotError("no zero-shot task named")
    local = [Path(task_dir)] if task_dir is not None else []
    if local and not local[0].is_dir():
        raise ZeroShotError(f"task dir {task_dir} is not a directory")
    with quiet_lm_eval():
        manager = TaskManager(include_path=[SHIPPED_TASKS, *local], include_defaults=False)
        others = [name for name in names if name not in manager.task_index]
        if others:  # lm-eval's own tasks; the user's and tailwise's take precedence
            manager = TaskManager(include_path=[*_lm_eval_folders_naming(others),
                                                SHIPPED_TASKS, *local], include_defaults=False)
        return {name: _load_task(manager, name, task_dir) for name in names}


def _lm_eval_folders_naming(names: list[str]) -> list[Path]:
    """The folders of lm-eval's task YAML files that mention one of the names.

    lm-eval's own index parses all of its ~14,000 task files (~40 s); a text search finds
    the few that can define the names (boolq: super_glue/boolq) in a second or two.
    """
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return sorted({path.parent for path in root.rglob("*.yaml")
                   if pattern.search(path.read_text(encoding="utf-8", errors="replace"))})


@contextmanager
def quiet_lm_eval(level: int = logging.ERROR) -> Iterator[None]:
    """lm-eval's INFO/WARNING chatter (defaults it fills into task configs) off the console."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _load_task(manager, name: str, task_dir):
    """Build one task (lm-eval loads its dataset here)."""
    entry = manager.task_index.get(name)
    if entry is None:
        where = f"in task dir {task_dir}, nor " if task_dir is not None else ""
        raise ZeroShotError(f"zero-shot task '{name}' is not {where}among tailwise's or "
                            "lm-eval's tasks")
    spec = _spec(entry)
    try:
        return manager.load([spec])["tasks"][name]
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise ZeroShotError(f"zero-shot task '{name}': dataset "
                            f"{_dataset_name(entry.cfg or {})} is {_why_missing(exc)}") from exc


def _why_missing(exc: BaseException) -> str:
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
               if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
    if offline:
        return f"not on this machine and the hub is offline ({'/'.join(offline)}=1)"
    return f"not available ({_first_line(exc)})"


def _spec(entry) -> str | dict:
    """The task's name, or its config with relative local data files made absolute."""
    config = entry.cfg or {}
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if entry.yaml_path is None or not isinstance(files, dict):
        return entry.name
    resolved = {split: _beside(entry.yaml_path, path) for split, path in files.items()}
    if resolved == files:
        return entry.name
    return config | {"dataset_kwargs": config["dataset_kwargs"] | {"data_files": resolved}}


def _beside(yaml_path: Path, path: Any) -> Any:
    if not isinstance(path, str) or "://" in path or Path(path).is_absolute():
        return path
    return str(yaml_path.parent / path)


def _dataset_name(config: dict) -> str:
    path, name = config.get("dataset_path"), config.get("dataset_name")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if path in ("json", "csv", "parquet", "text") and files:
        return str(files)
    return f"{path}/{name}" if name else str(path)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
