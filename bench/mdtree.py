"""Benchmark: MD tree and its baselines on the released model-diagnosis data, per case.

    .venv/bin/python bench/mdtree.py [--cases dataset_transfer,scale_transfer] [--tree-seed 42]

For each case (fit on samples of the clean collection F, test on all of the noisy one F',
seeds 42, 90, 38, 18, 72): test accuracy, mean +- std over seeds, of the MD tree, the
validation-metric tree, the hyperparameter tree and the majority class; the paper's figure
where there is one; the MD tree's fitted thresholds (mean +- std); the training set sizes and
the wall time. Data: tests/data/md-tree (YefanZhou/ModelDiagnosis, MIT).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_provenance  # noqa: E402
from steps.diagnose.mdtree import (  # noqa: E402
    CASES,
    METHODS,
    SHAPES,
    evaluate_case,
    read_collection,
)

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "md-tree"
# The paper's figures (MD tree / validation tree / hyperparameter tree, %), where published.
PAPER = {
    "dataset_transfer": "87.70 / 72.82 / 49.56",
    "scale_transfer": "75.89 / 51.73 / -",
    "q2a_dataset_transfer": "74.10 / 55.79 / -",
}
SHORT = {"md_tree": "MD", "validation_tree": "val", "hyperparameter_tree": "hyper",
         "majority": "major"}


def spread(values: np.ndarray, scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * values.mean():.{digits}f}+-{scale * values.std():.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--tree-seed", type=int, default=None,
                        help="seed of every baseline tree (default: the sample's seed)")
    args = parser.parse_args()

    clean = read_collection(DATA / "dataframe_normal_public.csv")
    noisy = read_collection(DATA / "dataframe_noise_public.csv")
    print_provenance(texts={"clean": DATA / "dataframe_normal_public.csv",
                            "noisy": DATA / "dataframe_noise_public.csv"},
                     settings={"cases": args.cases, "tree_seed": args.tree_seed})
    print(f"train: clean F ({clean.num_rows} configurations), test: noisy F' "
          f"({noisy.num_rows}); accuracy % mean+-std over seeds; baseline tree seed: "
          f"{'per sample' if args.tree_seed is None else args.tree_seed}")
    for name in args.cases.split(","):
        case = CASES[name]
        start = time.perf_counter()
        result = evaluate_case(case, clean, noisy, tree_seed=args.tree_seed)
        seconds = time.perf_counter() - start
        scores = "  ".join(f"{SHORT[m]} {spread(result.accuracy[m], 100)}" for m in METHODS)
        thresholds = ", ".join(f"{role} {spread(result.thresholds[:, i], digits=3)}" for i, role
                               in enumerate(SHAPES[case.shape].threshold_roles))
        sizes = sorted(set(result.train_sizes))
        print(f"{name:<21} {case.question:<14} {scores}  paper {PAPER.get(name, '-')}  "
              f"t = [{thresholds}]  n_train {'/'.join(map(str, sizes))}  "
              f"n_test {result.test_size}  {seconds:.2f} s")


if __name__ == "__main__":
    main()
