"""Benchmark: training with and without TempBalance (METHODS.md section 2), on 2 CPU cores.

    .venv/bin/python bench/tempbalance.py [--quick] [--skip-sciml] [--only cnn|sciml|nlp]

1. From scratch: the tiny CNN (``build_model('cnn')``) on scikit-learn's digits, SGD
   (momentum 0.9, weight decay 5e-4) + per-epoch cosine, against the same + TempBalance
   (linear rule, hill k = 2, factors in [0.5, 1.5], ESD every epoch), 5 seeds: test
   accuracy (last epoch, no selection) mean +- std, the ESD time as a fraction of the
   training time of the TempBalance runs, and the wall-time overhead of the TempBalance arm
   over plain SGD (target < 10 %; the reference reports up to 25 %). Both arms build the
   optimiser over ``model.parameters()`` as users write it (TempBalance regroups it).
2. SciML, low data: a 1-D Fourier Neural Operator learning u(x, 0) -> u(x, T) of viscous
   Burgers (data from a seeded pseudo-spectral solver, no download) on 100 %, 10 % and
   2.5 % of the training set, Adam + cosine, alone, + TempBalance (linear rule) and
   + TB_Sigmoid (per layer, s = 1, hill k = 1.5), ESD every epoch: test nRMSE mean +- std
   over seeds. Every run takes the same number of optimiser steps, whatever the fraction.
3. NLP, low-data fine-tuning (the TempBalance fine-tuning paper's setting, scaled to a CPU):
   the pretrained MiniLM (all-MiniLM-L6-v2) with a new classification head, fully fine-tuned
   on the offline ``fortunes`` task (4 categories) with 100 %, 10 % and 1 % of a capped
   training split (400 examples, 32 tokens, batch 8), in the TB_Sigmoid paper's harness
   (ZihangHLiu/ModelBalancing's run_glue scripts: HF Trainer with warmup_ratio 0.06 and
   weight_decay 0.1): AdamW (lr 1e-4, weight decay 0.1) + the per-optimiser-step linear
   schedule (lr ramps up from 0 over the first ceil(0.06 x 50) = 3 steps, then decays
   linearly to 0 at the last step), against the same + TB_Sigmoid (block means of hill
   alpha, k = 1.5, s = 2 below / 1 above the mean alpha: the reference's sigmoid_min /
   sigmoid_max defaults, ESD every 10 optimiser steps: the paper's min(100, steps_per_epoch
   / 10) degenerates to every step on a few examples), 3 seeds: test accuracy mean +- std
   and the gain. Every run takes the same number of optimiser steps (50), whatever the
   fraction. Unlike the reference's Trainer, weight decay also applies to biases and
   LayerNorm weights and gradients are not clipped (max_grad_norm 1 there).
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
from steps.core.training import (  # noqa: E402
    evaluate,
    layer_param_groups,
    low_data_indices,
    nrmse,
    train,
)

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


@dataclass(frozen=True)
class NlpSetting:
    seeds: int
    steps: int  # optimiser steps per run, any fraction
    max_train: int  # training split capped (stratified) to this many examples
    max_test: int
    max_length: int
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.1  # the TB_Sigmoid paper's harness (run_glue scripts)
    warmup: float = 0.06  # of all optimiser steps, linear schedule stepped per step


# 400 / 8 = 50 steps per epoch: 100 % runs 1 epoch, 10 % 10 epochs, 1 % (4 examples, one
# per class) 50 epochs; 50 steps each. Sized for ~10 minutes on 2 free cores.
NLP_FULL = NlpSetting(seeds=3, steps=50, max_train=400, max_test=200, max_length=32)
NLP_QUICK = NlpSetting(seeds=2, steps=20, max_train=160, max_test=80, max_length=24)


# --- 1. CNN on digits, from scratch -------------------------------------------------------


def cnn_run(seed: int, epochs: int, tempbalance: bool) -> tuple[float, float, float]:
    """(test accuracy, train seconds, TempBalance seconds) of one seeded run."""
    data = labelled_dataset("digits", seed=0)
    x_train = torch.from_numpy(digits_images(data.x_train))
    x_test = torch.from_numpy(digits_images(data.x_test))
    y_train, y_test = torch.from_numpy(data.y_train), torch.from_numpy(data.y_test)
    model = build_model("cnn", seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
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
    print(f"   ESD share: {tb_seconds:.2f} s of {seconds:.2f} s TempBalance training = "
          f"{100 * tb_seconds / seconds:.1f} %")
    print(f"   wall-time overhead vs plain SGD: {seconds:.2f} s vs {plain:.2f} s = "
          f"{100 * (seconds / plain - 1):+.1f} % (target < 10 %)")
    contention_probe()


def contention_probe(passes: int = 50) -> None:
    """Time of ``passes`` forward/backward passes of the CNN before and right after an ESD
    of its layers, computed with numpy (OpenBLAS threads) and with torch (its own pool)."""
    from steps.core.esd import compute_spectra_batch
    from steps.core.training.tempbalance import pooled_esds
    from steps.core.weights import open_weights

    model = build_model("cnn", seed=0)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    source = open_weights(model)
    weights = [(source.load(info), info.layer_type) for info in source.infos()]

    def timed_passes() -> float:
        start = time.perf_counter()
        for _ in range(passes):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        return time.perf_counter() - start

    esds = {"numpy": lambda w, kind: compute_spectra_batch([w], kind, device="cpu"),
            "torch": lambda w, kind: pooled_esds([w], kind, "cpu")}
    timed_passes()  # warm-up
    print(f"   {passes} forward/backward passes right after the ESD (median of 5):")
    for name, esd in esds.items():
        before, after = [], []
        for _ in range(5):
            time.sleep(1.5)  # let any spinning BLAS threads go idle
            before.append(timed_passes())
            for weight, kind in weights:
                esd(weight, kind)
            after.append(timed_passes())
        print(f"     {name:<6} ESD: {np.median(before):.3f} s before, {np.median(after):.3f} s "
              f"right after ({np.median(after) / np.median(before):.2f}x)")


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


# --- 3. NLP: low-data fine-tuning of a pretrained encoder --------------------------------


def nlp_run(data, subset, test, setting: NlpSetting, seed: int, tb: bool) -> tuple:
    """(test accuracy, training seconds, ESD seconds) of one MiniLM fine-tuning run."""
    from steps.core.pretrained import minilm_dir
    from steps.finetune import hf

    texts, labels = data.split("train")
    train_split = ([texts[i] for i in subset.indices], labels[subset.indices])
    steps_per_epoch = math.ceil(len(subset.indices) / setting.batch_size)
    config = hf.FinetuneConfig(
        epochs=math.ceil(setting.steps / steps_per_epoch), batch_size=setting.batch_size,
        lr=setting.lr, optimizer="adamw", weight_decay=setting.weight_decay,
        schedule="linear", warmup=setting.warmup, tempbalance="sigmoid" if tb else "none",
        tb_every_steps=10, max_length=setting.max_length, seed=seed)
    model, tokenizer, _ = hf.load_classifier(minilm_dir(), data.labels, seed=seed)
    view, groups = hf.balance_view(model, config.lr) if tb else (None, hf.plain_groups(
        model, config.lr))
    result = hf.finetune(model, tokenizer, view, groups, train_split, None, config)
    _, accuracy = hf.evaluate_classifier(model, hf.encode(tokenizer, test, config.max_length))
    return accuracy, result.train_seconds, result.tempbalance_seconds


def bench_nlp(setting: NlpSetting) -> None:
    from steps.core.training.text import build_dataset, low_data_subset, read_dataset, write_jsonl

    start = time.perf_counter()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "tailwise-bench-fortunes.jsonl"
    data = read_dataset(write_jsonl(build_dataset("fortunes"), scratch))
    test_texts, test_labels = data.split("test")
    keep = low_data_indices(test_labels, min(1.0, setting.max_test / len(test_labels)), seed=0)
    test = ([test_texts[i] for i in keep], test_labels[keep])
    print(f"\n3. MiniLM fine-tuning on fortunes ({', '.join(data.labels)}): train split "
          f"{len(data.split('train')[1])} capped to {setting.max_train}, {len(keep)} test, "
          f"max_length {setting.max_length}, batch {setting.batch_size}, AdamW lr "
          f"{setting.lr:g} weight decay {setting.weight_decay:g} + per-step linear lr "
          f"(warmup {setting.warmup:g}), {setting.steps} steps per run, {setting.seeds} seeds "
          f"(data ready in {time.perf_counter() - start:.0f} s)")  # fmt: skip
    print(f"   {'data':>6} {'samples':>7}  {'FT':>17} {'FT + TB_Sigmoid':>17} {'gain':>7} "
          f"{'ESD share':>10}")  # fmt: skip
    for fraction in (1.0, 0.1, 0.01):
        arms = {}
        for tb in (False, True):
            runs = []
            for seed in range(setting.seeds):
                subset = low_data_subset(data, fraction, seed, max_examples=setting.max_train)
                runs.append(nlp_run(data, subset, test, setting, seed, tb))
            arms[tb] = np.array(runs)
        base, balanced = arms[False][:, 0], arms[True][:, 0]
        share = arms[True][:, 2].sum() / arms[True][:, 1].sum()
        print(f"   {fraction:>6.1%} {len(subset.indices):>7}  {_mean_std(base):>17} "
              f"{_mean_std(balanced):>17} {100 * (balanced.mean() - base.mean()):>+6.2f}p "
              f"{100 * share:>9.1f}%", flush=True)  # fmt: skip
    print(f"   NLP section: {time.perf_counter() - start:.0f} s")


def _mean_std(values: np.ndarray) -> str:
    spread = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.4f} +- {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, epochs and samples")
    parser.add_argument("--skip-sciml", action="store_true")
    parser.add_argument("--only", choices=("cnn", "sciml", "nlp"), help="run one section")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    sections = {args.only} if args.only else {"cnn", "nlp"} | (
        set() if args.skip_sciml else {"sciml"})
    torch.set_num_threads(THREADS)
    print(f"cpu cores: {os.cpu_count()}  threads: {THREADS}  torch {torch.__version__}  "
          f"numpy {np.__version__}  {'quick' if args.quick else 'full'} run")  # fmt: skip
    start = time.perf_counter()
    with threadpool_limits(limits=THREADS):
        if "cnn" in sections:
            bench_cnn(setting)
        if "sciml" in sections:
            bench_sciml(setting)
        if "nlp" in sections:
            bench_nlp(NLP_QUICK if args.quick else NLP_FULL)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
