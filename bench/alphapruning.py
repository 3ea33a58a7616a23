"""AlphaPruning on SmolLM2-135M: perplexity of uniform / OWL / AlphaPruning allocations x
magnitude / Wanda / SparseGPT at 50-80 % sparsity, with timings and peak RSS.

    python bench/alphapruning.py            # the full table (~20 min on 2 CPU cores)
    python bench/alphapruning.py --quick    # 50 and 70 %, fewer tokens (~6 min)

SmolLM2-135M-Instruct comes from a Q4_1 GGUF: its weights were 4-bit quantised and expanded
back to float32. Calibration uses KJV validation text, perplexity KJV test text (held out).
The papers calibrate on 128 x 2048 tokens; on CPU this uses far fewer (printed below).

Allocations (global target S = parameter-weighted mean over the decoder-block layers):
- uniform: S for every layer;
- OWL: outlier ratios (share of |W| * ||X|| above 5x the block mean) from the calibration
  data, lambda 0.08 (OWL's LLaMA setting);
- AlphaPruning: block means of alpha_peak from the spectral step, epsilon 0.3 (inside the
  reference ranges for every method: 0.2-0.3 Wanda/SparseGPT, 0.3-0.5 magnitude).

Performance: Wanda's pruning time against one forward pass of the calibration set through
the model (target within 2x: it runs each block twice, statistics then propagation of the
pruned outputs, plus a selection per layer), SparseGPT's time, and the peak RSS measured
after the Wanda run (before the bench keeps a dense copy of the weights for its table).
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steps.core.blocks import find_blocks, outlier_ratios, resolve_device  # noqa: E402
from steps.core.data import default_cache_dir, kjv_splits  # noqa: E402
from steps.core.pretrained import load_hf_model, smollm2_hf_dir  # noqa: E402
from steps.evaluate import perplexity_of_ids, tokenize_file  # noqa: E402
from steps.prune import calibration_input_ids, prune  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "alphapruning")
OWL_LAMBDA = 0.08
EPSILON = 0.3


def rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 and 70 %%, fewer tokens")
    parser.add_argument("--nsamples", type=int, help="calibration sequences (default 8; quick 4)")
    parser.add_argument("--seqlen", type=int, help="calibration tokens each (default 256)")
    parser.add_argument("--eval-seqlen", type=int, default=1024, help="perplexity window")
    parser.add_argument("--eval-windows", type=int, help="windows evaluated (default 2)")
    parser.add_argument("--sparsities", type=float, nargs="+", help="default 0.5 0.6 0.7 0.8")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see below)")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    args = parser.parse_args()
    args.nsamples = args.nsamples or (4 if args.quick else 8)
    args.seqlen = args.seqlen or 256
    args.eval_windows = args.eval_windows or 2
    args.sparsities = args.sparsities or ([0.5, 0.7] if args.quick else [0.5, 0.6, 0.7, 0.8])
    return args


class Bench:
    """The model, its dense weights, and the data every configuration shares."""

    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        self.args = args
        self.path = smollm2_hf_dir(default_cache_dir())
        self.model = load_hf_model(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        splits = kjv_splits()
        self.calibration_text = splits["validation"]
        self.test_ids = tokenize_file(self.tokenizer, splits["test"])
        self.calibration_ids = calibration_input_ids(
            self.tokenizer,
            self.calibration_text,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=0,
        )
        self.dense: dict[str, torch.Tensor] | None = None

    def perplexity(self) -> float:
        return perplexity_of_ids(
            self.model,
            self.test_ids,
            seqlen=self.args.eval_seqlen,
            max_windows=self.args.eval_windows,
            device=self.args.device,
        )

    def prune(self, method: str, **target) -> float:
        """Prune (from the dense weights) and return the seconds it took."""
        if self.dense is not None:
            self.model.load_state_dict(self.dense)
        started = time.perf_counter()
        prune(
            self.model,
            self.tokenizer,
            method=method,
            calibration_text=self.calibration_text,
            nsamples=self.args.nsamples,
            seqlen=self.args.seqlen,
            seed=0,
            device=self.args.device,
            **target,
        )
        return time.perf_counter() - started

    @torch.no_grad()
    def calibration_forward_s(self) -> float:
        """One forward pass of the calibration set through the whole model (batch 1)."""
        device = resolve_device(self.args.device)
        self.model.to(device)
        started = time.perf_counter()
        for row in self.calibration_ids:
            self.model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
        elapsed = time.perf_counter() - started
        self.model.to("cpu")
        return elapsed

    def keep_dense_copy(self) -> None:
        self.model = load_hf_model(self.path)
        self.dense = {k: v.clone() for k, v in self.model.state_dict().items()}


def sparsegpt_reference_s(bench: Bench, forward_s: float) -> float:
    """The reference SparseGPT's cost on this model: one forward of the calibration set, and
    per layer one Hessian accumulation (X^T X over the calibration tokens) and one blocked
    OBS pass (Cholesky inverse + the 128-column sweep). Timed on each layer's own shape with
    random inputs, apart from any pipeline (capture, hooks, propagation)."""
    import copy

    from steps.core.blocks import LayerStats, weight_matrix
    from steps.prune.masks import Pattern
    from steps.prune.sparsegpt import prune_layer

    tokens = bench.args.nsamples * bench.args.seqlen
    generator = torch.Generator().manual_seed(0)
    total = forward_s
    for name, layer in find_blocks(bench.model).all_layers().items():
        d_in = weight_matrix(layer).shape[1]
        inputs = torch.randn(tokens, d_in, generator=generator)
        started = time.perf_counter()
        hessian = inputs.T @ inputs
        prune_layer(copy.deepcopy(layer), LayerStats(torch.zeros(d_in), hessian, tokens),
                    Pattern(0.5), layer_name=name)
        total += time.perf_counter() - started
    return total


def block_metrics(bench: Bench):
    """Per-layer alpha_peak (spectral step) and OWL outlier ratios of the dense model."""
    from steps.spectral import analyze

    prefix = re.escape(find_blocks(bench.model).prefix)
    alphas = analyze(bench.model, estimator="alpha_peak", include=rf"^{prefix}\.", device="cpu")
    outliers = outlier_ratios(bench.model, bench.calibration_ids, device=bench.args.device)
    return alphas.select(["name", "alpha", "N", "M"]), outliers


def allocation_for(policy: str, sparsity: float, alphas, outliers):
    """Keyword arguments for prune(): one ratio, or a decisions table."""
    from steps.allocate import allocate

    if policy == "uniform":
        return {"sparsity": sparsity}
    if policy == "owl":
        return {"allocation": allocate(outliers, "owl", sparsity=sparsity, lam=OWL_LAMBDA)}
    return {"allocation": allocate(alphas, "alphapruning", sparsity=sparsity, epsilon=EPSILON)}


def print_table(results: dict, dense: float, sparsities: list[float]) -> None:
    header = f"{'method':<10} {'allocation':<13}" + "".join(f"{s:>12.0%}" for s in sparsities)
    print(f"\nperplexity on held-out KJV text (dense: {dense:.2f})")
    print(header)
    print("-" * len(header))
    for method in METHODS:
        for policy in ALLOCATIONS:
            cells = "".join(f"{results[method, policy, s]:>12.2f}" for s in sparsities)
            print(f"{method:<10} {policy:<13}{cells}")


def main() -> None:
    args = parse_args()
    # Many small ops in SparseGPT's column loop: with 2 threads on a busy 2-core machine,
    # OpenMP contention made it ~30x slower; 1 thread is the robust default.
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not name.*")
    started = time.perf_counter()
    rss_before_model = rss_now_mb()
    bench = Bench(args)
    print("SmolLM2-135M-Instruct: weights 4-bit quantised (Q4_1 GGUF) and expanded back to fp32")
    print(
        f"calibration: {args.nsamples} x {args.seqlen} tokens of KJV validation text "
        f"(papers: 128 x 2048 of C4); evaluation: {args.eval_windows} x {args.eval_seqlen} "
        f"tokens of KJV test text; device {args.device}, {args.threads} torch thread(s)"
    )

    forward_s = bench.calibration_forward_s()
    wanda_s = bench.prune("wanda", sparsity=0.5)
    rss_after_wanda = peak_rss_mb()
    results = {("wanda", "uniform", 0.5): bench.perplexity()}
    bench.keep_dense_copy()
    dense = bench.perplexity()
    alphas, outliers = block_metrics(bench)

    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for method in METHODS:
        for policy in ALLOCATIONS:
            for sparsity in args.sparsities:
                if (method, policy, sparsity) in results:
                    continue
                target = allocation_for(policy, sparsity, alphas, outliers)
                times[method].append(bench.prune(method, **target))
                results[method, policy, sparsity] = bench.perplexity()
                print(
                    f"  {method} {policy} {sparsity:.0%}: {results[method, policy, sparsity]:.2f}"
                )
    print_table(results, dense, args.sparsities)

    params = sum(p.numel() for p in bench.model.parameters())
    sparsegpt_s = sum(times["sparsegpt"]) / len(times["sparsegpt"])
    print(
        f"\ncalibration forward (whole model, {args.nsamples} x {args.seqlen}): {forward_s:.1f} s"
    )
    print(f"Wanda pruning: {wanda_s:.1f} s = {wanda_s / forward_s:.2f}x the forward (target <= 2x)")
    reference_s = sparsegpt_reference_s(bench, forward_s)
    print(
        f"SparseGPT pruning (mean of {len(times['sparsegpt'])} runs): {sparsegpt_s:.1f} s = "
        f"{sparsegpt_s / forward_s:.2f}x the forward, {sparsegpt_s / reference_s:.2f}x the "
        f"reference algorithm's cost ({reference_s:.1f} s: forward + per layer one Hessian "
        "accumulation and one blocked inverse; target <= 2x)"
    )
    hidden = bench.model.config.hidden_size
    activations_mb = 2 * args.nsamples * args.seqlen * hidden * 4 / 2**20
    print(
        f"peak RSS after Wanda: {rss_after_wanda:.0f} MB, {rss_after_wanda - rss_before_model:.0f}"
        f" MB above the process before the model was loaded (model fp32: "
        f"{params * 4 / 2**20:.0f} MB; two blocks of activations: {activations_mb:.0f} MB)"
    )
    print(f"total bench time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
