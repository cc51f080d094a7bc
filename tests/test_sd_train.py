"""SD trainer end to end on the offline tiny presets with the real DreamBooth photos.

Runs are in-process (accelerate's singletons are reset between runs) and single-threaded: this machine's
2 cores are shared, and torch's thread pool under contention is 10x slower than one thread.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from reflora_diffusion.rundir import read_events
from reflora_diffusion.sd.train import SDTrainer

from sd_helpers import BASE, DOG, PROMPT, REPO, losses, make_trainer, run_cli, train  # noqa: F401


def unet_inputs(sdxl: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 77, 64 if sdxl else 32, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])} if sdxl else None
    return torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), hidden, added


@torch.no_grad()
def unet_out(unet, sdxl: bool) -> torch.Tensor:
    latents, t, hidden, added = unet_inputs(sdxl)
    unet.eval()
    return unet(latents, t, hidden, added_cond_kwargs=added).sample


def load_pipeline_with_lora(run: Path, sdxl: bool, weight_name: str | None = None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from reflora_diffusion.presets import resolve_pretrained

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(resolve_pretrained("tiny-sdxl" if sdxl else "tiny"))
    pipe.load_lora_weights(str(run), weight_name=weight_name)
    return pipe


# --- end to end ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s"])
def test_run_folder_is_complete(tmp_path, method):
    run = tmp_path / method
    trainer = train(run, method=method)

    config = json.loads((run / "config.json").read_text())
    assert config["method"] == method and config["rank"] == 4 and config["seed"] == 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == status["max_steps"] == 4 and status["error"] is None

    events = read_events(run)
    steps = [e for e in events if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        assert math.isfinite(e["loss"]) and e["lr"] == pytest.approx(1e-4) and e["sec_per_step"] > 0
        assert e["refactor"]["method"] == method and e["refactor"]["step"] == e["step"]
    layers = steps[0]["refactor"]["layers"]
    assert layers == 32  # to_q, to_k, to_v, to_out.0 of 8 attention blocks of the tiny UNet
    last = steps[-1]["refactor"]
    if method == "reflora":  # warm-up of 2 plain steps, then every layer is refactored
        assert steps[1]["refactor"]["refactored"] == 0 and last["refactored"] == layers
    if method == "reflora-s":  # rescaled after each step so that ||A|| = ||B|| in every layer
        assert last["balance_mean"] == pytest.approx(1.0, rel=1e-4)
        assert last["balance_max"] == pytest.approx(1.0, rel=1e-4)
    if method == "lora":  # B starts at 0 and stays far smaller than A after 4 small steps
        assert last["balance_max"] < 0.05

    samples = [e for e in events if "samples" in e]
    assert [e["step"] for e in samples] == [2, 4]
    for e in samples:
        for rel in e["samples"]:
            assert Image.open(run / rel).size == (64, 64)
        grid = Image.open(run / "samples" / f"grid_step_{e['step']}.png")  # 1 prompt x 1 image here
        assert grid.size == (64, 64) and grid.tobytes() == Image.open(run / e["samples"][0]).convert("RGB").tobytes()

    ckpt = run / "checkpoints" / "checkpoint-2"
    for name in ("pytorch_lora_weights.safetensors", "refactorer.safetensors", "unet_lora.safetensors",
                 "trainer_state.safetensors", "optimizer.bin", "scheduler.bin"):
        assert (ckpt / name).is_file(), name
    # no temporary left; the state at the last step is kept so the run can be continued
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert method in (run / "README.md").read_text()

    # The exported file loads into the base pipeline with no missing/unused keys (diffusers warns on
    # those) and reproduces the trained UNet.
    pipe = load_pipeline_with_lora(run, sdxl=False)
    torch.testing.assert_close(unet_out(pipe.unet, False), unet_out(trainer.components.unet, False), rtol=1e-5, atol=1e-5)

    if method == "reflora":  # the on-demand kohya export of the same run goes through diffusers' kohya loader
        from reflora_diffusion.export.run import export_run

        kohya = export_run(run, format="kohya", output=tmp_path / "kohya")
        assert "lora_unet_" in next(iter(load_file(str(kohya))))
        pipe = load_pipeline_with_lora(kohya.parent, sdxl=False, weight_name=kohya.name)
        torch.testing.assert_close(unet_out(pipe.unet, False), unet_out(trainer.components.unet, False), rtol=1e-5, atol=1e-5)


def test_sdxl_with_both_text_encoders(tmp_path):
    run = tmp_path / "xl"
    trainer = train(run, pretrained_model_name_or_path="tiny-sdxl", method="reflora", max_train_steps=3,
                    train_text_encoder=True, lora_alpha=8, validation_steps=3, checkpointing_steps=10)
    assert trainer.components.sdxl and json.loads((run / "status.json").read_text())["state"] == "done"
    assert all(math.isfinite(v) for v in losses(run).values())
    # both text encoders were trained: B moved away from its zero init (SDXL reads the penultimate layer
    # of encoder 1, so its last layer gets no gradient, as in diffusers' SDXL script)
    for te in trainer.components.text_encoders:
        bs = [p for n, p in te.named_parameters() if "lora_B" in n and ".layers.0." in n]
        assert len(bs) == 4 and all(p.abs().max() > 0 for p in bs)
    pipe = load_pipeline_with_lora(run, sdxl=True)
    torch.testing.assert_close(unet_out(pipe.unet, True), unet_out(trainer.components.unet, True), rtol=1e-5, atol=1e-5)
    ids = trainer.components.tokenizers[1]([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for mine, theirs in zip(trainer.components.text_encoders, (pipe.text_encoder, pipe.text_encoder_2)):
        mine.eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids, output_hidden_states=True).hidden_states[-2],
                                       mine(ids, output_hidden_states=True).hidden_states[-2], rtol=1e-5, atol=1e-5)


def test_text_encoder_conv_and_loss_options(tmp_path):
    """Text-encoder LoRA, conv LoRA, v-prediction, min-SNR, noise offset, accumulation, cached latents."""
    run = tmp_path / "opts"
    trainer = train(run, method="reflora", train_text_encoder=True, lora_conv=True, prediction_type="v_prediction",
                    snr_gamma=5.0, noise_offset=0.05, gradient_accumulation_steps=2, train_batch_size=2,
                    cache_latents=True, validation_prompt=[], checkpointing_steps=10, text_encoder_lr=5e-5)
    assert trainer.components.noise_scheduler.config.prediction_type == "v_prediction"
    assert all(math.isfinite(v) for v in losses(run).values()) and len(losses(run)) == 4
    assert len(trainer.latent_cache) == 5 and len(trainer.text_cache) == 0  # text encoder trained: not cached
    conv = [n for n, _ in trainer.components.unet.named_modules() if n.endswith("resnets.0.conv1.lora_A.default")]
    assert conv, "conv layers were not adapted"
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(5e-5)
    pipe = load_pipeline_with_lora(run, sdxl=False)
    torch.testing.assert_close(unet_out(pipe.unet, False), unet_out(trainer.components.unet, False), rtol=1e-5, atol=1e-5)
    ids = trainer.components.tokenizers[0]([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    trainer.components.text_encoders[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], trainer.components.text_encoders[0](ids)[0], rtol=1e-5, atol=1e-5)


def test_prior_preservation_generates_missing_class_images(tmp_path):
    classes = tmp_path / "class"
    run = tmp_path / "pp"
    train(run, with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a photo of dog",
          num_class_images=2, max_train_steps=2, validation_prompt=[], checkpointing_steps=10, seed=None)
    assert isinstance(json.loads((run / "config.json").read_text())["seed"], int)  # the drawn seed is recorded
    made = sorted(classes.glob("*.png"))
    assert len(made) == 2 and all(Image.open(p).size == (64, 64) for p in made)
    assert len(losses(run)) == 2


# --- resume ----------------------------------------------------------------------------------------------
def test_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    opts = dict(method="reflora", max_train_steps=6, checkpointing_steps=3, train_batch_size=2,
                gradient_accumulation_steps=2, random_flip=True, validation_prompt=[])
    full = train(tmp_path / "full", **opts)

    original = SDTrainer._log_step

    def interrupt_after_step_5(self, *a, **k):
        original(self, *a, **k)
        if self.global_step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(SDTrainer, "_log_step", interrupt_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", **opts)
    assert json.loads((tmp_path / "cut" / "status.json").read_text())["state"] == "cancelled"
    monkeypatch.setattr(SDTrainer, "_log_step", original)

    resumed = train(tmp_path / "cut", resume_from_checkpoint="latest", **opts)
    # step 3 is mid-epoch (2 optimizer steps per epoch) and after the RefLoRA warm-up of 2 steps
    assert resumed.ref.step_count == full.ref.step_count == 6
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exact, step for step
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.ref.stats()["refactored"] == 32


def test_checkpoints_total_limit_and_logging_interval(tmp_path):
    train(tmp_path / "lim", max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2, validation_prompt=[],
          logging_steps=2)
    assert sorted(p.name for p in (tmp_path / "lim" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert list(losses(tmp_path / "lim")) == [2, 4, 5]  # every 2nd step, and the last one


# --- NaN handling ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")  # the skipped step is the 1st
def test_nan_loss_steps_are_skipped_then_training_stops(tmp_path, monkeypatch):
    from reflora_diffusion.sd.train import TrainingError

    original = SDTrainer.loss
    calls = {"n": 0}

    def nan_on_second_call(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(SDTrainer, "loss", nan_on_second_call)
    trainer = make_trainer(tmp_path / "once", validation_prompt=[], checkpointing_steps=10)
    before = {n: p.detach().clone() for n, p in trainer.components.unet.named_parameters() if p.requires_grad}
    trainer.train()
    events = [e for e in read_events(tmp_path / "once") if "loss" in e]
    assert events[1]["loss"] is None and events[1]["skipped"] is True and events[-1]["skipped_steps"] == 1
    assert trainer.ref.step_count == 3  # 4 steps, one skipped: the optimizer (and the core) ran 3 times
    assert any(not torch.equal(before[n], p) for n, p in trainer.components.unet.named_parameters() if p.requires_grad)

    monkeypatch.setattr(SDTrainer, "loss", lambda self, batch: original(self, batch) * float("inf"))
    with pytest.raises(TrainingError, match="NaN/inf for 3 steps in a row"):
        train(tmp_path / "always", max_bad_steps=3, max_train_steps=10, validation_prompt=[], checkpointing_steps=10)
    status = json.loads((tmp_path / "always" / "status.json").read_text())
    assert status["state"] == "failed" and "NaN/inf" in status["error"]


# --- bad input through the command line ------------------------------------------------------------------
def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    common = ["--pretrained_model_name_or_path", "tiny", "--resolution", "64", "--max_train_steps", "1",
              "--output_dir", str(tmp_path / "out")]
    dog = ["--instance_data_dir", str(DOG), "--instance_prompt", PROMPT]
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.jpg").write_bytes(b"\xff\xd8 broken")
    cases = [
        (["--instance_data_dir", str(tmp_path / "empty"), "--instance_prompt", PROMPT], "holds no images"),
        (["--instance_data_dir", str(tmp_path / "nope"), "--instance_prompt", PROMPT], "does not exist"),
        (["--instance_data_dir", str(tmp_path / "corrupt"), "--instance_prompt", PROMPT], "unreadable: x.jpg"),
        (["--instance_data_dir", str(DOG)], "--instance_prompt is required"),
        (dog + ["--rank", "64"], r"--rank 64 is larger than UNet layer .* allows \(min\(d_in, d_out\) = 32\)"),
        (dog + ["--target_modules", "to_q", "attn_foo"], "target module 'attn_foo' matches no layer of the UNet"),
        (dog + ["--target_modules", "attn1"], "rather than a Linear/Conv2d layer"),
        (dog + ["--resume_from_checkpoint", str(tmp_path / "missing")], "--resume_from_checkpoint .* does not exist"),
        (dog + ["--method", "reflora", "--loraplus_lr_ratio", "4"], "--method reflora: unknown option --loraplus_lr_ratio \\(an option of lora\+\)"),
        (dog + ["--optimizer", "adamq"], "--optimizer 'adamq' is unknown"),
    ]
    for args, expected in cases:
        with pytest.warns(UserWarning) if "corrupt" in args[1] else _nothing():
            code, err = run_cli(common + args, capsys)
        assert code == 2, (args, err)
        assert err.startswith("error: "), err
        assert __import__("re").search(expected, err), (expected, err)
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"]


def test_sigterm_ends_the_run_as_cancelled(tmp_path):
    """What the app's cancel button does: SIGTERM to the trainer process."""
    import os
    import signal
    import time

    run = tmp_path / "term"
    cmd = [sys.executable, str(REPO / "train" / "sd.py"), "--pretrained_model_name_or_path", "tiny",
           "--instance_data_dir", str(DOG), "--instance_prompt", PROMPT, "--resolution", "64",
           "--max_train_steps", "1000", "--output_dir", str(run)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "events.jsonl").is_file():
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "cancelled" and 1 <= status["step"] < 1000 and status["pid"] == proc.pid


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_other_torch_optimizer_and_method_options(tmp_path):
    trainer = train(tmp_path / "sgd", method="lora+", loraplus_lr_ratio=4, optimizer="SGD", learning_rate=1e-2,
                    max_train_steps=2, validation_prompt=[], checkpointing_steps=10)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == pytest.approx([1e-2, 4e-2])  # LoRA+: B learns ratio times faster


