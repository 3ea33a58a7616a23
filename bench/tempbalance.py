"""Benchmark: training with and without TempBalance (METHODS.md section 2), on 2 CPU cores.

    .venv/bin/python bench/tempbalance.py [--quick] [--skip-sciml]

1. From scratch: the tiny CNN (``build_model('cnn')``) on scikit-learn's digits, SGD
   (momentum 0.9, weight decay 5e-4) + per-epoch cosine, against the same + TempBalance
   (linear rule, hill k = 2, factors in [0.5, 1.5], ESD every epoch), 5 seeds: test
   accuracy (last epoch, no selection) mean +- std, and the ESD time as a fraction of the
   training time of the TempBalance runs (target < 10 %; the reference reports up to 25 %).
2. SciML, low data: a 1-D Fourier Neural Operator learning u(x, 0) -> u(x, T) of viscous
   Burgers (data from a seeded pseudo-spectral solver, no download) on 100 %, 10 % and
   2.5 % of the training set, Adam + cosine, alone, + TempBalance (linear rule) and
   + TB_Sigmoid (per layer, s = 1, hill k = 1.5), ESD every epoch: test nRMSE mean +- std
   over seeds. Every run takes the same number of optimiser steps, whatever the fraction.
Settings were fixed before the first run; nothing is tuned for a gain.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steps.core.data import digits_images, labelled_dataset  # noqa: E402
from steps.core.factory import build_model  # noqa: E402
from steps.finetune.tempbalance import layer_param_groups  # noqa: E402
from steps.finetune.train import evaluate, low_data_indices, nrmse, train  # noqa: E402

THREADS = 2


@dataclass(frozen=True)
class Setting:
    seeds: int
    cnn_epochs: int
    sciml_seeds: int
    sciml_steps: int  # optimiser steps per run, any fraction
    n_train: int
    n_test: int


FULL = Setting(seeds=5, cnn_epochs=30, sciml_seeds=3, sciml_steps=600, n_train=1000, n_test=200)
QUICK = Setting(seeds=2, cnn_epochs=10, sciml_seeds=1, sciml_steps=200, n_train=400, n_test=100)


# --- 1. CNN on digits, from scratch -------------------------------------------------------


def cnn_run(seed: int, epochs: int, tempbalance: bool) -> tuple[float, float, float]:
    """(test accuracy, train seconds, TempBalance seconds) of one seeded run."""
    data = labelled_dataset("digits", seed=0)
    x_train = torch.from_numpy(digits_images(data.x_train))
    x_test = torch.from_numpy(digits_images(data.x_test))
    y_train, y_test = torch.from_numpy(data.y_train), torch.from_numpy(data.y_test)
    model = build_model("cnn", seed=seed)
    optimizer = torch.optim.SGD(layer_param_groups(model, 0.05), lr=0.05, momentum=0.9,
                                weight_decay=5e-4)  # fmt: skip
    history = train(model, (x_train, y_train), None, optimizer=optimizer, epochs=epochs,
                    seed=seed, tempbalance={"rule": "linear"} if tempbalance else None)  # fmt: skip
    _, accuracy = evaluate(model, (x_test, y_test), "classification", nn.functional.cross_entropy)
    return accuracy, history.train_seconds, history.tempbalance_seconds


def bench_cnn(setting: Setting) -> None:
    print(f"\n1. TinyCNN on digits from scratch: {setting.cnn_epochs} epochs, "
          f"{setting.seeds} seeds, SGD 0.05 momentum 0.9 wd 5e-4 + cosine")  # fmt: skip
    # Interleaved, so that machine-speed drift does not favour either arm's wall time.
    runs = {tb: [] for tb in (False, True)}
    for seed in range(setting.seeds):
        for tb in (False, True):
            runs[tb].append(cnn_run(seed, setting.cnn_epochs, tb))
    results = {tb: np.array(r) for tb, r in runs.items()}
    for tb in (False, True):
        accs = results[tb][:, 0] * 100
        label = "SGD + cosine + TempBalance" if tb else "SGD + cosine"
        print(f"   {label:<28} test acc {accs.mean():6.2f} +- {accs.std(ddof=1):.2f} %  "
              f"(runs: {', '.join(f'{a:.2f}' for a in accs)})")  # fmt: skip
    seconds, tb_seconds = results[True][:, 1].sum(), results[True][:, 2].sum()
    plain = results[False][:, 1].sum()
    print(f"   ESD overhead: {tb_seconds:.2f} s of {seconds:.2f} s training = "
          f"{100 * tb_seconds / seconds:.1f} % (wall time vs plain SGD: "
          f"{100 * (seconds / plain - 1):+.1f} %)")  # fmt: skip


# --- 2. FNO on 1-D Burgers, low data ---------------------------------------------------------


def burgers(n: int, seed: int, grid: int = 256, nu: float = 0.01, t_end: float = 0.5,
            dt: float = 5e-4, out_grid: int = 128) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(u(x, 0), u(x, t_end)) of u_t + u u_x = nu u_xx on the periodic unit interval.

    Initial conditions: 8 random Fourier modes with amplitudes ~ k^-1.5, scaled to unit
    std. Pseudo-spectral in space (2/3 dealiasing), integrating-factor RK4 in time; returned
    on every (grid / out_grid)-th point.
    """
    rng = np.random.default_rng(seed)
    x = np.arange(grid) / grid
    modes = np.arange(1, 9)
    coef_cos = rng.standard_normal((n, 8)) / modes**1.5
    coef_sin = rng.standard_normal((n, 8)) / modes**1.5
    phase = 2 * np.pi * np.outer(modes, x)
    u0 = coef_cos @ np.cos(phase) + coef_sin @ np.sin(phase)
    u0 /= u0.std(axis=1, keepdims=True)
    k = np.fft.rfftfreq(grid, d=1.0 / grid)
    wave = 2 * np.pi * k
    dealias = k < grid / 3

    def advection(v_hat: np.ndarray) -> np.ndarray:
        u = np.fft.irfft(v_hat, n=grid)
        return -0.5j * wave * np.fft.rfft(u * u) * dealias

    half, full = np.exp(-nu * wave**2 * dt / 2), np.exp(-nu * wave**2 * dt)
    v = np.fft.rfft(u0)
    for _ in range(round(t_end / dt)):
        k1 = advection(v)
        k2 = advection(half * (v + dt / 2 * k1))
        k3 = advection(half * v + dt / 2 * k2)
        k4 = advection(full * v + dt * half * k3)
        v = full * v + dt / 6 * (full * k1 + 2 * half * (k2 + k3) + k4)
    step = grid // out_grid
    u_end = np.fft.irfft(v, n=grid)
    return u0[:, ::step].astype(np.float32), u_end[:, ::step].astype(np.float32)


