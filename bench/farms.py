"""Benchmark: FARMS alphas (batched eigensolve vs the reference's loop) and FARMS pruning.

    .venv/bin/python bench/farms.py [--part speed|pruning|all] [--models smollm2,llama2048]
        [--blocks N] [--ops K]  # pruning options: --help

Speed (CPU, one matrix at a time; BLAS and torch pinned to one thread, then again with
every core): for every matrix of the chosen blocks, three timings of the same FARMS windows
(2000-row windows, Q = 1):
- ours: ``steps.core.farms.farms_spectra`` (one float64 Gram per row position, windows
  as diagonal blocks of it, batched float64 eigvalsh, the windows split over the threads);
- reference: the FARMS code's loop, ``torch.linalg.svdvals`` per window on the float32
  matrix (``sampling.fixed_sampling``, as the reference runs it, on CPU);
- floor: the summed float64 ``eigvalsh`` time of the windows' Gram matrices alone (the
  Grams built outside the clock).
Both eigenvalue sets are fitted with the same alpha_peak fit; the largest relative alpha
difference says the ratios compare equal results. Targets: reference / ours >= 5,
ours / floor <= 1.3.

Models: ``smollm2`` (SmolLM2-135M, the converted local checkpoint) and ``llama2048`` (a
random LLaMA-shaped model, d = 2048, 5632 MLP, 4 KV heads of 64: TinyLlama-1.1B's
shapes; default-initialised nn.Linear weights). ``--blocks`` limits the decoder blocks
analysed (all blocks share shapes, so the ratios hardly depend on it); ``--ops`` sets the
window grid (the reference's LLM setting is 10; fewer keeps the d = 2048 run short: the
per-window costs, which the ratios measure, do not depend on it, while the shared Gram
is amortised over fewer windows, which only makes ours slower).

Pruning part (``--part pruning``): SmolLM2-135M pruned by Wanda and SparseGPT at 70 % and
80 % with three allocations of the global target: uniform, AlphaPruning (block means of
``alpha_peak``) and AlphaPruning + FARMS (block means of ``alpha_peak_farms``, the FARMS
windows at the reference's LLM settings: 2000 rows, Q = 1, 10 x 10 positions), both with
eps = 0.3 as FARMS uses. Calibration (KJV validation text) and perplexity (KJV test text)
are bench/alphapruning.py's, with its defaults (8 x 256 calibration tokens, 2 x 1024
evaluation tokens); zero-shot accuracy is lm-eval's on the shipped ``kjv_next_verse`` task
(4 choices, 500 examples; ``--limit`` keeps the first ones). One table, then a line that
says whether FARMS helped in these cells. SmolLM2's q/o projections are 576 x 576: their
FARMS window is the whole matrix, so only the k/v (192 x 576) and MLP (1536 x 576) alphas
differ from alpha_peak.

    .venv/bin/python bench/farms.py --part pruning                  # the full comparison
    .venv/bin/python bench/farms.py --part pruning --methods wanda --nsamples 4 --limit 100
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.alphapruning import Bench  # noqa: E402
from bench.common import print_provenance  # noqa: E402
from steps.core.blocks import DEFAULT_BATCH_TOKENS, find_blocks  # noqa: E402
from steps.core.data import kjv_splits  # noqa: E402
from steps.core.farms import FarmsOptions, farms_spectra, window_starts  # noqa: E402
from steps.core.fits import fit_power_law  # noqa: E402
from steps.core.weights import iter_weight_matrices  # noqa: E402

POLICY_METRIC = {"uniform": None, "alphapruning": "alpha_peak",
                 "alphapruning+farms": "alpha_peak_farms"}
EPSILON = 0.3  # FARMS's AlphaPruning setting for 70 % and 80 % (0.25 only at 85 %)
TASK = "kjv_next_verse"

LLAMA_2048_BLOCK = {  # name: (out, in)
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (256, 2048),
    "self_attn.v_proj": (256, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (5632, 2048),
    "mlp.up_proj": (5632, 2048),
    "mlp.down_proj": (2048, 5632),
}


def smollm2_matrices(blocks: int):
    from steps.core.data import default_cache_dir
    from steps.core.pretrained import smollm2_hf_dir

    path = smollm2_hf_dir(default_cache_dir())
    for name, layer_type, tensor in iter_weight_matrices(path):
        if layer_type == "linear" and ".layers." in name and int(name.split(".")[2]) < blocks:
            yield name, tensor


def llama2048_matrices(blocks: int):
    torch.manual_seed(0)
    for block in range(blocks):
        for suffix, (out_features, in_features) in LLAMA_2048_BLOCK.items():
            layer = torch.nn.Linear(in_features, out_features, bias=False)
            yield f"model.layers.{block}.{suffix}", layer.weight.data


def reference_windows(matrix: torch.Tensor, options: FarmsOptions):
    """The windows of the FARMS code's fixed_sampling (its r cap, its grid)."""
    rows, cols = matrix.shape
    r = min(options.window, rows, cols)
    c = int(r * options.q)
    for a in window_starts(rows, r, options.ops):
        for b in window_starts(cols, c, options.ops):
            yield matrix[a : a + r, b : b + c]


