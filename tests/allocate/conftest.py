"""Fixtures: the reference alpha tables with LLaMA matrix shapes."""

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pytest

from steps.allocate import read_metrics

DATA = Path(__file__).resolve().parents[1] / "data"

# (name suffix, N, M) of one LLaMA decoder block, N the larger side as in a spectral table,
# in the order of the reference CSVs (the module order of transformers 4.28's LlamaMLP).
LLAMA_7B_BLOCK = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 11008, 4096),
    ("mlp.down_proj", 11008, 4096),
    ("mlp.up_proj", 11008, 4096),
]
LLAMA_13B_BLOCK = [
    (suffix, {4096: 5120, 11008: 13824}[n], {4096: 5120, 11008: 13824}[m])
    for suffix, n, m in LLAMA_7B_BLOCK
]


def with_llama_shapes(table: pa.Table, block: Sequence[tuple[str, int, int]]) -> pa.Table:
    """Add N and M columns from the layer-name suffix."""
    shapes = {suffix: (n, m) for suffix, n, m in block}
    suffixes = [name.split(".", 3)[3] for name in table["name"].to_pylist()]
    table = table.append_column("N", pa.array([shapes[s][0] for s in suffixes], pa.int64()))
    return table.append_column("M", pa.array([shapes[s][1] for s in suffixes], pa.int64()))


@pytest.fixture(scope="session")
def llama7b() -> pa.Table:
    """LLaMA-7B reference alpha_peak with LLaMA-7B matrix shapes (224 layers, 32 blocks)."""
    return with_llama_shapes(read_metrics(DATA / "llama-7b-alpha_peak.csv"), LLAMA_7B_BLOCK)


@pytest.fixture(scope="session")
def llama7b_farms() -> pa.Table:
    """FARMS's LLaMA-7B alpha_peak_farms (2000 x 2000 windows, 15 x 15 per matrix)."""
    table = read_metrics(DATA / "farms" / "llama-7b-farms-step15_ops15.csv")
    return with_llama_shapes(table, LLAMA_7B_BLOCK)


@pytest.fixture(scope="session")
def llama2_7b() -> pa.Table:
    return with_llama_shapes(read_metrics(DATA / "llama2-7b-alpha_peak.csv"), LLAMA_7B_BLOCK)


@pytest.fixture(scope="session")
def llama13b() -> pa.Table:
    return with_llama_shapes(read_metrics(DATA / "llama-13b-alpha_peak.csv"), LLAMA_13B_BLOCK)
