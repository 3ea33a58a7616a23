"""Pruning from the same calibration inputs gives the same weights, whatever the thread count
and however the inputs were chunked: the statistics are summed in float64 and SparseGPT's
algebra runs in float64 (in float32, MKL's thread-split reductions and the chunk order moved
near-ties across the mask)."""

from __future__ import annotations

import math

import torch
from torch import nn

from steps.core.blocks import LayerStats
from steps.prune import sparsegpt
from steps.prune.masks import Pattern

IN, OUT, TOKENS = 192, 128, 512


def _inputs_and_layer() -> tuple[torch.Tensor, nn.Linear]:
    gen = torch.Generator().manual_seed(3)
    scales = torch.exp(torch.randn(IN, generator=gen))
    x = (torch.randn(TOKENS, IN, generator=gen) @ torch.randn(IN, IN, generator=gen)
         / math.sqrt(IN)) * scales
    layer = nn.Linear(IN, OUT, bias=False)
    layer.weight.data = 0.05 * torch.randn(OUT, IN, generator=gen)
    return x, layer


def _stats(x: torch.Tensor, chunk: int) -> LayerStats:
    stats = LayerStats.empty(IN, True, torch.device("cpu"))
    for part in x.split(chunk):
        stats.add(part)
    return stats


def _sparsegpt(layer: nn.Linear, stats: LayerStats, threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pruned = nn.Linear(IN, OUT, bias=False)
        pruned.weight.data = layer.weight.data.clone()
        sparsegpt.prune_layer(pruned, stats, Pattern(0.7))
    finally:
        torch.set_num_threads(before)
    return pruned.weight.data


def test_sparsegpt_does_not_depend_on_the_thread_count():
    x, layer = _inputs_and_layer()
    stats = _stats(x, TOKENS)
    assert torch.equal(_sparsegpt(layer, stats, 1), _sparsegpt(layer, stats, 2))


def test_statistics_and_sparsegpt_do_not_depend_on_the_chunking():
    x, layer = _inputs_and_layer()
    whole, chunked = _stats(x, TOKENS), _stats(x, 37)
    assert torch.equal(whole.column_norms(), chunked.column_norms())
    assert torch.allclose(whole.hessian, chunked.hessian, rtol=1e-13, atol=0)
    assert torch.equal(_sparsegpt(layer, whole, 1), _sparsegpt(layer, chunked, 1))
