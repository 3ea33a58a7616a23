"""Benchmark: `tailwise spectral` on a LLaMA-7B-shaped checkpoint (target < 60 s on one GPU).

    python bench/spectral_7b.py [--device cuda] [--dir DIR] [--layers 32] [--hidden 4096]

Writes a random checkpoint with LLaMA-7B's names and shapes (32 blocks of q, k, v, o
4096 x 4096 and gate, up, down 4096 x 11008, embeddings and head 32000 x 4096; float16,
sharded safetensors with an index, 13.5 GB) unless DIR already holds one, then times
`analyze()` on it as the CLI runs it (matrices streamed from the memory-mapped shards, same
shapes batched on the GPU) and prints the time against the 60 s target and against the
eigensolver floor (batched float64 eigvalsh of every matrix's Gram, already on the device).
Smaller shapes (`--layers 1 --hidden 512`) check the script on a CPU. `--farms` adds FARMS
alphas (every matrix's 2000 x 2000 windows in one batched float64 eigensolve on the GPU);
the floor printed is still that of the plain ESDs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steps.spectral import analyze  # noqa: E402

TARGET_SECONDS = 60.0
VOCAB = 32_000


def block_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    """LLaMA's per-block Linear weights (out x in); the MLP is 11008/4096 times wider."""
    ffn = hidden * 11008 // 4096
    return {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }


def write_checkpoint(directory: Path, layers: int, hidden: int, device: str) -> None:
    """One float16 shard per block (+ one for embeddings and head) and the index file."""
    generator = torch.Generator(device=device).manual_seed(0)

    def random(shape: tuple[int, int]) -> torch.Tensor:
        return (torch.randn(shape, generator=generator, device=device) * 0.02).half().cpu()

    weight_map: dict[str, str] = {}
    shards = {"model-outer.safetensors": {"model.embed_tokens.weight": (VOCAB, hidden),
                                          "lm_head.weight": (VOCAB, hidden)}}
    for b in range(layers):
        shards[f"model-{b:05d}.safetensors"] = {f"model.layers.{b}.{name}.weight": shape
                                                for name, shape in block_shapes(hidden).items()}
    for shard, tensors in shards.items():
        save_file({name: random(shape) for name, shape in tensors.items()}, directory / shard)
        weight_map |= {name: shard for name in tensors}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def eigensolver_floor(layers: int, hidden: int, device: str) -> float:
    """Seconds of float64 Gram + eigvalsh over every matrix, batched by shape, on device."""
    shapes = [s for _ in range(layers) for s in block_shapes(hidden).values()]
    shapes += [(VOCAB, hidden)] * 2
    torch.linalg.eigvalsh(torch.eye(8, dtype=torch.float64, device=device))  # solver warm-up
    total = 0.0
    for shape in sorted(set(shapes)):
        count = shapes.count(shape)
        for start in range(0, count, 4):
            batch = torch.randn((min(4, count - start), *shape), dtype=torch.float64, device=device)
            small_side = batch if shape[0] >= shape[1] else batch.transpose(1, 2)
            sync(device)
            began = time.perf_counter()
            torch.linalg.eigvalsh(small_side.transpose(1, 2) @ small_side)
            sync(device)
            total += time.perf_counter() - began
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, help="checkpoint directory (written when empty)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--estimator", default="alpha_peak")
    parser.add_argument("--farms", action="store_true",
                        help="also FARMS alphas (2000-row windows, Q = 1, 10 x 10 positions)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir.parent if args.dir else None) as scratch:
        directory = args.dir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "model.safetensors.index.json").exists():
            began = time.perf_counter()
            write_checkpoint(directory, args.layers, args.hidden, args.device)
            print(f"checkpoint written in {time.perf_counter() - began:.1f} s: {directory}")
        began = time.perf_counter()
        metrics = analyze(directory / "model.safetensors.index.json", device=args.device,
                          estimator=args.estimator, farms=args.farms)
        seconds = time.perf_counter() - began
    floor = eigensolver_floor(args.layers, args.hidden, args.device)
    fitted = sum(status == "ok" for status in metrics["status"].to_pylist())
    label = f"{args.estimator}{' + FARMS' if args.farms else ''}, {args.device}"
    print(f"spectral ({label}): {metrics.num_rows} matrices, {fitted} "
          f"fitted, {seconds:.1f} s (target < {TARGET_SECONDS:.0f} s: "
          f"{'met' if seconds < TARGET_SECONDS else 'MISSED'}); eigensolver floor "
          f"{floor:.1f} s, ratio {seconds / floor:.2f}x")


if __name__ == "__main__":
    main()