def reference_eigs(matrix: torch.Tensor, options: FarmsOptions) -> np.ndarray:
    """fixed_sampling as the reference runs it: svdvals per float32 window."""
    matrix = matrix.float()
    eigs = [torch.square(torch.linalg.svdvals(w)) for w in reference_windows(matrix, options)]
    return torch.sort(torch.cat(eigs)).values.double().numpy()


def floor_seconds(matrix: torch.Tensor, options: FarmsOptions) -> float:
    """Summed float64 eigvalsh time of the windows' Gram matrices (built off the clock)."""
    total = 0.0
    for window in reference_windows(matrix.double(), options):
        gram = (window.t() @ window if window.shape[0] >= window.shape[1]
                else window @ window.t()).numpy()
        start = time.perf_counter()
        np.linalg.eigvalsh(gram)
        total += time.perf_counter() - start
    return total


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def alpha(evals: np.ndarray) -> float:
    return fit_power_law(evals, estimator="alpha_peak").alpha


def bench_model(label: str, matrices, options: FarmsOptions) -> None:
    ours_s = ref_s = floor_s = 0.0
    worst, count, windows = 0.0, 0, 0
    for name, matrix in matrices:
        spectra, seconds = timed(farms_spectra, matrix, "linear", options)
        ours_s += seconds
        reference, seconds = timed(reference_eigs, matrix, options)
        ref_s += seconds
        floor_s += floor_seconds(matrix, options)
        ours_alpha, ref_alpha = alpha(spectra.groups[0]), alpha(reference)
        worst = max(worst, abs(ours_alpha - ref_alpha) / abs(ref_alpha))
        count += 1
        windows += spectra.windows
        print(f"  {name:<40} {tuple(matrix.shape)!s:>14} windows {spectra.windows:>3} of "
              f"{spectra.rows}x{spectra.cols}  alpha {ours_alpha:.4f} (ref {ref_alpha:.4f})",
              flush=True)
    print(f"{label}: {count} matrices, {windows} windows (window {options.window}, q "
          f"{options.q}, ops {options.ops})")
    print(f"  ours {ours_s:.1f} s | reference svdvals loop {ref_s:.1f} s | eigvalsh floor "
          f"{floor_s:.1f} s")
    print(f"  reference / ours = {ref_s / ours_s:.2f}x (target >= 5) | ours / floor = "
          f"{ours_s / floor_s:.2f}x (target <= 1.3) | max |alpha diff| / alpha = {worst:.2e}")


def run_speed(args: argparse.Namespace) -> None:
    """The timings at one thread (the per-window cost the targets name), then with every
    core: ours splits the windows over the threads, the reference's loop gets the same
    threads for its svdvals."""
    sources = {"smollm2": (smollm2_matrices, args.ops), "llama2048": (llama2048_matrices,
                                                                        args.llama_ops)}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, numpy {np.__version__}, {threads} thread(s)")
        with threadpool_limits(limits=threads):
            for label in args.models.split(","):
                make, ops = sources[label]
                bench_model(label, make(args.blocks), FarmsOptions(ops=ops))