class SpectralConv1d(nn.Module):
    """FNO's Fourier layer: multiply the lowest ``modes`` Fourier coefficients by weights."""

    def __init__(self, width: int, modes: int):
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.randn(width, width, modes, 2) / (width * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = torch.fft.rfft(x)
        out = torch.zeros(x.shape[0], self.weight.shape[1], x_hat.shape[-1], dtype=x_hat.dtype)
        weight = torch.view_as_complex(self.weight)
        out[..., : self.modes] = torch.einsum("bim,iom->bom", x_hat[..., : self.modes], weight)
        return torch.fft.irfft(out, n=x.shape[-1])


class FourierBlock(nn.Module):
    def __init__(self, width: int, modes: int):
        super().__init__()
        # The 1x1 conv first: the spectral weights (not a matrix layer) share its lr factor.
        self.w = nn.Conv1d(width, width, 1)
        self.spectral = SpectralConv1d(width, modes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.spectral(x) + self.w(x))


class FNO1d(nn.Module):
    """Lift (u0, x) to ``width`` channels, 4 Fourier blocks, project to u(T)."""

    def __init__(self, width: int = 64, modes: int = 16, depth: int = 4):
        super().__init__()
        self.lift = nn.Linear(2, width)
        self.blocks = nn.ModuleList(FourierBlock(width, modes) for _ in range(depth))
        self.proj = nn.Linear(width, 128)
        self.out = nn.Linear(128, 1)

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        grid = torch.linspace(0, 1, u0.shape[-1]).expand_as(u0)
        h = self.lift(torch.stack([u0, grid], dim=-1)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return self.out(nn.functional.gelu(self.proj(h.transpose(1, 2)))).squeeze(-1)


def relative_l2(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nrmse(prediction, target).mean()


SCIML_ARMS = {
    "Adam": None,
    "Adam+TB": {"rule": "linear"},
    "Adam+TB_Sigmoid": {"rule": "sigmoid", "by_block": False, "scale": 1.0},
}


def fno_run(data, fraction: float, seed: int, steps: int, tempbalance: dict | None) -> tuple:
    """(test nRMSE, train seconds, TempBalance seconds) of one seeded low-data run."""
    x_train, y_train, x_test, y_test = data
    idx = low_data_indices(len(x_train), fraction, seed=seed)
    batch = 20
    epochs = max(1, round(steps / math.ceil(len(idx) / batch)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FNO1d()
    optimizer = torch.optim.Adam(layer_param_groups(model, 1e-3), lr=1e-3, weight_decay=1e-4)
    history = train(model, (x_train[idx], y_train[idx]), None, optimizer=optimizer,
                    epochs=epochs, task="regression", loss_fn=relative_l2, batch_size=batch,
                    seed=seed, tempbalance=tempbalance)  # fmt: skip
    _, test_nrmse = evaluate(model, (x_test, y_test), "regression", relative_l2)
    return test_nrmse, history.train_seconds, history.tempbalance_seconds


def bench_sciml(setting: Setting) -> None:
    start = time.perf_counter()
    u0, u_end = burgers(setting.n_train + setting.n_test, seed=0)
    n = setting.n_train
    data = tuple(torch.from_numpy(a) for a in (u0[:n], u_end[:n], u0[n:], u_end[n:]))
    print(f"\n2. FNO-1d on viscous Burgers (nu 0.01, T 0.5, 128 points; {n} train / "
          f"{setting.n_test} test samples solved in {time.perf_counter() - start:.0f} s): "
          f"Adam 1e-3 + cosine, {setting.sciml_steps} steps per run, "
          f"{setting.sciml_seeds} seed(s)")  # fmt: skip
    print(f"   {'data':>6} {'samples':>7}  {'arm':<16} {'test nRMSE':>17} {'vs Adam':>8} "
          f"{'ESD share':>10}")  # fmt: skip
    for fraction in (1.0, 0.1, 0.025):
        samples = len(low_data_indices(n, fraction, seed=0))
        base = None
        for arm, tb in SCIML_ARMS.items():
            runs = np.array([fno_run(data, fraction, seed, setting.sciml_steps, tb)
                             for seed in range(setting.sciml_seeds)])  # fmt: skip
            errors, share = runs[:, 0], runs[:, 2].sum() / runs[:, 1].sum()
            base = errors.mean() if base is None else base
            print(f"   {fraction:>6.1%} {samples:>7}  {arm:<16} {_mean_std(errors):>17} "
                  f"{100 * (errors.mean() / base - 1):>+7.2f}% {100 * share:>9.1f}%")  # fmt: skip


def _mean_std(values: np.ndarray) -> str:
    spread = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.4f} +- {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, epochs and samples")
    parser.add_argument("--skip-sciml", action="store_true")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    torch.set_num_threads(THREADS)
    print(f"cpu cores: {os.cpu_count()}  threads: {THREADS}  torch {torch.__version__}  "
          f"numpy {np.__version__}  {'quick' if args.quick else 'full'} run")  # fmt: skip
    start = time.perf_counter()
    with threadpool_limits(limits=THREADS):
        bench_cnn(setting)
        if not args.skip_sciml:
            bench_sciml(setting)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
