"""The page in real headless Chromium (Debian's `chromium`, driven by Playwright): upload photos, start a
tiny A/B run (LoRA vs RefLoRA), wait for the comparison grid, export. (The README's picture of the app comes from
benchmarks/app_screenshot.py: the form's default 600-step job.)

Needs: apt-get install -y chromium (skipped, with the reason, where no browser is installed)."""

import json
import time
from pathlib import Path

import pytest

from test_app_api import DOG, launch_app, stop

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
from app_driver import CHROMIUM, CHROMIUM_ARGS, fill, upload  # noqa: E402  (benchmarks/, on the path from test_app_api)

pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="no chromium browser: apt-get update && apt-get install -y chromium"),
              pytest.mark.skipif(not DOG.is_dir(), reason="needs ../shared/data/dreambooth/dog")]


def test_browser_ab_run_to_comparison_grid(tmp_path):
    runs_dir = tmp_path / "runs"
    proc, url = launch_app(runs_dir, "--max_concurrent_jobs", "2")  # the A/B pair side by side
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.get_by_role("button", name="Start", exact=True).wait_for()

            upload(page, sorted(DOG.glob("*.jpg"))[:3])
            for label, value in (("Steps", 8), ("Rank", 4), ("Learning rate", 0.001)):
                fill(page, label, value)
            page.get_by_text("More options").click()
            fill(page, "RefLoRA warm-up steps", 2)
            fill(page, "Sample every N steps", 8)
            fill(page, "Checkpoint every N steps", 4)
            fill(page, "Run name (optional)", "browser")
            page.get_by_label("A/B side by side (default: one after the other)").check()  # quicker on 2 cores

            page.get_by_role("button", name="Start A/B (both methods, same data and seed)").click()
            page.get_by_text("Started A/B (side by side): browser-lora, browser-reflora").wait_for(timeout=60_000)

            page.get_by_role("tab", name="Compare").click()
            fill(page, "Seeds", "0, 1")
            fill(page, "number input for Denoising steps", 6)
            grid = page.locator("#comparison-grid img")
            grid.wait_for(state="visible", timeout=420_000)
            assert "Generated" in page.locator("body").inner_text()
            page.get_by_text("Steps to loss").first.wait_for(timeout=30_000)
            time.sleep(2)  # let the plots finish drawing
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            text = page.locator("body").inner_text()

            # export the RefLoRA run for A1111/ComfyUI: picking the run fills in its sources
            page.get_by_role("tab", name="Export").click()
            page.get_by_label("Run to export", exact=True).click()
            page.get_by_role("option", name="browser-reflora").click()
            source = page.get_by_label("Final adapter or checkpoint", exact=True)
            deadline = time.time() + 30
            while source.input_value() != "final" and time.time() < deadline:
                time.sleep(0.2)
            assert source.input_value() == "final"
            page.get_by_role("radio", name="kohya").check()
            page.get_by_role("button", name="Export", exact=True).click()
            info = page.get_by_text("browser-reflora.safetensors (kohya format)")
            info.wait_for(timeout=60_000)
            assert "rank 4" in page.locator("body").inner_text()
            browser.close()
    finally:
        stop(proc)

    for name in ("browser-lora", "browser-reflora"):
        status = (runs_dir / name / "status.json").read_text()
        assert '"state": "done"' in status, (runs_dir / name / "train.log").read_text()[-3000:]
        # fields left blank in the page reach the trainer as blank (its defaults), not as gradio's 0
        config = json.loads((runs_dir / name / "config.json").read_text())
        assert config["lora_alpha"] is None and config["refactor_warmup_steps"] == 2 and config["snr_gamma"] == 5.0
        assert config["rank"] == 4 and config["eval_loss_every"] == 0
    grids = list((runs_dir / "_compare").glob("*/grid.png"))
    assert len(grids) == 1 and "browser-reflora" in text and "browser-lora" in text
