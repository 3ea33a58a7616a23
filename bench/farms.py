"""Benchmark: FARMS alphas, tailwise's batched eigensolve vs the reference's per-window loop.

    .venv/bin/python bench/farms.py [--models smollm2,llama2048] [--blocks N] [--ops K]

Speed (CPU, BLAS and torch pinned to one thread, one matrix at a time): for every matrix
of the chosen blocks, three timings of the same FARMS windows (2000-row windows, Q = 1):
- ours: ``steps.core.farms.farms_spectra`` (one float64 Gram per row position, windows
  as diagonal blocks of it, batched float64 eigvalsh);
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

Pruning part (uniform vs AlphaPruning vs AlphaPruning + FARMS at 70 % and 80 % with Wanda
and SparseGPT, perplexity and zero-shot accuracy): NOT HERE YET. It needs the zero-shot
evaluation through lm-evaluation-harness (issue 16 item 2), which another change adds;
bench/alphapruning.py has the perplexity harness to extend once it lands. No numbers are
printed for it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steps.core.farms import FarmsOptions, farms_spectra, window_starts  # noqa: E402
from steps.core.fits import fit_power_law  # noqa: E402
from steps.core.weights import iter_weight_matrices  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama2048")
    parser.add_argument("--blocks", type=int, default=1, help="decoder blocks per model")
    parser.add_argument("--ops", type=int, default=10, help="window positions per side")
    parser.add_argument("--llama-ops", type=int, default=2,
                        help="window positions per side for llama2048 (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, 1 thread; pruning/zero-shot "
          "part not run (needs lm-eval evaluation, see the docstring)")
    sources = {"smollm2": (smollm2_matrices, args.ops), "llama2048": (llama2048_matrices,
                                                                        args.llama_ops)}
    with threadpool_limits(limits=1):
        for label in args.models.split(","):
            make, ops = sources[label]
            bench_model(label, make(args.blocks), FarmsOptions(ops=ops))


if __name__ == "__main__":
    main()
