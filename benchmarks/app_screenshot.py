"""The README's picture of the app, made the way a user makes it: the Train form's default job (the quick start's
recipe: tiny-emoji, r 16 conv LoRA, lr 3e-3, 600 steps) started as an A/B pair, RefLoRA against LoRA, on four of the
DreamBooth dog photos with the fifth held out for the eval loss; then the Compare tab's grid, curves and table.

    python benchmarks/app_screenshot.py [--steps 600] [--out docs/app.png]

Needs the `[ui]` extra, Playwright (python) and Debian's `chromium`. Drives a real `python app.py` in headless
Chromium; both runs train side by side (one core each), ~5-10 min on this 2-core CPU. Writes the screenshot and,
beside the benchmarks' other results, `app_screenshot.json`: each run's final training loss and eval losses, read
from its events.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
from app_driver import CHROMIUM, CHROMIUM_ARGS, REPO, fill, launch_app, stop, upload

DOG = common.DREAMBOOTH / "dog"


def drive(url: str, photos: list[Path], held_out: Path, steps: int, shot: Path, timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_role("button", name="Start", exact=True).wait_for()
        upload(page, photos)
        if steps != 600:
            fill(page, "Steps", steps)
        page.get_by_text("More options").click()
        fill(page, "Eval loss every N steps (0: off)", max(1, steps // 12))
        fill(page, "Eval loss on the images of this folder", held_out)
        fill(page, "Run name (optional)", "dog")
        page.get_by_label("A/B side by side (default: one after the other)").check()
        page.get_by_role("button", name="Start A/B (both methods, same data and seed)").click()
        page.get_by_text("Started A/B").wait_for(timeout=60_000)
        print(page.get_by_text("Started A/B").first.inner_text(), flush=True)

        page.get_by_role("tab", name="Compare").click()
        fill(page, "Seeds", "0, 1, 2, 3")
        page.locator("#comparison-grid img").wait_for(state="visible", timeout=timeout_s * 1000)
        page.get_by_text("Steps to loss").first.wait_for(timeout=60_000)
        time.sleep(3)  # let the plots finish drawing
        page.screenshot(path=str(shot), full_page=True)
        browser.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=str(REPO / "docs" / "app.png"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--timeout_min", type=float, default=40)
    ap.add_argument("--keep", action="store_true", help="keep the runs folder (printed) instead of removing it")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        sys.exit("no chromium browser: apt-get install -y chromium")
    photos = sorted(DOG.glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="app-screenshot-"))
    held_out = work / "held_out"
    held_out.mkdir()
    shutil.copy(photos[-1], held_out)
    runs_dir = work / "runs"
    proc, url = launch_app(runs_dir, "--max_concurrent_jobs", "2")
    t0 = time.perf_counter()
    try:
        drive(url, photos[:-1], held_out, args.steps, work / "app.png", args.timeout_min * 60)
    finally:
        stop(proc)
    runs = {}
    for run in sorted(p for p in runs_dir.iterdir() if (p / "events.jsonl").is_file()):
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        config = json.loads((run / "config.json").read_text())
        losses = [e["loss"] for e in events if "loss" in e]
        runs[run.name] = {"method": config["method"], "steps": config["max_train_steps"], "seed": config["seed"],
                          "final_loss": losses[-1] if losses else None,
                          "eval_loss": {e["step"]: e["eval_loss"] for e in events if "eval_loss" in e}}
        print(f"{run.name}: {runs[run.name]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "app.png", args.out)
    result = {"steps": args.steps, "train_photos": [p.name for p in photos[:-1]], "held_out": photos[-1].name,
              "minutes": (time.perf_counter() - t0) / 60, "runs": runs, "screenshot": str(args.out)}
    (Path(args.results) / "app_screenshot.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} and {Path(args.results) / 'app_screenshot.json'} ({result['minutes']:.1f} min)")
    if args.keep:
        print(f"runs kept in {runs_dir}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
