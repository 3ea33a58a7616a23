"""AlphaPruning on SmolLM2-135M: perplexity of uniform / OWL / AlphaPruning allocations x
magnitude / Wanda / SparseGPT at 50-80 % sparsity, with timings and peak RSS.

    python bench/alphapruning.py            # the full table (~20 min on 2 CPU cores)
    python bench/alphapruning.py --quick    # 50 and 70 %, fewer tokens (~6 min)
    python bench/alphapruning.py --perf     # only the timings and peak RSS (~3 min)

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
the whole model (target within 2x: it runs each block twice, statistics then propagation of
the pruned outputs, plus a selection per layer), both at batch 1 and batched in the chunks
the pruner uses (--batch-tokens), in wall-clock and CPU seconds (the CPU time of this
process is less disturbed by other work on a shared machine); SparseGPT's time against the
reference algorithm's cost; and Wanda's peak RSS, measured in a fresh process (load the model,
prune) against the model size plus two blocks of activations.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import print_provenance  # noqa: E402
from steps.allocate.owl import calibration_budget, calibration_note, with_calibration  # noqa: E402
from steps.core.blocks import (  # noqa: E402
    DEFAULT_BATCH_TOKENS,
    find_blocks,
    outlier_ratios,
    sequences_per_chunk,
)
from steps.core.data import default_cache_dir, kjv_splits  # noqa: E402
from steps.core.devices import resolve_device  # noqa: E402
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
    """The process's peak RSS: the kernel's VmHWM (since exec or the last reset) on Linux,
    else ru_maxrss, which after fork and exec starts from the parent's RSS."""
    return vm_hwm_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def mapped_rss_mb(suffix: str) -> float | None:
    """Resident MB of the memory mappings of files ending in suffix (the memory-mapped
    safetensors checkpoint, including its pages copied on write), from /proc/self/smaps."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            inside = len(fields) >= 6 and fields[5].endswith(suffix)
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1])
    return total / 1024


def rss_after_malloc_trim_mb() -> float:
    """RSS after asking glibc to return the freed heap memory it keeps (malloc_trim)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return rss_now_mb()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 and 70 %%, fewer tokens")
    parser.add_argument("--perf", action="store_true", help="only the performance figures")
    parser.add_argument("--nsamples", type=int, help="calibration sequences (default 8; quick 4)")
    parser.add_argument("--seqlen", type=int, help="calibration tokens each (default 256)")
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=DEFAULT_BATCH_TOKENS,
        help="calibration tokens per block call (whole sequences)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds")
    parser.add_argument("--eval-seqlen", type=int, default=1024, help="perplexity window")
    parser.add_argument("--eval-windows", type=int, help="windows evaluated (default 2)")
    parser.add_argument("--sparsities", type=float, nargs="+", help="default 0.5 0.6 0.7 0.8")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see below)")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.nsamples = args.nsamples or (4 if args.quick else 8)
    args.seqlen = args.seqlen or 256
    args.eval_windows = args.eval_windows or 2
    args.sparsities = args.sparsities or ([0.5, 0.7] if args.quick else [0.5, 0.6, 0.7, 0.8])
    return args


