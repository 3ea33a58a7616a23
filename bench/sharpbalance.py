"""SharpBalance vs a SAM ensemble vs a plain deep ensemble: 3 MLP members on sklearn digits,
clean and corrupted (Gaussian noise, blur) test accuracy, diversity and member sharpness
(SharpBalance's measure: APGD worst case, adaptive l2, logit-normalised, rho 0.2), mean +- std
over seeds.

    python bench/sharpbalance.py               # 3 seeds, 20 epochs (~10 min on one CPU thread)
    python bench/sharpbalance.py --seeds 1 --epochs 2   # ~4 min, mostly the sharpness

An offline stand-in for the paper's CIFAR-10-C table (ResNet-18: SharpBalance 77.32,
SAM 76.32, deep ensemble 75.83): a 64-128-128-10 MLP on 8x8 digits is far from that setting,
so the ranking here says little about the paper's claim.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import print_provenance  # noqa: E402
from steps.core.data import digits_images, labelled_dataset  # noqa: E402
from steps.core.factory import build_model  # noqa: E402
from steps.diagnose.sharpbalance import (  # noqa: E402
    EnsembleConfig,
    corruption_metrics,
    sharpness,
    train_ensemble,
)

METHODS = ("deep", "sam", "sharpbalance")


def run(method: str, seed: int, epochs: int) -> dict[str, float]:
    data = labelled_dataset("digits", seed=seed)
    x, y = torch.from_numpy(digits_images(data.x_train)), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(digits_images(data.x_test)), torch.from_numpy(data.y_test)
    config = EnsembleConfig(members=3, epochs=epochs, method=method, dataset="digits",
                            seed=seed)
    ensemble = train_ensemble(lambda s: build_model("mlp", seed=s), x, y, config)
    results = corruption_metrics(ensemble.models, x_test, y_test,
                                 torch.Generator().manual_seed(seed))
    short = {"clean": "ens clean", "gaussian_noise": "ens noise", "gaussian_blur": "ens blur"}
    row = {short[name]: 100 * m.ensemble_accuracy for name, m in results.items()}
    row["member clean"] = 100 * results["clean"].member_accuracy
    row["disagree"] = 100 * results["clean"].disagreement
    row["DER"] = results["clean"].disagreement_error_ratio
    # The reference's measure: APGD worst case, adaptive l2, logit-normalised, on 100
    # batches of 5 training samples in a seeded shuffled order.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    row["sharp"] = float(np.mean([sharpness(m, x[order], y[order], rho=0.2)
                                  for m in ensemble.models]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print_provenance(settings={"seeds": args.seeds, "epochs": args.epochs, "data": "digits"})
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    start = time.perf_counter()
    for method in METHODS:
        for seed in range(args.seeds):
            rows[method].append(run(method, seed, args.epochs))
    columns = list(rows[METHODS[0]][0])
    print(f"digits, 3 MLP members, {args.epochs} epochs, {args.seeds} seeds "
          f"(mean +- std; accuracies and disagreement in %)")
    print(f"{'method':<14}" + "".join(f"{c:>18}" for c in columns))
    for method, runs in rows.items():
        cells = [np.array([r[c] for r in runs]) for c in columns]
        print(f"{method:<14}" + "".join(f"{v.mean():>11.3f} +- {v.std():<5.2f}" for v in cells))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