@dataclass
class Scores:
    """Perplexity and zero-shot accuracy of one model state."""

    perplexity: float
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float

    def cells(self) -> str:
        return (f"{self.perplexity:>10.2f} {self.acc:>6.3f} ±{self.acc_stderr:.3f} "
                f"{self.acc_norm:>6.3f} ±{self.acc_norm_stderr:.3f}")


def scores(bench: Bench, limit: int | None) -> Scores:
    from steps.evaluate import zero_shot

    perplexity = bench.perplexity()
    [row] = zero_shot(bench.model, bench.tokenizer, [TASK], limit=limit)
    return Scores(perplexity, row["acc"], row["acc_stderr"], row["acc_norm"],
                  row["acc_norm_stderr"])


def block_alphas(bench: Bench):
    """alpha_peak and alpha_peak_farms (FARMS's LLM settings) of the decoder-block layers."""
    from steps.spectral import analyze

    prefix = re.escape(find_blocks(bench.model).prefix)
    return analyze(bench.model, estimator="alpha_peak", farms=True, include=rf"^{prefix}\.",
                   device="cpu")


def prune_target(policy: str, sparsity: float, alphas) -> dict:
    """Keyword arguments for prune(): one ratio, or AlphaPruning's decisions on a metric."""
    from steps.allocate import allocate

    metric = POLICY_METRIC[policy]
    if metric is None:
        return {"sparsity": sparsity}
    return {"allocation": allocate(alphas, "alphapruning", sparsity=sparsity, epsilon=EPSILON,
                                   metric=metric)}


def describe_alphas(alphas) -> None:
    """How far FARMS moves the alphas, and so the allocation, on this model."""
    peak = np.asarray(alphas["alpha_peak"].to_pylist(), dtype=float)
    farms = np.asarray(alphas["alpha_peak_farms"].to_pylist(), dtype=float)
    differ = ~np.isclose(peak, farms, rtol=1e-9)
    allocations = {p: prune_target(p, 0.7, alphas)["allocation"]["sparsity"].to_numpy()
                   for p in ("alphapruning", "alphapruning+farms")}
    moved = np.abs(allocations["alphapruning"] - allocations["alphapruning+farms"])
    print(f"alphas of {len(peak)} layers: alpha_peak {peak.min():.2f}-{peak.max():.2f}, "
          f"alpha_peak_farms {farms.min():.2f}-{farms.max():.2f}; {int(differ.sum())} layers "
          f"differ (the others' FARMS window is the whole matrix); correlation "
          f"{np.corrcoef(peak, farms)[0, 1]:.3f}; at 70 % the two allocations differ by up to "
          f"{moved.max():.3f} (mean {moved.mean():.3f}) in a layer's sparsity")


def print_pruning_table(results: dict, dense: Scores, args: argparse.Namespace) -> None:
    header = (f"{'method':<10} {'sparsity':>8} {'allocation':<19} {'perplexity':>10} "
              f"{'acc':>6} {'stderr':>7} {'acc_norm':>8} {'stderr':>5}")
    print(f"\nperplexity on held-out KJV text, zero-shot accuracy on {TASK} "
          f"({dense_examples(args)} examples)")
    print(header)
    print("-" * len(header))
    print(f"{'dense':<10} {'0%':>8} {'-':<19} {dense.cells()}")
    for method in args.methods:
        for sparsity in args.sparsities:
            for policy in POLICY_METRIC:
                print(f"{method:<10} {sparsity:>8.0%} {policy:<19} "
                      f"{results[method, sparsity, policy].cells()}")


def dense_examples(args: argparse.Namespace) -> str:
    return "all 500" if args.limit is None else f"the first {args.limit}"


