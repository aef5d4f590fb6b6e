"""The Prefect UI, in headless Chromium, answers "which iteration won and why".

A real `prefect server` (with its web UI) records a tiny IPR run; Debian's
chromium, driven by playwright, opens the run's artifacts as a user would
(the key's page, then its latest version) and must find the summary table with
a row per model and the same columns on every row, the report naming the best
model and why, and the best-model page with the checkpoint's location and how
to load it. Skips, with the reason, where chromium or playwright is missing
(`.ci/chromium.sh` installs chromium; playwright is in the dev extra).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_RUN
from prefect_fixtures import run_prefect_server

ROOT = Path(__file__).resolve().parents[1]
RUN = "ui-check"

pytestmark = pytest.mark.slow


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/chromium.sh installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    return exe


def _open_latest(page, ui: str, key: str) -> str:
    """The key's page, then a click on its latest version, as a user gets there; the page text."""
    page.goto(f"{ui}/artifacts/key/{key}")
    page.locator("a[href*='/artifacts/artifact/']").first.click()
    page.wait_for_url("**/artifacts/artifact/**")
    return page


def test_ui_pages_name_the_iterations_and_the_best_model(tmp_path):
    exe = _chromium()
    from playwright.sync_api import expect, sync_playwright

    (tmp_path / "prefect").mkdir()
    with run_prefect_server(tmp_path / "prefect", ui=True) as (api, env):
        sets = [a for kv in [*TINY_RUN, "env.val_tasks=4", f"run_name={RUN}", f"storage.root={tmp_path / 'artifacts'}"] for a in ("--set", kv)]
        run = subprocess.run([sys.executable, "-m", "ipr_cli.main", "run", "-c", str(ROOT / "configs" / "demo.yaml"), *sets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        ui = api.removesuffix("/api")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                _check_pages(page, ui, tmp_path, expect)
            finally:
                browser.close()


def _check_pages(page, ui: str, tmp_path: Path, expect) -> None:
    # The summary table: one row per model, the same columns on every row.
    _open_latest(page, ui, f"{RUN}-summary")
    table = page.locator("table").first
    expect(table.locator("tbody tr")).to_have_count(3, timeout=60_000)
    header = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    assert header[:5] == ["model", "success_rate", "mean_reward", "val_success_rate", "val_mean_reward"], header
    rows = [[c.strip() for c in r.locator("td").all_inner_texts()] for r in table.locator("tbody tr").all()]
    assert [r[0] for r in rows] == ["base", "sft", "iter-01"], rows
    assert {len(r) for r in rows} == {len(header)}, rows
    page.screenshot(path=str(tmp_path / "summary.png"), full_page=True)

    # The report: names the best model and how it was chosen, with the per-model table.
    _open_latest(page, ui, f"{RUN}-report")
    expect(page.get_by_text("Best model:", exact=False).first).to_be_visible(timeout=60_000)
    text = page.inner_text("body")
    assert "chosen on the val tasks" in text and "iter-01" in text and "test mean reward" in text, text[:3000]
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    # The best model: which one, why, where it is and how to load it (not a dead link).
    _open_latest(page, ui, f"{RUN}-best-model")
    expect(page.get_by_text("Location:", exact=False).first).to_be_visible(timeout=60_000)
    text = page.inner_text("body")
    best = next(m for m in ("sft", "iter-01") if f"best model ({m} (chosen on the val tasks" in text)
    assert f"Location: {tmp_path / 'artifacts' / RUN / best / 'model'}" in text, text[:3000]
    assert "AutoModelForCausalLM.from_pretrained" in text, text[:3000]
    page.screenshot(path=str(tmp_path / "best-model.png"), full_page=True)
