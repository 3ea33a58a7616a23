"""The HT-SR report page opens in headless Chromium without errors or requests, and sorts.

Debian's chromium driven by Playwright (as test_prefect_ui.py); browsers are never
downloaded. The screenshot is kept in the test's tmp dir (and $TAILWISE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from steps.spectral import analyze
from steps.spectral.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium (apt-get install "
                              "chromium); Playwright's own browsers are not downloaded"),
]


def small_model() -> torch.nn.Module:
    """Twelve matrices: noise, one heavy-tailed (Student-t, over-trained), one all-zero."""
    torch.manual_seed(0)
    model = torch.nn.ModuleList(torch.nn.Linear(96, 64 + 16 * (i % 3)) for i in range(12))
    with torch.no_grad():
        model[4].weight.copy_(torch.distributions.StudentT(1.0).sample(model[4].weight.shape))
        model[7].weight.zero_()
    return model


def test_report_opens_in_chromium_without_errors_and_sorts_by_alpha(tmp_path):
    from playwright.sync_api import sync_playwright

    metrics, esd = analyze(small_model(), device="cpu", workers=1, return_esd=True)
    page_file = write_report(metrics, esd, tmp_path / "report.html", "twelve linears")
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri(), wait_until="load")
            model_order = page.locator("#matrix-table tbody td.name").all_text_contents()
            plots = page.locator("#matrix-table svg.esd").count()
            fit_lines = page.locator("#matrix-table svg.esd line.fit").count()
            page.locator("#matrix-table th", has_text="alpha").first.click()
            ascending = page.locator("#matrix-table tbody td.alpha").all_text_contents()
            save_screenshot(page, tmp_path / "report.png")
            page.locator("#matrix-table th", has_text="alpha").first.click()
            descending = page.locator("#matrix-table tbody td.alpha").all_text_contents()
            warnings = page.locator("#warnings li").all_text_contents()
        finally:
            browser.close()

    assert problems == []
    assert requests == [page_file.as_uri()]  # the page itself, nothing else
    rows = metrics.to_pylist()
    assert model_order == [r["name"] for r in rows]
    fitted_rows = [r for r in rows if r["status"] == "ok"]
    assert plots == fit_lines == len(fitted_rows) == len(rows) - 1  # the zero matrix: no ESD
    fitted = sorted(r["alpha"] for r in rows if r["status"] == "ok")
    assert [float(a) for a in ascending[:len(fitted)]] == pytest.approx(fitted, abs=5e-4)
    assert ascending[-1] == "NaN" and descending[0] == "NaN"
    assert [float(a) for a in descending[1:]] == pytest.approx(fitted[::-1], abs=5e-4)
    assert any("4: over-trained" in w for w in warnings)
    assert any(w.startswith("7: no fit") for w in warnings)


def save_screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if target := os.environ.get("TAILWISE_TEST_ARTIFACTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