def test_bf16_keeps_lora_weights_in_fp32(tmp_path):
    trainer = train(tmp_path / "bf16", mixed_precision="bf16", gradient_checkpointing=True, method="reflora",
                    max_train_steps=3, refactor_warmup_steps=1, validation_prompt=[], checkpointing_steps=10)
    dtypes = {p.dtype for p in trainer.components.unet.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.components.unet.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    assert all(math.isfinite(v) for v in losses(tmp_path / "bf16").values())
    assert trainer.ref.stats()["refactored"] == 32  # the core's r x r algebra runs on the fp32 factors


# --- distributed -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo DDP on CPU), batch 1 per process, equals
    one process with batch 2: same samples, same noise, all-reduced gradients."""
    data = tmp_path / "dog4"
    data.mkdir()
    for p in sorted(DOG.glob("*.jpg"))[:4]:  # 4 images: every global batch of 2 is full
        shutil.copy(p, data / p.name)
    opts = dict(instance_data_dir=str(data), method="reflora", max_train_steps=4, validation_prompt=[],
                checkpointing_steps=10, random_flip=True)
    single = train(tmp_path / "one", train_batch_size=2, **opts)
    args = [f"--{k}={v}" if not isinstance(v, bool) else f"--{k}" for k, v in {**BASE, **opts}.items()
            if v not in ([], None)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "train" / "sd.py"), *args, "--train_batch_size=1", f"--output_dir={tmp_path / 'two'}"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    a = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-6)
    assert single.ref.stats()["refactored"] == 32


def test_reinit_refactors_from_the_first_step_and_exports_exactly(tmp_path):
    run = tmp_path / "reinit"
    trainer = train(run, method="reflora", refactor_warmup_steps=0, reinit=True, reflora_normalize=True)
    steps = [e for e in read_events(run) if "loss" in e]
    assert steps[0]["refactor"]["refactored"] == steps[0]["refactor"]["layers"]  # no warm-up needed
    # the export (rank 2r: the compensated init A0, -B0 plus the trained pair) reproduces the trained UNet
    pipe = load_pipeline_with_lora(run, sdxl=False)
    torch.testing.assert_close(unet_out(pipe.unet, False), unet_out(trainer.components.unet, False), rtol=1e-5, atol=1e-5)
