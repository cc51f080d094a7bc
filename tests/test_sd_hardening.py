"""What a newcomer, a busy CPU and hostile input meet in the SD trainer (issue 8): native resolution,
CPU threads, a reused output folder, resume checks, stale temporary files, SIGTERM, bad numbers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from reflora_diffusion.sd.config import make_config
from reflora_diffusion.presets import native_resolution
from sd_helpers import BASE, DOG, PROMPT, REPO, make_trainer, run_cli, train

FAST = dict(validation_prompt=[], checkpointing_steps=1000)


def test_resolution_defaults_to_the_models_native_size(tmp_path):
    for name, sample, blocks, expected in (("sd15", 64, 4, 512), ("sdxl", 128, 4, 1024)):
        for sub, cfg in (("unet", {"sample_size": sample}), ("vae", {"block_out_channels": [1] * blocks})):
            (tmp_path / name / sub).mkdir(parents=True)
            (tmp_path / name / sub / "config.json").write_text(json.dumps(cfg))
        assert native_resolution(str(tmp_path / name)) == expected
    trainer = make_trainer(tmp_path / "run", **{**BASE, **FAST, "resolution": None, "max_train_steps": 1})
    assert trainer.cfg.resolution == 64
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resolution"] == 64
    assert saved["base_model_folder"] and (Path(saved["base_model_folder"]) / "model_index.json").is_file()


def test_cpu_threads_honour_omp_num_threads_else_take_a_share(monkeypatch):
    from reflora_diffusion import cpu

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cpu.configure_cpu_threads(4) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
        assert cpu.configure_cpu_threads(2) == 4 and cpu.configure_cpu_threads(16) == 1
    finally:
        torch.set_num_threads(before)


def test_nan_learning_rate_and_warmup_covering_the_run(tmp_path, capsys):
    common = ["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(DOG), "--instance_prompt", PROMPT,
              "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]
    code, err = run_cli(common + ["--learning_rate", "nan"], capsys)
    assert code == 2 and err == "error: --learning_rate must be a finite number (got nan)"
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="trains as plain LoRA"):
        code, err = run_cli(common + ["--method", "reflora", "--refactor_warmup_steps", "100"], capsys)
    assert code == 0, err


def test_data_errors_leave_no_run_folder_and_tiny_images_are_named(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", "tiny", "--instance_prompt", PROMPT, "--output_dir", str(out)]
    code, err = run_cli(args + ["--instance_data_dir", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err and not out.exists()
    (tmp_path / "empty").mkdir()
    code, err = run_cli(args + ["--instance_data_dir", str(tmp_path / "empty")], capsys)
    assert code == 2 and "holds no images" in err and not out.exists()
    pix = tmp_path / "pix"
    pix.mkdir()
    Image.new("RGB", (1, 1), "red").save(pix / "dot.png")
    Image.new("RGB", (20, 20), "blue").save(pix / "small.png")
    from reflora_diffusion.sd.data import build_dataset

    cfg = make_config({**BASE, "instance_data_dir": str(pix), "output_dir": str(out)})
    with pytest.warns(UserWarning) as record:
        data = build_dataset(cfg)
    text = " | ".join(str(w.message) for w in record)
    assert "smaller than 16 px: dot.png (1x1)" in text and "upscaled more than 2x" in text and "small.png" in text
    assert len(data) == 1
    (pix / "small.png").unlink()
    with pytest.warns(UserWarning), pytest.raises(Exception, match=r"no usable image left \(smaller than 16 px: dot.png"):
        build_dataset(cfg)


def test_a_folder_holding_another_run_is_refused_then_replaced_only_on_request(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, **{**FAST, "checkpointing_steps": 2})
    adapter = (run / "pytorch_lora_weights.safetensors").read_bytes()
    config = (run / "config.json").read_text()
    common = ["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(DOG), "--instance_prompt", PROMPT,
              "--resolution", "64", "--max_train_steps", "2", "--output_dir", str(run), "--checkpointing_steps", "1000"]
    code, err = run_cli(common + ["--rank", "8"], capsys)
    assert code == 2 and "already holds a reflora-s run (rank 4, done at step 4)" in err and "--overwrite_output_dir" in err
    # nothing was touched: config, adapter, events, checkpoints all as they were
    assert (run / "config.json").read_text() == config
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == adapter
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    # a resume request on a finished run with no checkpoint never destroys its adapter
    import shutil

    shutil.rmtree(run / "checkpoints")
    code, err = run_cli(common + ["--rank", "4", "--seed", "0", "--resume_from_checkpoint", "latest"], capsys)
    assert code == 2 and "no checkpoint to resume (its files are kept)" in err
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == adapter
    # a non-empty folder that is not a run
    other = tmp_path / "project"
    other.mkdir()
    (other / "README.md").write_text("my project")
    code, err = run_cli([*common[:-6], "--output_dir", str(other), "--max_train_steps", "1"], capsys)
    assert code == 2 and "holds no run of this trainer" in err and (other / "README.md").read_text() == "my project"
    # explicit overwrite: a fresh run, the old checkpoints and events are gone
    code, err = run_cli(common + ["--rank", "8", "--overwrite_output_dir"], capsys)
    assert code == 0, err
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == [1, 2]
    assert json.loads((run / "config.json").read_text())["rank"] == 8


def test_resume_at_another_rank_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, **{**FAST, "checkpointing_steps": 2})
    code, err = run_cli(["--config", str(run / "config.json"), "--rank", "8", "--resume_from_checkpoint", "latest",
                         "--max_train_steps", "6"], capsys)
    assert code == 2 and "was trained with --rank 4, not 8; resume with the same --rank" in err


def test_stale_temporary_files_are_cleaned_on_start(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".checkpoint-2.tmp").mkdir(parents=True)
    (run / ".status.json.123.tmp").write_text("{")
    (run / ".pytorch_lora_weights.safetensors.abc.tmp").write_bytes(b"x")
    (run / "notes.txt").write_text("mine")  # not ours, not temporary: the folder is refused, nothing deleted
    with pytest.raises(Exception, match="holds no run"):
        make_trainer(run, **FAST)
    (run / "notes.txt").unlink()
    # what a trainer killed (kill -9) in its first checkpoint leaves: its config, a "running" status, temps
    (run / "config.json").write_text(json.dumps({**BASE, "output_dir": str(run)}))
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": 2**22 + 12345, "step": 0}))
    make_trainer(run, **{**FAST, "max_train_steps": 1})
    left = sorted(p.name for p in run.rglob("*.tmp"))
    assert left == [], left


def _spawn(cmd, run: Path, **env):
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(pred, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def _status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def test_sigterm_to_accelerate_launch_stops_the_trainer_at_a_step_with_a_checkpoint(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        pytest.skip("no accelerate launcher beside this python")
    run = tmp_path / "run"
    cmd = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "train/sd.py", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir",
           str(DOG), "--instance_prompt", PROMPT, "--max_train_steps", "100000", "--output_dir", str(run)]
    proc = _spawn(cmd, run)
    try:
        assert _wait_for(lambda: (run / "events.jsonl").is_file()), proc.stderr.read()[-2000:] if proc.poll() else ""
        trainer_pid = _status(run)["pid"]
        assert trainer_pid != proc.pid
        proc.send_signal(signal.SIGTERM)  # the launcher only: it does not pass the signal on by itself
        proc.wait(timeout=30)
        assert _wait_for(lambda: _status(run).get("state") == "cancelled", 60), _status(run)
        assert _wait_for(lambda: not _alive(trainer_pid), 30)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    status = _status(run)
    assert "by SIGTERM" in status["error"] and "--resume_from_checkpoint latest" in status["error"]
    assert (run / "checkpoints" / f"checkpoint-{status['step']}").is_dir()


def test_a_step_that_never_ends_is_stopped_by_the_watchdog(tmp_path):
    run = tmp_path / "run"
    # 256 px on the tiny preset: self-attention over 16k tokens, a step takes minutes on this CPU
    cmd = [sys.executable, "train/sd.py", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(DOG),
           "--instance_prompt", PROMPT, "--resolution", "256", "--max_train_steps", "5", "--output_dir", str(run)]
    proc = _spawn(cmd, run, REFLORA_STOP_GRACE_S="1")
    try:
        assert _wait_for(lambda: _status(run).get("state") == "running")
        time.sleep(1.0)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 130 and time.time() - t0 < 30, err[-2000:]
    status = _status(run)
    assert status["state"] == "cancelled" and "did not end within 1 s" in status["error"], status


def _alive(pid) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_clearing_a_run_never_leaves_the_folder_without_config_and_status(tmp_path):
    """The app lists and polls a run while its trainer starts: the folder must stay a run throughout."""
    from reflora_diffusion.rundir import clear_run, read_json

    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.safetensors").write_bytes(b"")
    (run / "samples").mkdir()
    for name, text in (("config.json", '{"rank": 4, "method": "lora", "output_dir": "run"}'),
                       ("status.json", '{"state": "queued"}'), ("events.jsonl", "{}\n"), ("train.log", "log")):
        (run / name).write_text(text)
    save_file({"w": torch.zeros(1)}, str(run / "pytorch_lora_weights.safetensors"), metadata={"reflora_info": "{}"})
    clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "status.json", "train.log"]
    assert read_json(run / "status.json") == {"state": "queued"}


def test_help_lists_every_option():
    """`python train/sd.py --help` prints (a literal % in a help text once made argparse crash there)."""
    from reflora_diffusion.sd.config import FIELDS

    out = subprocess.run([sys.executable, str(REPO / "train" / "sd.py"), "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-400:]
    assert all(f"--{name}" in out.stdout for name in FIELDS)
    assert "10 % of the run" in " ".join(out.stdout.split())