class Seconds:
    """Wall-clock and CPU seconds of a timed section (the CPU time of this process, all
    threads: less disturbed by other work on a shared machine than the wall clock)."""

    def __enter__(self) -> Seconds:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


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

    def prune(self, method: str, **target) -> Seconds:
        """Prune (from the dense weights) and return the time it took."""
        if self.dense is not None:
            self.model.load_state_dict(self.dense)
        with Seconds() as took:
            prune(
                self.model,
                self.tokenizer,
                method=method,
                calibration_text=self.calibration_text,
                nsamples=self.args.nsamples,
                seqlen=self.args.seqlen,
                seed=0,
                device=self.args.device,
                batch_tokens=self.args.batch_tokens,
                **target,
            )
        return took

    @torch.no_grad()
    def calibration_forward(self, sequences: int) -> Seconds:
        """One forward pass of the calibration set through the whole model, `sequences` at
        a time."""
        device = resolve_device(self.args.device)
        self.model.to(device)
        ids = self.calibration_ids
        with Seconds() as took:
            for start in range(0, len(ids), sequences):
                self.model(input_ids=ids[start : start + sequences].to(device), use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
        self.model.to("cpu")
        return took

    def keep_dense_copy(self) -> None:
        """Copy the (still dense) weights, so every prune starts from them."""
        self.dense = {k: v.clone() for k, v in self.model.state_dict().items()}

    def restore_dense(self) -> None:
        self.model.load_state_dict(self.dense)


def sparsegpt_reference_s(bench: Bench, forward_s: float) -> float:
    """The reference SparseGPT's cost on this model: one forward of the calibration set, and
    per layer one Hessian accumulation (X^T X over the calibration tokens) and one blocked
    OBS pass (Cholesky inverse + the 128-column sweep). Timed on each layer's own shape with
    random inputs, apart from any pipeline (capture, hooks, propagation)."""

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
        prune_layer(
            copy.deepcopy(layer),
            LayerStats(torch.zeros(d_in), hessian, tokens),
            Pattern(0.5),
            layer_name=name,
        )
        total += time.perf_counter() - started
    return total


def block_metrics(bench: Bench):
    """Per-layer alpha_peak (spectral step) and OWL outlier ratios of the dense model."""
    from steps.spectral import analyze

    prefix = re.escape(find_blocks(bench.model).prefix)
    alphas = analyze(bench.model, estimator="alpha_peak", include=rf"^{prefix}\.", device="cpu")
    outliers = outlier_ratios(bench.model, bench.calibration_ids, device=bench.args.device)
    samples, seqlen = bench.calibration_ids.shape
    return (alphas.select(["name", "alpha", "alpha_peak", "N", "M"]),
            with_calibration(outliers, samples, seqlen))


def allocation_for(policy: str, sparsity: float, alphas, outliers):
    """Keyword arguments for prune(): one ratio, or a decisions table."""
    from steps.allocate import allocate

    if policy == "uniform":
        return {"sparsity": sparsity}
    if policy == "owl":
        return {"allocation": allocate(outliers, "owl", sparsity=sparsity, lam=OWL_LAMBDA)}
    return {"allocation": allocate(alphas, "alphapruning", sparsity=sparsity, epsilon=EPSILON)}


def print_table(results: dict, dense: float, sparsities: list[float], owl_note: str | None
                ) -> None:
    header = f"{'method':<10} {'allocation':<13}" + "".join(f"{s:>12.0%}" for s in sparsities)
    print(f"\nperplexity on held-out KJV text (dense: {dense:.2f})")
    if owl_note:
        print(f"owl: {owl_note}")
    print(header)
    print("-" * len(header))
    for method in METHODS:
        for policy in ALLOCATIONS:
            cells = "".join(f"{results[method, policy, s]:>12.2f}" for s in sparsities)
            print(f"{method:<10} {policy:<13}{cells}")


@dataclass
class WandaTiming:
    """Median wall and CPU seconds over the rounds, and the median of each round's ratios."""

    forward_1: Seconds
    forward_batched: Seconds
    wanda: Seconds
    ratios: dict[str, float]  # "wall/1", "wall/batched", "cpu/1", "cpu/batched"


def _median_seconds(runs: list[Seconds]) -> Seconds:
    median = Seconds()
    median.wall = statistics.median(r.wall for r in runs)
    median.cpu = statistics.median(r.cpu for r in runs)
    return median


def time_wanda(bench: Bench) -> WandaTiming:
    """Rounds of: forward at batch 1, forward in the pruner's chunks, Wanda at 50 % (from the
    dense weights); each ratio compares measurements of the same round."""
    chunk = sequences_per_chunk(bench.calibration_ids, bench.args.batch_tokens)
    runs: dict[str, list[Seconds]] = {"1": [], "batched": [], "wanda": []}
    ratios: dict[str, list[float]] = {}
    for round_ in range(bench.args.repeats):
        runs["1"].append(bench.calibration_forward(1))
        runs["batched"].append(bench.calibration_forward(chunk))
        runs["wanda"].append(bench.prune("wanda", sparsity=0.5))
        for clock in ("wall", "cpu"):
            for base in ("1", "batched"):
                ratio = getattr(runs["wanda"][-1], clock) / getattr(runs[base][-1], clock)
                ratios.setdefault(f"{clock}/{base}", []).append(ratio)
        print(
            f"  round {round_ + 1}: forward batch 1 {runs['1'][-1].wall:.2f} s, batched "
            f"{runs['batched'][-1].wall:.2f} s, Wanda {runs['wanda'][-1].wall:.2f} s (wall); "
            f"Wanda / forward: {ratios['wall/1'][-1]:.2f}x, {ratios['wall/batched'][-1]:.2f}x "
            f"(wall), {ratios['cpu/1'][-1]:.2f}x, {ratios['cpu/batched'][-1]:.2f}x (CPU)",
            flush=True,
        )
    return WandaTiming(
        forward_1=_median_seconds(runs["1"]),
        forward_batched=_median_seconds(runs["batched"]),
        wanda=_median_seconds(runs["wanda"]),
        ratios={key: statistics.median(values) for key, values in ratios.items()},
    )


def warm_up_code(config, tokenizer, calibration_text: str, args: argparse.Namespace) -> None:
    """Prune a tiny model of the same class once, so the baseline has the code of the whole
    path paged in (torch's kernels, the tokenizer, the report's pyarrow table) but holds no
    weights: the peak above it is data, which is what the target bounds."""
    import transformers

    tiny = copy.deepcopy(config)
    tiny.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    model = getattr(transformers, config.architectures[0])(tiny)
    prune(model, tokenizer, method="wanda", sparsity=0.5, calibration_text=calibration_text,
          nsamples=2, seqlen=32, seed=0, device=args.device, batch_tokens=args.batch_tokens)
    del model


def wanda_memory(args: argparse.Namespace) -> dict[str, float | None]:
    """In this (fresh) process: load SmolLM2, prune it with Wanda at 50 %, report RSS (MB)."""
    from transformers import AutoConfig, AutoTokenizer

    path = smollm2_hf_dir(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    calibration_text = kjv_splits()["validation"]
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    warm_up_code(config, tokenizer, calibration_text, args)
    before_load = rss_after_malloc_trim_mb()
    model = load_hf_model(path)
    after_load = rss_now_mb()
    peak_load = peak_rss_mb()
    reset = reset_peak_rss()
    prune(
        model,
        tokenizer,
        method="wanda",
        sparsity=0.5,
        calibration_text=calibration_text,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=0,
        device=args.device,
        batch_tokens=args.batch_tokens,
    )
    element = next(model.parameters()).element_size()
    peak_during_prune = peak_rss_mb() if reset else None
    peak, after_prune = max(peak_load, peak_rss_mb()), rss_now_mb()
    return {
        "before_load": before_load,
        "after_load": after_load,
        "peak": peak,
        "peak_during_prune": peak_during_prune,
        "after_prune": after_prune,
        "allocator_kept": after_prune - rss_after_malloc_trim_mb(),
        "checkpoint_pages": mapped_rss_mb(".safetensors"),
        "model": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "activations": 2 * args.nsamples * args.seqlen * config.hidden_size * element / 2**20,
    }


def measure_wanda_memory(args: argparse.Namespace) -> dict[str, float | None]:
    """wanda_memory() in a fresh Python process, so nothing of this one counts."""
    command = [
        sys.executable, __file__, "--rss-child",
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--batch-tokens", str(args.batch_tokens), "--threads", str(args.threads),
        "--device", args.device,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the memory measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_performance(
    bench: Bench, timing: WandaTiming, sparsegpt_runs: list[Seconds], memory: dict
) -> None:
    args = bench.args
    chunk = sequences_per_chunk(bench.calibration_ids, args.batch_tokens)
    forward_1, forward_b, wanda, ratios = (
        timing.forward_1, timing.forward_batched, timing.wanda, timing.ratios,
    )  # fmt: skip
    print(
        f"\ncalibration forward (whole model, {args.nsamples} x {args.seqlen}; median of "
        f"{args.repeats} round(s)): batch 1 {forward_1.wall:.2f} s wall / {forward_1.cpu:.2f} s "
        f"CPU; batched as the pruner ({chunk} sequences per call, --batch-tokens "
        f"{args.batch_tokens}) {forward_b.wall:.2f} s / {forward_b.cpu:.2f} s"
    )
    print(
        f"Wanda pruning: {wanda.wall:.2f} s wall / {wanda.cpu:.2f} s CPU = "
        f"{ratios['wall/1']:.2f}x the batch-1 forward and {ratios['wall/batched']:.2f}x the "
        f"batched forward (wall; CPU: {ratios['cpu/1']:.2f}x, {ratios['cpu/batched']:.2f}x; "
        "target <= 2x)"
    )
    reference_s = sparsegpt_reference_s(bench, forward_1.wall)
    sparsegpt_s = statistics.mean(r.wall for r in sparsegpt_runs)
    print(
        f"SparseGPT pruning (mean of {len(sparsegpt_runs)} runs): {sparsegpt_s:.1f} s = "
        f"{sparsegpt_s / forward_1.wall:.2f}x the batch-1 forward, "
        f"{sparsegpt_s / reference_s:.2f}x the reference algorithm's cost ({reference_s:.1f} s: "
        "forward + per layer one Hessian accumulation and one blocked inverse; target <= 2x)"
    )
    print_memory(memory)


def print_memory(memory: dict[str, float | None]) -> None:
    above = memory["peak"] - memory["before_load"]
    target = memory["model"] + memory["activations"]
    print(
        f"Wanda peak RSS (fresh process: load, prune): {memory['peak']:.0f} MB, {above:.0f} MB "
        f"above the process before the weights were loaded (libraries imported) against "
        f"model {memory['model']:.0f} MB + two blocks of activations "
        f"{memory['activations']:.0f} MB = {target:.0f} MB: "
        f"{'within' if above <= target else 'over'} the target by {abs(target - above):.0f} MB"
    )
    during, pages = memory["peak_during_prune"], memory["checkpoint_pages"]
    if during is None or pages is None:
        return
    rest = memory["after_prune"] - memory["before_load"] - pages
    print(
        f"  loading added {memory['after_load'] - memory['before_load']:.0f} MB (the checkpoint "
        f"is memory-mapped: weights page in when first read, pruned pages are copied on "
        f"write), pruning peaked {during - memory['after_load']:.0f} MB above that; at the end "
        f"{pages:.0f} MB are checkpoint pages and {rest:.0f} MB the rest, of which "
        f"{memory['allocator_kept']:.0f} MB freed memory that glibc's malloc keeps (returned by "
        "malloc_trim), the remainder library code paged in and small live allocations"
    )


def main() -> None:
    args = parse_args()
    # Many small ops in SparseGPT's column loop: with 2 threads on a busy 2-core machine,
    # OpenMP contention made it ~30x slower; 1 thread is the robust default.
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not name.*")
    if args.rss_child:
        print(json.dumps(wanda_memory(args)))
        return
    started = time.perf_counter()
    # First, while this process is small: the child's figures must not include it.
    memory = measure_wanda_memory(args)
    bench = Bench(args)
    print("SmolLM2-135M-Instruct: weights 4-bit quantised (Q4_1 GGUF) and expanded back to fp32")
    print(
        f"calibration: {args.nsamples} x {args.seqlen} tokens of KJV validation text "
        f"(papers: 128 x 2048 of C4); evaluation: {args.eval_windows} x {args.eval_seqlen} "
        f"tokens of KJV test text; device {args.device}, {args.threads} torch thread(s)"
    )
    print_provenance(model=bench.path, texts={"calibration": bench.calibration_text,
                                              "evaluation": kjv_splits()["test"]},
                     settings={"nsamples": args.nsamples, "seqlen": args.seqlen,
                               "batch_tokens": args.batch_tokens, "eval_seqlen": args.eval_seqlen,
                               "eval_windows": args.eval_windows, "device": args.device,
                               "owl_lambda": OWL_LAMBDA, "epsilon": EPSILON})
    bench.keep_dense_copy()
    timing = time_wanda(bench)
    if args.perf:
        bench.restore_dense()
        print_performance(bench, timing, [bench.prune("sparsegpt", sparsity=0.5)], memory)
        return

    results = {("wanda", "uniform", 0.5): bench.perplexity()}  # the last round's Wanda 50 %
    bench.restore_dense()
    dense = bench.perplexity()
    alphas, outliers = block_metrics(bench)

    times: dict[str, list[Seconds]] = {method: [] for method in METHODS}
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
    print_table(results, dense, args.sparsities, calibration_note(calibration_budget(outliers)))
    bench.restore_dense()
    print_performance(bench, timing, times["sparsegpt"], memory)
    print(f"total bench time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
