"""report.html of a real run (`memora-batch demo --quick` on the micro world, ComfyUI's executor in this process)
opened in Chromium: its pictures load (the comparison grid drawn from the run's images, the rate chart), no table
in the page is wider than 8 columns, the summary answers with the three models' rates; a full-page screenshot goes
to test-artifacts/browser/report-html.png."""

from __future__ import annotations

from pathlib import Path

import pytest

from memora_batch import cli

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"


@pytest.fixture(scope="module")
def demo_run(comfy, tmp_path_factory) -> Path:
    """The results folder of `memora-batch demo --quick`; run before Chromium starts (Playwright's sync API keeps an
    event loop running in this thread, and the embedded executor runs its own)."""
    out = tmp_path_factory.mktemp("report_html") / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_report_html_of_a_real_run_in_chromium(demo_run, browser):
    out = demo_run
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    seen = page.evaluate("""() => ({
        widths: [...document.querySelectorAll('table tr')].map(r => r.children.length),
        tables: document.querySelectorAll('table').length,
        images: [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight})),
        summary: [...document.querySelectorAll('table')[0].querySelectorAll('th')].map(th => th.textContent),
        rows: document.querySelectorAll('table')[0].querySelectorAll('tbody tr').length,
    })""")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-html.png"), full_page=True)
    page.context.close()
    assert not errors, errors
    assert seen["tables"] >= 5 and max(seen["widths"]) <= 8, seen["widths"]
    assert seen["summary"][2:5] == [f"concept rate ({m})" for m in ("original", "unlearned", "recovered")]
    assert seen["rows"] == 1
    alts = {i["alt"]: i for i in seen["images"]}
    grid = next(i for a, i in alts.items() if a.startswith("comparison grid "))
    assert grid["w"] > 200 and grid["h"] > 200  # decoded by the browser, three columns of 160 px cells
    assert alts["concept rate per model"]["w"] > 100
    assert (ARTIFACTS / "report-html.png").stat().st_size > 10_000
