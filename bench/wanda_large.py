"""Wanda on a large random LLaMA-shaped model: time against one calibration forward, peak memory.

    python bench/wanda_large.py --device cuda   # ~1.1B parameters (TinyLlama shape), 128 x 2048
    python bench/wanda_large.py --layers 2 --nsamples 4 --seqlen 256   # a small run on the CPU

The model is a seeded random initialisation (no pretrained ~1B model is available offline)
and so is the calibration text (random words, byte-level tokens): the figures are costs,
not perplexities. `--placement device` keeps the whole model on the device (one block at a
time is pruned there); `--placement cpu` keeps it in host memory and the pruner moves one
block at a time to the device, so device memory holds one block plus the activations.

Printed: the calibration forward (whole model on the device, the pruner's chunking), Wanda's
time as a multiple of it (target <= 2x), and peak memory (device: max allocated; CPU: RSS)
against the model's size plus two blocks of activations (N x L x d, twice).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alphapruning import (  # noqa: E402
    peak_rss_mb,
    reset_peak_rss,
    rss_after_malloc_trim_mb,
    warm_up_code,
)

from steps.core.blocks import DEFAULT_BATCH_TOKENS, sequences_per_chunk  # noqa: E402
from steps.core.devices import resolve_device  # noqa: E402
from steps.core.factory import byte_tokenizer  # noqa: E402
from steps.prune import calibration_input_ids, prune  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--placement", choices=("device", "cpu"), default="device",
                        help="where the model lives while it is pruned")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def llama_config(args: argparse.Namespace):
    """The LlamaConfig of the requested shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seqlen),
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )  # fmt: skip


def random_llama(config, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A seeded random LlamaForCausalLM of that config, built on `device`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def write_random_text(path: Path, tokens: int, seed: int = 0) -> Path:
    """A file of seeded random lowercase words, at least `tokens` bytes (one byte-level token
    each)."""
    rng = random.Random(seed)
    words, size = [], 0
    while size < tokens:
        word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 9)))
        words.append(word)
        size += len(word) + 1
    path.write_text(" ".join(words))
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def calibration_forward_s(model: torch.nn.Module, ids: torch.Tensor, chunk: int,
                          device: torch.device) -> float:
    """Seconds of one forward pass of the calibration set, `chunk` sequences per call, with
    the whole model on the device (what the reference's timing would be)."""
    home = next(model.parameters()).device
    model.to(device)
    model(input_ids=ids[:chunk].to(device), use_cache=False)  # warm-up: kernels, allocator
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, len(ids), chunk):
        model(input_ids=ids[start : start + chunk].to(device), use_cache=False)
    synchronize(device)
    took = time.perf_counter() - started
    model.to(home)
    return took


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tailwise-wanda-large-") as scratch:
        text = write_random_text(Path(scratch) / "calibration.txt",
                                 4 * args.nsamples * args.seqlen)
        run(args, resolve_device(args.device), text)


def run(args: argparse.Namespace, device: torch.device, text: Path) -> None:
    """Build the model, time the forward and Wanda, print the figures."""
    tokenizer = byte_tokenizer()
    ids = calibration_input_ids(tokenizer, text, nsamples=args.nsamples, seqlen=args.seqlen,
                                seed=0)
    config = llama_config(args)
    warm_up_code(config, tokenizer, text, args)
    process_mb = rss_after_malloc_trim_mb()  # code paged in, no weights yet
    home = device if args.placement == "device" else torch.device("cpu")
    model = random_llama(config, DTYPES[args.dtype], home)
    chunk = sequences_per_chunk(ids, args.batch_tokens)
    params = sum(p.numel() for p in model.parameters())
    element = next(model.parameters()).element_size()
    model_mb = params * element / 2**20
    activations_mb = 2 * args.nsamples * args.seqlen * args.hidden * element / 2**20
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"random LLaMA-shaped model: {params / 1e9:.2f} B parameters ({args.layers} blocks, "
          f"d={args.hidden}, ffn={args.intermediate}), {args.dtype}, {model_mb:.0f} MB; "
          f"calibration {args.nsamples} x {args.seqlen} tokens, {chunk} sequence(s) per call; "
          f"device {name}, model kept on {args.placement}")

    forward_s = calibration_forward_s(model, ids, chunk, device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        # Building the model and the forward left freed memory in glibc's heap: return it.
        before_mb = rss_after_malloc_trim_mb() - process_mb
        reset_peak_rss()
    started = time.perf_counter()
    prune(model, tokenizer, method="wanda", sparsity=0.5, calibration_text=text,
          nsamples=args.nsamples, seqlen=args.seqlen, seed=0, device=str(device),
          batch_tokens=args.batch_tokens)
    synchronize(device)
    wanda_s = time.perf_counter() - started

    print(f"calibration forward {forward_s:.2f} s; Wanda 50 % {wanda_s:.2f} s = "
          f"{wanda_s / forward_s:.2f}x the forward (target <= 2x)")
    target = model_mb + activations_mb
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        what = "peak GPU memory allocated"
    else:
        peak = peak_rss_mb() - process_mb
        what = "peak RSS above the process before the model was built"
    print(f"{what}: {peak:.0f} MB ({before_mb:.0f} MB before pruning) against model "
          f"{model_mb:.0f} MB + two blocks of activations {activations_mb:.0f} MB = "
          f"{target:.0f} MB: {'within' if peak <= target else 'over'} the target by "
          f"{abs(target - peak):.0f} MB")


if __name__ == "__main__":
    main()
