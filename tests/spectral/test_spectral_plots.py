"""steps.spectral.plots: files are written and the worst/best choice follows alpha."""

from __future__ import annotations

from spectral_helpers import tiny_gpt2

from steps.spectral import analyze
from steps.spectral.plots import matrix_kind, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_write_plots_returns_the_png_files_it_wrote(tmp_path):
    metrics, esd = analyze(tiny_gpt2(), device="cpu", return_esd=True)
    paths = write_plots(metrics, esd, tmp_path / "plots")
    assert [p.name for p in paths] == ["alpha_vs_depth.png", "esd_worst.png", "esd_best.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert [p.name for p in write_plots(metrics, None, tmp_path / "only")] == ["alpha_vs_depth.png"]


def test_matrix_kind_strips_the_block_prefix():
    assert matrix_kind("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert matrix_kind("transformer.h.0.attn.c_attn") == "attn.c_attn"
    assert matrix_kind("layer3.1.conv2") == "1.conv2"
    assert matrix_kind("transformer.wte") == "transformer.wte"
