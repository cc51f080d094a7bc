"""The launched app (`python app.py`, with a login) driven through gradio_client like a script would:
upload images, start a tiny job, poll to completion, export, and load the downloaded files."""

import json
import sys
import time
from pathlib import Path

import pytest
import requests

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from test_app_train import DOG  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import app_driver  # noqa: E402  (the launcher benchmarks/app_screenshot.py uses too)
from app_driver import stop  # noqa: E402  (test_app_auth and test_app_browser take it from here too)
AUTH = ("tester", "s3cret-pass")


def launch_app(runs_dir: Path, *args: str):
    """`python app.py ...` in a subprocess on one thread; returns (process, url) once it answers."""
    return app_driver.launch_app(runs_dir, *args, threads=1)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("api") / "runs"
    proc, url = launch_app(runs_dir, "--auth", ":".join(AUTH))
    yield url, runs_dir
    stop(proc)


def test_idle_app_uses_almost_no_cpu(tmp_path):
    """`python app.py` with no browser open: gradio's queue used to look for events every 1 ms (~5 % of a core)."""
    psutil = pytest.importorskip("psutil")
    proc, _ = launch_app(tmp_path / "runs")
    try:
        time.sleep(5)  # start-up work done
        app = psutil.Process(proc.pid)
        before, start = app.cpu_times(), time.monotonic()
        time.sleep(10)
        after = app.cpu_times()
        share = (after.user + after.system - before.user - before.system) / (time.monotonic() - start)
    finally:
        stop(proc)
    assert share < 0.02, f"the idle app used {100 * share:.1f} % of a core"


@pytest.mark.skipif(not DOG.is_dir(), reason="needs ../shared/data/dreambooth/dog")
def test_api_train_poll_export_load(app, tmp_path):
    url, runs_dir = app
    # the login protects the API and the files
    assert requests.get(url + "config", timeout=10).status_code == 401
    client = Client(url, auth=AUTH, verbose=False, download_files=str(tmp_path / "downloads"))

    # bad uploads are refused with a message, and leave no run behind
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    msg = client.predict(images=[handle_file(str(notes))], instance_prompt="a photo of sks dog", api_name="/start")
    assert "Not started" in msg and "notes.png" in msg and "not a readable image" in msg
    assert client.predict(api_name="/runs") == []

    msg = client.predict(images=[handle_file(str(p)) for p in sorted(DOG.glob("*.jpg"))[:3]],
                         run_name="api dog", method="reflora", rank=4, alpha=8, steps=6, lr=1e-3, resolution=64,
                         seed=1, warmup_steps=2, validation_steps=6, checkpointing_steps=3, lora_conv=False,
                         eval_loss_every=3, api_name="/start")
    assert msg.startswith("Started api-dog"), msg
    seen = set()
    deadline = time.time() + 300
    while True:
        status = client.predict(name="api-dog", api_name="/status")
        seen.add(status["state"])
        if status["state"] not in ("queued", "running"):
            break
        assert time.time() < deadline, (runs_dir / "api-dog" / "train.log").read_text()[-3000:]
        time.sleep(1)
    assert status["state"] == "done", (runs_dir / "api-dog" / "train.log").read_text()[-3000:]
    assert (status["step"], status["max_steps"], status["progress"], status["method"]) == (6, 6, 1.0, "reflora")
    assert "running" in seen
    assert len(list((runs_dir / "api-dog" / "data").glob("*.jpg"))) == 3  # the uploads, copied into the run
    events = [json.loads(line) for line in (runs_dir / "api-dog" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "eval_loss" in e] == [0, 3, 6]  # the form's eval loss, at 0 and the end
    assert [r["name"] for r in client.predict(api_name="/runs")] == ["api-dog"]

    file, card, info = client.predict(name="api-dog", source="final", fmt="diffusers", api_name="/export")
    assert "rank 4" in info and "alpha 8.0" in info and "reflora" in info
    assert Path(card).read_text().startswith("---") and Path(file).name == "pytorch_lora_weights.safetensors"
    kfile, _, kinfo = client.predict(name="api-dog", source="checkpoint-3", fmt="kohya", api_name="/export")
    assert Path(kfile).name == "api-dog.safetensors" and "kohya format" in kinfo

    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        keys = list(f.keys())
        assert json.loads(f.metadata()["reflora_info"])["method"] == "reflora"
    from diffusers import StableDiffusionPipeline

    from reflora_diffusion.presets import resolve_pretrained

    # the app's default base (tiny-emoji): one A and one B per attention projection of its UNet
    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained("tiny-emoji"))
    targets = [n for n, _ in pipe.unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert len(keys) == 2 * len(targets) and all(".lora_A." in k or ".lora_B." in k for k in keys)
    pipe.load_lora_weights(str(Path(file).parent), weight_name=Path(file).name, adapter_name="final")
    pipe.load_lora_weights(kfile, adapter_name="kohya")
    assert set(pipe.get_list_adapters()["unet"]) == {"final", "kohya"}

    # only files inside the runs dir are served, and run names cannot climb out of it
    s = requests.Session()
    assert s.post(url + "login", data={"username": AUTH[0], "password": AUTH[1]}, timeout=10).status_code == 200
    assert s.get(url + "gradio_api/file=/etc/passwd", timeout=10).status_code == 403
    assert s.get(url + f"gradio_api/file={REPO / 'app.py'}", timeout=10).status_code == 403
    assert s.get(url + f"gradio_api/file={runs_dir / 'api-dog' / 'config.json'}", timeout=10).status_code == 200
    file, card, info = client.predict(name="../api-dog", source="final", fmt="diffusers", api_name="/export")
    assert file is None and "outside the runs directory" in info
    with pytest.raises(Exception):
        client.predict(name="../../etc", api_name="/status")
    assert "outside the runs directory" in client.predict(name="../x", api_name="/cancel")
