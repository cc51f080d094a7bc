"""Driving the real app from outside, as a user does: `python app.py` in a subprocess, and in headless Chromium
(Playwright) the page's fields filled and its files chosen. Used by benchmarks/app_screenshot.py and by the app's
API, login and browser tests (tests/test_app_*.py), so the launcher and the form filler live once."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(runs_dir: Path, *args: str, threads: int | None = None, timeout_s: float = 120):
    """`python app.py --runs_dir RUNS_DIR --port <free> ARGS` (offline, no analytics; OMP_NUM_THREADS=threads when
    given); returns (process, url) once the page answers. Its output goes to app-<port>.log beside ``runs_dir``;
    the end of it is in the error when the app exits or does not answer within ``timeout_s``."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    Path(runs_dir).parent.mkdir(parents=True, exist_ok=True)
    log = Path(runs_dir).parent / f"app-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--runs_dir", str(runs_dir), "--port", str(port), *args],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited (code {proc.returncode}); the end of {log}:\n"
                               + log.read_text()[-3000:])
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"the app did not answer within {timeout_s:.0f} s; the end of {log}:\n" + log.read_text()[-3000:])


def stop(proc) -> None:
    """Stop the app and the training jobs it started (one process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def fill(page, label: str, value) -> None:
    """Type ``value`` into the field labelled ``label`` and leave it (gradio commits a field's value on blur)."""
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


def upload(page, files, tries: int = 3) -> None:
    """Choose files in the 'Training images' box; retried because the first try can land before the page's scripts
    are wired up (then the browser drops it)."""
    from playwright.sync_api import TimeoutError as PageTimeout

    for _ in range(tries):
        page.locator("input[type=file]").first.set_input_files([str(f) for f in files])
        try:
            page.get_by_text(Path(files[0]).name).first.wait_for(timeout=15_000)
            return
        except PageTimeout:
            continue
    raise RuntimeError(f"the upload of {Path(files[0]).name} never showed on the page")
