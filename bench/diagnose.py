"""Benchmark: the loss-landscape toolkit's cost on CPU (steps/diagnose/hessian.py).

    .venv/bin/python bench/diagnose.py                 # 2 threads, batch 32 (a few minutes)
    .venv/bin/python bench/diagnose.py --probes 10 --max-iter 10 --threads 1
    python bench/diagnose.py --device cuda            # the same on a GPU

(1) One Hessian-vector product as a multiple of one forward + backward pass on the same
    batch (target <= 2.5x), for reverse-over-reverse with the gradient graph re-used (the
    default), rebuilt per product, and forward-over-reverse (jvp of grad); for the small
    digits CNN of steps/core/factory.py and a ResNet-18 for 32x32 inputs (~11.2M parameters).
(2) Hutchinson trace (mean, standard error, probes) and top eigenvalue (power iteration
    iterations) wall times for the ResNet-18 on the CPU.
(3) The MD tree golden cases are timed by bench/mdtree.py.

Models are seeded random initialisations and the data seeded random tensors: the figures
are costs, not landscape statistics of trained models.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_provenance  # noqa: E402
from steps.core.devices import resolve_device  # noqa: E402
from steps.core.factory import build_model  # noqa: E402
from steps.diagnose.hessian import (  # noqa: E402
    hessian_operator,
    hutchinson_trace,
    spectral_density,
    top_eigenvalue,
)

# ------------------------------------------------------------------- ResNet-18, 32x32


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR variant: a 3x3 stem, no max-pool, stages of 2 blocks at 64-512 channels."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------------- timing


def synchronize() -> None:
    """Wait for queued GPU work, so a timing holds the work and not only its launch."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call; CPU time is less hit by other processes."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return step


VARIANTS = (("vjp(grad), graph re-used", "vjp", True),
            ("vjp(grad), graph rebuilt", "vjp", False),
            ("jvp(grad)", "jvp", True))


Row = tuple[str, float, float, float]  # what, wall seconds, wall and CPU x forward+backward


def hvp_costs(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              reps: int) -> list[Row]:
    """Median seconds and multiples of one forward+backward pass, per HVP variant.

    Each repetition times a forward+backward pass right before every product, and the ratio
    is taken per repetition: on a shared machine the load then hits both alike.
    """
    model.eval()  # the HVPs run in eval mode; time the reference pass the same way
    reference = forward_backward(model, x, y)
    reference()  # warm-up
    gen = torch.Generator().manual_seed(0)
    ops = [hessian_operator(model, (x, y), mode=mode, reuse_graph=reuse)
           for _, mode, reuse in VARIANTS]
    v = torch.randn(ops[0].dim, generator=gen).to(x.device)
    base_first = seconds(reference)
    first = seconds(lambda: ops[0].hvp(v))  # builds and keeps the gradient graph
    base_wall: list[float] = []
    samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k, _, _ in VARIANTS}
    for _ in range(reps):
        for (label, _, _), op in zip(VARIANTS, ops, strict=True):
            base = seconds(reference)
            product = seconds(lambda op=op: op.hvp(v))
            base_wall.append(base[0])
            samples[label].append((product[0], product[0] / base[0], product[1] / base[1]))
    for op in ops:
        op.release()
    rows = [(f"{name}: forward+backward", statistics.median(base_wall), 1.0, 1.0),
            (f"{name}: first HVP (graph build + product)", first[0], first[0] / base_first[0],
             first[1] / base_first[1])]
    for label, values in samples.items():
        wall, wall_ratio, cpu_ratio = (statistics.median(col) for col in zip(*values,
                                                                            strict=True))
        rows.append((f"{name}: HVP {label}", wall, wall_ratio, cpu_ratio))
    return rows


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"