def farms_verdict(results: dict, args: argparse.Namespace) -> str:
    """Whether FARMS's allocation beat AlphaPruning's here, by perplexity and by accuracy
    beyond two combined standard errors (independent-sample errors: a conservative bound
    for the paired examples)."""
    keys = [(m, s) for m in args.methods for s in args.sparsities]
    cells = [(results[m, s, "alphapruning"], results[m, s, "alphapruning+farms"]) for m, s in keys]
    lower = sum(f.perplexity < a.perplexity for a, f in cells)
    changes = ", ".join(f"{100 * (f.perplexity / a.perplexity - 1):+.1f} % at {m} {s:.0%}"
                        for (m, s), (a, f) in zip(keys, cells, strict=True))
    significant = [f.acc - a.acc for a, f in cells
                   if abs(f.acc - a.acc) > 2 * (a.acc_stderr ** 2 + f.acc_stderr ** 2) ** 0.5]
    accuracy = (f"accuracy differs beyond 2 standard errors in {len(significant)} of "
                f"{len(cells)} cells" if significant else
                f"no accuracy difference exceeds 2 standard errors in {len(cells)} cells")
    if lower == len(cells) and not any(d < 0 for d in significant):
        word = "FARMS helps here"
    elif lower == 0 and not any(d > 0 for d in significant):
        word = "FARMS does not help here (it hurts perplexity)"
    else:
        word = "FARMS shows no consistent effect here"
    return (f"verdict: {word}: AlphaPruning + FARMS has lower perplexity than AlphaPruning in "
            f"{lower} of {len(cells)} cells ({changes}); {accuracy} "
            f"(settings below the papers': see the calibration and evaluation lines)")


def run_pruning(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF expanded to fp32); calibration: {args.nsamples} x "
          f"{args.seqlen} tokens of KJV validation text; evaluation: {args.eval_windows} x "
          f"{args.eval_seqlen} tokens of KJV test text and {dense_examples(args)} examples of "
          f"{TASK}; device {args.device}, {args.threads} torch thread(s)")
    from steps.evaluate.kjv_task import KJV_TASK_FILE

    print_provenance(model=bench.path, texts={"calibration": bench.calibration_text,
                                              "evaluation": kjv_splits()["test"],
                                              TASK: KJV_TASK_FILE},
                     settings={"nsamples": args.nsamples, "seqlen": args.seqlen,
                               "batch_tokens": args.batch_tokens, "eval_seqlen": args.eval_seqlen,
                               "eval_windows": args.eval_windows, "limit": args.limit,
                               "lm_eval": metadata.version("lm_eval"),
                               "epsilon": EPSILON, "farms": FarmsOptions().__dict__,
                               "methods": ",".join(args.methods),
                               "sparsities": ",".join(map(str, args.sparsities))})
    bench.keep_dense_copy()
    dense = scores(bench, args.limit)
    alphas = block_alphas(bench)
    describe_alphas(alphas)
    results = {}
    for method in args.methods:
        for sparsity in args.sparsities:
            for policy in POLICY_METRIC:
                bench.prune(method, **prune_target(policy, sparsity, alphas))
                results[method, sparsity, policy] = scores(bench, args.limit)
                print(f"  {method} {sparsity:.0%} {policy}: "
                      f"{results[method, sparsity, policy].cells()}", flush=True)
    print_pruning_table(results, dense, args)
    print(farms_verdict(results, args))
    print(f"pruning part: {(time.perf_counter() - started) / 60:.1f} min")


def comma_list(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "pruning", "all"), default="all")
    parser.add_argument("--models", default="smollm2,llama2048")
    parser.add_argument("--blocks", type=int, default=1, help="decoder blocks per model")
    parser.add_argument("--ops", type=int, default=10, help="window positions per side")
    parser.add_argument("--llama-ops", type=int, default=2,
                        help="window positions per side for llama2048 (see the docstring)")
    pruning = parser.add_argument_group("pruning part (defaults: bench/alphapruning.py's)")
    pruning.add_argument("--methods", type=comma_list(str), default=["wanda", "sparsegpt"])
    pruning.add_argument("--sparsities", type=comma_list(float), default=[0.7, 0.8])
    pruning.add_argument("--nsamples", type=int, default=8, help="calibration sequences")
    pruning.add_argument("--seqlen", type=int, default=256, help="calibration tokens each")
    pruning.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                         help="calibration tokens per block call")
    pruning.add_argument("--eval-seqlen", type=int, default=1024, help="perplexity window")
    pruning.add_argument("--eval-windows", type=int, default=2, help="perplexity windows")
    pruning.add_argument("--limit", type=int, help=f"first {TASK} examples (default all 500)")
    pruning.add_argument("--threads", type=int, default=1, help="torch threads")
    pruning.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.part in ("speed", "all"):
        run_speed(args)
    if args.part in ("pruning", "all"):
        run_pruning(args)


if __name__ == "__main__":
    main()
