"""The HT-SR report page: per-matrix contents, self-contained, light, and how it is reached
(the spectral step's `report` output, `tailwise report` on a model, a Parquet file, a digest)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from spectral_helpers import mlp
from typer.testing import CliRunner

from steps.core.step import run_step
from steps.core.store import open_store
from steps.spectral import analyze
from steps.spectral.report import ESD_BINS, fitted_tail, render_report
from steps.spectral.step import STEP as SPECTRAL
from tailwise_cli import app


def linears(count: int, seed: int = 0) -> torch.nn.Module:
    """`count` Linear layers of three shapes; layer 1 heavy-tailed (Student-t, nu = 0.5: alpha
    near nu / 2 + 1, over-trained), layer 2 all zero."""
    torch.manual_seed(seed)
    model = torch.nn.ModuleList(torch.nn.Linear(128, 64 + 32 * (i % 3)) for i in range(count))
    with torch.no_grad():
        model[1].weight.copy_(torch.distributions.StudentT(0.5).sample(model[1].weight.shape))
        model[2].weight.zero_()
    return model


def table_rows(page: str) -> list[str]:
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr .*?</tr>", body)


def cell(row: str, column: str) -> str:
    return re.search(rf'<td class="{column}">(.*?)</td>', row).group(1)


def test_every_matrix_has_its_row_fit_and_esd_plot():
    metrics, esd = analyze(linears(9), device="cpu", workers=1, return_esd=True)
    page = render_report(metrics, esd, "nine")
    rows, html_rows = metrics.to_pylist(), table_rows(page)
    assert len(html_rows) == len(rows) == 9
    for row, html_row in zip(rows, html_rows, strict=True):
        assert cell(html_row, "name") == row["name"]
        if row["status"] != "ok":  # the zero matrix: NaN, flagged, no plot
            assert cell(html_row, "alpha") == "NaN" and 'class="failed"' in html_row
            assert "<svg" not in html_row
            continue
        assert float(cell(html_row, "alpha")) == pytest.approx(row["alpha"], abs=5e-4)
        assert float(cell(html_row, "xmin")) == pytest.approx(row["xmin"], rel=1e-3)
        assert f'data-k5="{row["alpha"]!r}"' in html_row  # the exact alpha, to sort by
        assert html_row.count("<circle") <= ESD_BINS  # downsampled
        assert html_row.count('<line class="fit"') == html_row.count('<line class="xmin"') == 1
    summary = re.search(r'<section id="summary">.*?</section>', page).group(0)
    fitted = [r["alpha"] for r in rows if r["status"] == "ok"]
    assert f"<dd>{np.mean(fitted):.3f}</dd>" in summary
    assert "<dd>ks</dd>" in summary


def test_warnings_list_over_and_under_trained_failed_and_skipped_matrices():
    model = linears(6)
    model.append(torch.nn.Linear(128, 4))  # 4 eigenvalues < min_evals: skipped
    metrics, esd = analyze(model, device="cpu", workers=1, return_esd=True)
    page = render_report(metrics, esd)
    warnings = re.findall(r'<li class="([\w-]+)">(.*?)</li>', page)
    by_kind = {}
    for kind, text in warnings:
        by_kind.setdefault(kind, []).append(text)
    expected = {r["name"] for r in metrics.to_pylist() if r["warning"]}
    assert {t.split(":")[0] for k in ("over-trained", "under-trained")
            for t in by_kind.get(k, [])} == expected
    assert "1" in {t.split(":")[0] for t in by_kind["over-trained"]}  # the Student-t layer
    assert by_kind["failed"] == ["2: no fit (zero matrix; alpha is NaN)"]
    assert by_kind["skipped"] == ["6: skipped (4 eigenvalues &lt; min_evals 10)"]


def test_fitted_line_is_the_power_law_pdf_scaled_by_the_tail_share():
    row = {"alpha": 3.0, "xmin": 2.0, "num_pl_spikes": 25}
    (x0, y0), (x1, y1) = fitted_tail(row, num_positive=100, x_max=20.0)
    # p(x) = share * (alpha - 1) / xmin * (x / xmin)^-alpha, written out in float64.
    for lx, ly in ((x0, y0), (x1, y1)):
        x = 10.0**lx
        assert ly == pytest.approx(math.log10(0.25 * 2.0 / 2.0 * (x / 2.0) ** -3.0))
    assert (x0, x1) == pytest.approx((math.log10(2.0), math.log10(20.0)))


def test_page_is_self_contained_and_a_200_matrix_model_stays_under_5_mb():
    metrics, esd = analyze(linears(200), device="cpu", return_esd=True)
    page = render_report(metrics, esd, "two hundred")
    assert len(table_rows(page)) == 200
    assert len(page.encode()) < 5_000_000
    # No resource from anywhere: no src/href but data: URIs, no external script or style,
    # and a policy that forbids every request.
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert "<script src" not in page and "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page


def test_spectral_step_stores_the_report(tmp_path):
    store = open_store(str(tmp_path / "store"))
    model_dir = tmp_path / "mlp"
    model_dir.mkdir()
    from safetensors.torch import save_file

    save_file({f"{k}": v.contiguous() for k, v in mlp().state_dict().items()},
              model_dir / "model.safetensors")
    model = store.put(model_dir, "model").digest
    result = run_step(SPECTRAL, {"device": "cpu", "plots": False}, {"model": model}, store=store)
    report = result.outputs["report"]
    assert (report.kind, report.media_type) == ("report", "text/html")
    page = store.get(report.digest, tmp_path / "report.html").read_text()
    metrics = pq.read_table(store.get(result.outputs["metrics"].digest, tmp_path / "m.parquet"))
    assert len(table_rows(page)) == metrics.num_rows
    assert f"model {model[:12]}" in page


@pytest.mark.slow  # MLflow creates its SQLite tables (~10 s here)
def test_cli_report_of_a_model_a_parquet_file_and_a_metrics_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runner = CliRunner()
    store = str(tmp_path / "store")
    model_dir = tmp_path / "mlp"
    model_dir.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in mlp().state_dict().items()},
              model_dir / "model.safetensors")
    done = runner.invoke(app, ["report", str(model_dir), "--output", str(tmp_path / "a.html"),
                               "--device", "cpu", "--store", store])
    assert done.exit_code == 0, done.output
    from_model = (tmp_path / "a.html").read_text()

    # The metrics the step stored, by digest: the same matrices and ESDs.
    [metrics_manifest] = open_store(store).list("spectral-metrics")
    done = runner.invoke(app, ["report", metrics_manifest.digest[:16], "--output",
                               str(tmp_path / "b.html"), "--store", store])
    assert done.exit_code == 0, done.output
    assert table_rows((tmp_path / "b.html").read_text()) == table_rows(from_model)

    # A Parquet file written by `analyze`, with and without its ESD table.
    metrics, esd = analyze(mlp(), device="cpu", workers=1, return_esd=True)
    pq.write_table(metrics, tmp_path / "m.parquet")
    pq.write_table(esd, tmp_path / "esd.parquet")
    done = runner.invoke(app, ["report", str(tmp_path / "m.parquet"), "--esd",
                               str(tmp_path / "esd.parquet"), "-o", str(tmp_path / "c.html")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "c.html").read_text().count('<svg class="esd"') == metrics.num_rows
    done = runner.invoke(app, ["report", str(tmp_path / "m.parquet"), "-o",
                               str(tmp_path / "d.html")])
    assert done.exit_code == 0 and "ESD plots are left out" in (tmp_path / "d.html").read_text()


def test_cli_report_refuses_a_table_that_is_not_spectral_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILWISE_STORE", str(tmp_path / "store"))
    import pyarrow as pa

    pq.write_table(pa.table({"name": ["a"], "sparsity": [0.5]}), tmp_path / "d.parquet")
    (tmp_path / "junk.parquet").write_text(json.dumps({"not": "parquet"}))
    runner = CliRunner()
    for bad in ("d.parquet", "junk.parquet"):
        done = runner.invoke(app, ["report", str(tmp_path / bad), "-o", str(tmp_path / "r.html")])
        assert done.exit_code != 0 and isinstance(done.exception, Exception)
        assert str(tmp_path / bad) in str(done.exception)
    assert not (tmp_path / "r.html").exists()