def warm_up_torch_func(device: torch.device) -> None:
    """The first torch.func transform (and a GPU's first kernels) pay one-time set-up; keep
    it out of the figures."""
    tiny = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)
    x, y = torch.randn(8, 4, device=device), torch.randint(0, 2, (8,), device=device)
    for _, mode, reuse in VARIANTS:
        op = hessian_operator(tiny, (x, y), mode=mode, reuse_graph=reuse)
        op.hvp(torch.ones(op.dim, device=device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3, help="ResNet-18 timed repetitions")
    parser.add_argument("--cnn-reps", type=int, default=20, help="CNN timed repetitions")
    parser.add_argument("--probes", type=int, default=10, help="Hutchinson probes (fixed)")
    parser.add_argument("--max-iter", type=int, default=10, help="power iterations at most")
    parser.add_argument("--tol", type=float, default=1e-3, help="power iteration rel. tol")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_provenance(settings={"device": args.device, "batch": args.batch,
                               "threads": args.threads})

    with threadpool_limits(limits=args.threads):
        gen = torch.Generator().manual_seed(0)
        cnn = build_model("cnn", seed=0)
        x_cnn = torch.rand(args.batch, 1, 8, 8, generator=gen).to(device)
        y_cnn = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        torch.manual_seed(0)
        resnet = ResNet18()
        x_res = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
        y_res = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        cnn, resnet = cnn.to(device), resnet.to(device)
        n_cnn = sum(p.numel() for p in cnn.parameters())
        n_res = sum(p.numel() for p in resnet.parameters())
        warm_up_torch_func(device)
        print(f"torch {torch.__version__}, {describe(device)}, {args.threads} CPU threads, "
              f"batch {args.batch}; "
              f"digits CNN {n_cnn:,} params (1x8x8), ResNet-18 {n_res:,} params (3x32x32)")

        print("\n(1) Hessian-vector product cost, medians over repetitions (CNN "
              f"{args.cnn_reps}, ResNet-18 {args.reps}); target: re-used vjp <= 2.5x")
        print(f"{'what':50s} {'wall s':>9s} {'x fwd+bwd':>10s} {'(CPU time)':>10s}")
        for name, model, x, y, reps in (("CNN", cnn, x_cnn, y_cnn, args.cnn_reps),
                                        ("ResNet-18", resnet, x_res, y_res, args.reps)):
            rows = hvp_costs(name, model, x, y, reps)
            for label, secs, ratio, cpu_ratio in rows:
                print(f"{label:50s} {secs:9.4f} {ratio:10.2f} {cpu_ratio:10.2f}")
            reused = rows[2][2]
            print(f"{name}: re-used vjp HVP at {reused:.2f}x forward+backward (wall): "
                  f"{'within' if reused <= 2.5 else 'ABOVE'} the 2.5x target")

        print(f"\n(2) ResNet-18 landscape statistics on {describe(device)} (one batch of "
              f"{args.batch}, "
              "eval mode, graph re-used)")
        print(f"{'what':26s} {'result':>34s} {'work':>16s} {'seconds':>9s}")
        op = hessian_operator(resnet, (x_res, y_res))
        start = time.perf_counter()
        trace = hutchinson_trace(op, probes=args.probes, seed=0)
        elapsed = time.perf_counter() - start
        print(f"{'Hutchinson trace':26s} {f'{trace.mean:.4g} +- {trace.stderr:.2g} (SE)':>34s} "
              f"{f'{trace.probes} probes':>16s} {elapsed:9.1f}")
        start = time.perf_counter()
        top = top_eigenvalue(op, max_iter=args.max_iter, tol=args.tol, seed=0)
        elapsed = time.perf_counter() - start
        state = "converged" if top.converged else "not converged"
        print(f"{'top eigenvalue (power)':26s} {f'{top.value:.4g} ({state})':>34s} "
              f"{f'{top.iterations} iterations':>16s} {elapsed:9.1f}")
        op.release()

        cnn_op = hessian_operator(cnn, (x_cnn, y_cnn))
        start = time.perf_counter()
        slq = spectral_density(cnn_op, runs=3, steps=30, seed=0)
        elapsed = time.perf_counter() - start
        low = min(float(n.min()) for n in slq.nodes)
        high = max(float(n.max()) for n in slq.nodes)
        print(f"{'CNN SLQ density':26s} {f'nodes in [{low:.3g}, {high:.3g}]':>34s} "
              f"{'3 runs x 30':>16s} {elapsed:9.1f}")

    print("\n(3) MD tree golden cases: timed per case by bench/mdtree.py "
          "(.venv/bin/python bench/mdtree.py).")


if __name__ == "__main__":
    main()
