"""The job runner with the real trainer: `accelerate launch train/sd.py --config <run>/config.json` on the
tiny preset with real DreamBooth photos; one run to the end (then exported and loaded), one cancelled."""

import json
import time
from pathlib import Path

import pytest

from reflora_diffusion.app import downloads, runs
from reflora_diffusion.app.jobs import JobRunner

DOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth" / "dog"  # ../shared/data

TINY_FORM = {"pretrained_model_name_or_path": "tiny", "instance_data_dir": str(DOG),
             "instance_prompt": "a photo of sks dog", "method": "reflora", "rank": 4, "lora_alpha": 8,
             "max_train_steps": 8, "resolution": 64, "seed": 0, "refactor_warmup_steps": 2, "learning_rate": 1e-3,
             "validation_prompt": "a photo of sks dog", "validation_steps": 4, "num_validation_images": 1,
             "validation_inference_steps": 3, "checkpointing_steps": 4}


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer processes share a 2-core machine


@pytest.mark.skipif(not DOG.is_dir(), reason="needs ../shared/data/dreambooth/dog")
def test_real_tiny_job_runs_exports_and_cancels(tmp_path):
    r = JobRunner(tmp_path / "runs", max_concurrent=2)  # the long one runs while the other one does
    done_dir = r.start(TINY_FORM, name="dog reflora")
    long_dir = r.start({**TINY_FORM, "max_train_steps": 10_000, "validation_prompt": None}, name="long")

    # cancel the long one once it is really training
    deadline = time.time() + 240
    while runs.read_run(r.runs_dir, "long").step < 2:
        assert runs.read_run(r.runs_dir, "long").state == "running", (long_dir / "train.log").read_text()[-2000:]
        assert time.time() < deadline, "the trainer did not start in time"
        time.sleep(0.5)
    trainer_pid = json.loads((long_dir / "status.json").read_text())["pid"]
    assert r.cancel("long").startswith("cancelled long")
    assert not runs.pid_alive(trainer_pid)
    long = runs.read_run(r.runs_dir, "long")
    assert long.state == "cancelled" and long.error == "cancelled by the user" and 2 <= long.step < 10_000
    events = runs.event_log(long_dir)  # the folder stays readable: whole lines only, steps up to the cancel
    assert events.offset == (long_dir / "events.jsonl").stat().st_size and events.steps[-1] >= 2
    assert not (long_dir / "pytorch_lora_weights.safetensors").exists()

    assert r.wait(done_dir, timeout=300) == "done", (done_dir / "train.log").read_text()[-3000:]
    run = runs.read_run(r.runs_dir, "dog-reflora")
    assert (run.state, run.step, run.progress, run.error) == ("done", 8, 1.0, None)
    log = runs.event_log(done_dir)
    assert log.steps == list(range(1, 9)) and all(l > 0 for l in log.losses)
    stats = runs.balance_stats(r.runs_dir, "dog-reflora")
    assert stats["refactored"] > 0 and stats["balance_mean"] > 0  # RefLoRA ran after its 2 warm-up steps
    assert sorted(runs.sample_steps(r.runs_dir, "dog-reflora")) == [4, 8]
    assert (done_dir / "train.log").read_text().startswith("$ ") and "accelerate" in (done_dir / "job.json").read_text()

    # export both formats from the app's wrapper: the file itself says rank, alpha, method
    assert downloads.export_sources(r.runs_dir, "dog-reflora") == ["final", "checkpoint-8", "checkpoint-4"]
    diff = downloads.export_for_download(r.runs_dir, "dog-reflora", "final", "diffusers")
    kohya = downloads.export_for_download(r.runs_dir, "dog-reflora", "checkpoint-4", "kohya")
    for result, fmt in ((diff, "diffusers"), (kohya, "kohya")):
        info = result["info"]
        assert (info["format"], info["rank"], info["alpha"], info["method"]) == (fmt, 4, 8.0, "reflora")
        assert result["file"].parent.parent == done_dir / "exports" and "reflora" in result["card"].read_text()
    assert diff["info"]["keys"] == 2 * 32 and kohya["info"]["keys"] == 3 * 32  # A, B (+ alpha) per layer

    from diffusers import StableDiffusionPipeline

    from reflora_diffusion.presets import resolve_pretrained

    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained("tiny"))
    pipe.load_lora_weights(str(diff["file"].parent), adapter_name="final")
    pipe.load_lora_weights(str(kohya["file"]), adapter_name="ckpt4")
    assert set(pipe.get_list_adapters()["unet"]) == {"final", "ckpt4"}
    with pytest.raises(downloads.ExportError, match="no checkpoint-99"):
        downloads.export_for_download(r.runs_dir, "dog-reflora", "checkpoint-99", "kohya")
    with pytest.raises(runs.RunPathError):
        downloads.export_for_download(r.runs_dir, "../dog-reflora", "final", "kohya")


def test_a_trainer_error_before_the_run_starts_shows_the_trainers_line(tmp_path):
    """No images in the data folder, a broken base folder: the trainer stops before its run log starts (with one
    `error:` line and exit code 2 for the first); `accelerate launch` then adds its own CalledProcessError, which
    is never the reason shown."""
    empty, broken = tmp_path / "empty", tmp_path / "broken-base"
    empty.mkdir()
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    r = JobRunner(tmp_path / "runs", max_concurrent=2)
    no_images = r.start({**TINY_FORM, "instance_data_dir": str(empty)}, name="no-images")
    no_base = r.start({**TINY_FORM, "pretrained_model_name_or_path": str(broken)}, name="no-base")
    assert r.wait(no_images, timeout=240) == "failed"
    error = runs.read_run(r.runs_dir, "no-images").error
    assert error.startswith(f"error: --instance_data_dir {str(empty)!r} holds no images"), error
    assert error.endswith("(exit code 2); see train.log"), error
    assert r.wait(no_base, timeout=240) == "failed"
    error = runs.read_run(r.runs_dir, "no-base").error
    assert "CalledProcessError" not in error and "exit status" not in error, error  # the trainer's own last line
