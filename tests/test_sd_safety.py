"""Nothing a user owns is lost and every bad input is one line (issue 23): --overwrite_output_dir on folders
holding the user's files, checkpoint limits, a full disk, image modes, config-file types, caption sidecars,
resumes with other options, kohya repeats, buckets on every family."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from reflora_diffusion.sd.config import make_config
from reflora_diffusion.sd.data import DataError, build_dataset, load_resized, read_captions, to_rgb, train_folders
from sd_helpers import BASE, DOG, PROMPT, run_cli, train

FAST = dict(validation_prompt=[], checkpointing_steps=1000, max_train_steps=2)
CLI = ["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(DOG), "--instance_prompt", PROMPT,
       "--resolution", "64", "--max_train_steps", "2", "--checkpointing_steps", "1000", "--seed", "0"]


def write_png48(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): signature, IHDR, one IDAT, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- data lost ---------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_folder_holding_the_users_files_and_touches_nothing(tmp_path, capsys):
    mine = tmp_path / "project"
    for sub in ("samples", "logs", "checkpoints"):
        (mine / sub).mkdir(parents=True)
        (mine / sub / "keep.png").write_bytes(b"user data " + sub.encode())
    (mine / "README.md").write_text("my project")
    before = snapshot(mine)
    code, err = run_cli(CLI + ["--output_dir", str(mine), "--overwrite_output_dir"], capsys)
    assert code == 2 and err.startswith("error: --overwrite_output_dir") and "\n" not in err
    assert "'README.md', which no run of this trainer wrote" in err and "move that out" in err
    assert snapshot(mine) == before
    # without the flag: refused too, and the message no longer suggests the flag that would delete them
    code, err = run_cli(CLI + ["--output_dir", str(mine)], capsys)
    assert code == 2 and "holds no run of this trainer" in err and "--overwrite_output_dir" not in err
    assert snapshot(mine) == before


def test_overwrite_replaces_only_our_run_and_names_a_users_file_inside_it(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, **{**FAST, "checkpointing_steps": 1, "validation_prompt": [PROMPT], "validation_steps": 1,
                  "num_validation_images": 1, "validation_inference_steps": 1})
    assert (run / "samples" / "step_1" / "0.png").is_file() and (run / "checkpoints" / "checkpoint-1").is_dir()
    (run / "samples" / "favourite.png").write_bytes(b"the user's pick")
    before = snapshot(run)
    code, err = run_cli(CLI + ["--output_dir", str(run), "--overwrite_output_dir", "--rank", "8"], capsys)
    assert code == 2 and "'samples/favourite.png', which no run of this trainer wrote" in err
    assert snapshot(run) == before
    # what the app keeps in its run folders (uploads, its log) is neither foreign nor removed
    (run / "samples" / "favourite.png").unlink()
    (run / "data").mkdir()
    (run / "data" / "upload.jpg").write_bytes(b"uploaded")
    (run / "train.log").write_text("$ accelerate launch ...\n")
    code, err = run_cli(CLI + ["--output_dir", str(run), "--overwrite_output_dir", "--rank", "8"], capsys)
    assert code == 0, err
    assert (run / "data" / "upload.jpg").read_bytes() == b"uploaded" and (run / "train.log").is_file()
    assert not (run / "samples").exists() and not (run / "checkpoints" / "checkpoint-1").exists()
    assert json.loads((run / "config.json").read_text())["rank"] == 8


@pytest.mark.parametrize("flag,value,message", [
    ("--lora_alpha", "0", "--lora_alpha must be > 0 (got 0.0): with alpha 0 the LoRA has no effect and learns nothing; "
                          "leave it out for alpha = rank"),
    ("--lora_alpha", "-4", "--lora_alpha must be > 0 (got -4.0): with alpha 0 the LoRA has no effect and learns "
                           "nothing; leave it out for alpha = rank"),
    ("--snr_gamma", "0", "--snr_gamma must be > 0 (got 0.0): gamma 0 weighs every step's loss by 0; leave it out to "
                         "turn min-SNR weighting off")])
def test_values_that_would_train_nothing_are_refused(tmp_path, capsys, flag, value, message):
    code, err = run_cli(CLI + ["--output_dir", str(tmp_path / "o"), flag, value], capsys)
    assert code == 2 and err == f"error: {message}"
    assert not (tmp_path / "o").exists()


def test_checkpoint_limits_below_one_are_refused(tmp_path, capsys):
    for value in ("-1", "0"):
        code, err = run_cli(CLI + ["--output_dir", str(tmp_path / "o"), "--checkpoints_total_limit", value], capsys)
        assert code == 2 and err == (f"error: --checkpoints_total_limit must be >= 1 (got {value}); leave it out to "
                                     "keep every checkpoint")
    assert not (tmp_path / "o").exists()


def test_a_full_disk_is_one_line_and_leaves_no_half_checkpoint(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if ".checkpoint-" in str(filename):
            Path(filename).write_bytes(b"\0" * 10)  # the disk filled up midway
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    run = tmp_path / "run"
    code, err = run_cli(CLI + ["--output_dir", str(run), "--checkpointing_steps", "1"], capsys)
    assert code == 2 and err.startswith("error: no space left on the disk of") and "checkpoint-1 (removed)" in err
    assert "--resume_from_checkpoint latest" in err
    assert not list(run.rglob("*.tmp")) and not (run / "checkpoints" / "checkpoint-1").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


# --- silent wrong results ----------------------------------------------------------------------------------
def test_every_pil_mode_becomes_the_right_8bit_rgb(tmp_path):
    ramp16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    expect16 = np.rint(ramp16 / 257.0)
    cases = {
        "I;16": (Image.fromarray(ramp16, "I;16"), expect16),
        "I": (Image.fromarray(ramp16.astype(np.int32), "I"), expect16),
        "I 8-bit range": (Image.fromarray((ramp16 // 257).astype(np.int32), "I"), ramp16 // 257),
        "F 0..1": (Image.fromarray((ramp16 / 65535.0).astype(np.float32), "F"), expect16),
        "1": (Image.fromarray(ramp16 > 30000), ((ramp16 > 30000) * 255)),
    }
    for name, (im, want) in cases.items():
        rgb = np.asarray(to_rgb(im)).astype(float)
        assert rgb.shape == (64, 64, 3), name
        assert np.abs(rgb - np.asarray(want, dtype=float)[..., None]).max() <= 1, name
    # transparency is laid on white; palette, CMYK keep their colours
    la = Image.fromarray(np.stack([np.full((4, 4), 0, np.uint8), np.array([[0, 255] * 2] * 4, np.uint8)], -1), "LA")
    assert np.asarray(to_rgb(la))[0, :, 0].tolist() == [255, 0, 255, 0]
    p = Image.new("P", (4, 4))
    p.putpalette([10, 200, 30] + [0] * 765)
    assert np.asarray(to_rgb(p))[0, 0].tolist() == [10, 200, 30]
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(p))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    # a 16-bit grayscale PNG and a 16-bit RGB PNG as the trainer loads them: not white
    Image.fromarray(ramp16, "I;16").save(tmp_path / "gray16.png")
    rgb48 = np.stack([ramp16, ramp16 // 2, ramp16 // 4], -1)
    write_png48(tmp_path / "rgb48.png", rgb48)
    for name, want in (("gray16.png", expect16.mean()), ("rgb48.png", np.rint(rgb48 / 257.0).mean())):
        im = np.asarray(load_resized(tmp_path / name, 64)[0]).astype(float)
        assert abs(im.mean() - want) < 2 and (im >= 254).mean() < 0.05, (name, im.mean(), want)


def test_config_file_values_must_have_the_options_type(tmp_path, capsys):
    out = str(tmp_path / "o")
    for text, expected in (("rank: true", "option 'rank' expects an integer, got True"),
                           ("learning_rate: yes", "option 'learning_rate' expects a number, got True"),
                           ("instance_prompt: [a, b]", "option 'instance_prompt' expects a string, got ['a', 'b']"),
                           ("mixed_precision: no\nrank: 2.5", "option 'rank' expects an integer, got 2.5")):
        path = tmp_path / "job.yaml"
        path.write_text(f"pretrained_model_name_or_path: tiny\ninstance_data_dir: {DOG}\n"
                        f"instance_prompt: dog\noutput_dir: {out}\n{text}\n")
        code, err = run_cli(["--config", str(path)], capsys)
        assert code == 2 and err == f"error: {expected}", err
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    code, err = run_cli(["--config", str(tmp_path / "binary.yaml")], capsys)
    assert code == 2 and "is not UTF-8 text; give a JSON or YAML file" in err
    assert not Path(out).exists()
    # a flag list from YAML still works
    cfg = make_config({**BASE, "output_dir": out, **yaml.safe_load("target_modules: [to_q, to_v]\nseed: 3")})
    assert cfg.target_modules == ["to_q", "to_v"] and cfg.seed == 3


def test_empty_sidecars_keep_the_folder_caption_with_one_warning_and_binary_ones_are_one_line(tmp_path):
    folder = tmp_path / "10_sks dog"
    folder.mkdir()
    photos = sorted(DOG.glob("*.jpg"))[:3]
    for p in photos:
        shutil.copy(p, folder / p.name)
    (folder / photos[0].with_suffix(".txt").name).write_text("  \n")
    (folder / photos[1].with_suffix(".caption").name).write_text("")
    (folder / photos[2].with_suffix(".txt").name).write_text("sks dog on grass")
    images = sorted(folder.glob("*.jpg"))
    with pytest.warns(UserWarning) as record:
        captions = read_captions(folder, images, "file_name", "text", default="sks dog")
    assert captions == ["sks dog", "sks dog", "sks dog on grass"]
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and f"2 empty caption file(s) (first: {photos[0].stem}.txt)" in messages[0]
    # no folder caption to fall back on: the error names the empty file
    with pytest.raises(DataError, match=r"no caption for .* \(its .*\.txt is empty\)"):
        read_captions(folder, images, "file_name", "text")
    (folder / photos[2].with_suffix(".txt").name).write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(DataError, match=r"caption file .*\.txt' is not UTF-8 text; save it as UTF-8 or remove it"):
        read_captions(folder, images, "file_name", "text", default="sks dog")


def test_resume_with_other_options_is_recorded_and_a_structural_change_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, **{**FAST, "max_train_steps": 4, "checkpointing_steps": 2})
    # another rank or method: refused before anything is written (config and status stay the finished run's)
    before = snapshot(run)
    for flag, value in (("--rank", "8"), ("--method", "reflora")):
        code, err = run_cli(["--config", str(run / "config.json"), flag, value, "--resume_from_checkpoint", "latest",
                             "--max_train_steps", "6"], capsys)
        assert code == 2 and f"was trained with {flag} " in err and f"resume with the same {flag}" in err, err
        assert snapshot(run) == before
    # another learning rate and prompt: the run goes on and says so in config.json and the model card
    code, err = run_cli(["--config", str(run / "config.json"), "--learning_rate", "0.001", "--instance_prompt",
                         "a photo of zwx dog", "--resume_from_checkpoint", "latest", "--max_train_steps", "6"], capsys)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["changed_on_resume"] == [{"step": 4, "instance_prompt": [PROMPT, "a photo of zwx dog"],
                                            "learning_rate": [0.0001, 0.001]}]
    card = (run / "README.md").read_text()
    assert "## Resumed with changed options" in card and "from step 4: `instance_prompt`" in card
    assert "`learning_rate` 0.0001 -> 0.001" in card
    # a resume with nothing left to train is one line and touches nothing
    before = snapshot(run)
    code, err = run_cli(["--config", str(run / "config.json"), "--resume_from_checkpoint", "latest"], capsys)
    assert code == 2 and "checkpoint-6 is already at step 6 of 6; pass a larger --max_train_steps" in err, err
    assert snapshot(run) == before
    # a resume that changes nothing keeps the record and adds none; the seed is the run's own when not given
    args = ["--config", str(run / "config.json"), "--resume_from_checkpoint", "latest", "--max_train_steps", "7"]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["changed_on_resume"] == config["changed_on_resume"]


def test_unusable_data_fails_before_the_run_folder_is_written(tmp_path, capsys):
    dots = tmp_path / "dots"
    dots.mkdir()
    for i in range(3):
        Image.new("RGB", (1, 1), "red").save(dots / f"{i}.png")
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        code, err = run_cli(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(dots),
                             "--instance_prompt", PROMPT, "--output_dir", str(out)], capsys)
    assert code == 2 and "no usable image left" in err and not out.exists()


# --- one line instead of a traceback -----------------------------------------------------------------------
def test_flags_and_values_that_used_to_be_tracebacks(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "o")]
    cases = [
        (["--learnig_rate", "1e-3"], "unknown option --learnig_rate (did you mean --learning_rate?)"),
        (CLI + out + ["--adam_beta1", "5"], "--adam_beta1 must be in [0, 1) (got 5.0)"),
        (CLI[:-2] + out + ["--seed", "-5"], "--seed must be in [0, 2**32) (got -5)"),
        (CLI[:-2] + out + ["--seed", str(2**32)], "--seed must be in [0, 2**32) (got 4294967296)"),
    ]
    for args, expected in cases:
        code, err = run_cli(args, capsys)
        assert code == 2 and err.startswith("error: ") and expected in err, (args, err)
    broken = tmp_path / "base"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    code, err = run_cli(["--pretrained_model_name_or_path", str(broken), *CLI[2:], *out], capsys)
    assert code == 2 and err.startswith(f"error: cannot load base model {str(broken)!r}") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_kohya_repeats_cost_nothing_and_absurd_counts_are_one_line(tmp_path):
    root = tmp_path / "train"
    (root / "5000_sks dog").mkdir(parents=True)
    for p in sorted(DOG.glob("*.jpg"))[:2]:
        shutil.copy(p, root / "5000_sks dog" / p.name)
    cfg = make_config({**BASE, "instance_data_dir": None, "instance_prompt": None, "train_data_dir": str(root),
                       "output_dir": str(tmp_path / "o")})
    data = build_dataset(cfg)
    assert len(data) == 10_000 and len(data.instances) == 2  # decoded once, repeated by index
    assert data[(0, 9_999)]["prompt"] == "sks dog" and data[(0, 1)]["index"] == 1
    for name in ("50000000_dog", "1" * 22 + "_dog"):
        (root / "5000_sks dog").rename(root / name)
        with pytest.raises(DataError, match=rf"subfolder '{name}' repeats its images more than 10,000 times"):
            train_folders(root)
        (root / name).rename(root / "5000_sks dog")


# --- buckets on every family -------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-zimage", "tiny-qwenimage"])
def test_buckets_train_on_the_flow_families(tmp_path, preset, caplog):
    from test_sd_buckets import mixed_folder

    folder = mixed_folder(tmp_path / "mixed")
    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        trainer = train(run, pretrained_model_name_or_path=preset, instance_data_dir=str(folder), enable_bucket=True,
                        resolution=None, **FAST)
    cfg = trainer.cfg
    assert cfg.bucket_reso_steps % 16 == 0 and cfg.min_bucket_reso < cfg.resolution < cfg.max_bucket_reso
    line = next(r.getMessage() for r in caplog.records if "aspect-ratio buckets" in r.getMessage())
    assert "3 in use" in line
    assert (run / "pytorch_lora_weights.safetensors").is_file()


def test_default_buckets_follow_the_resolution(tmp_path, caplog):
    from test_sd_buckets import mixed_folder

    folder = mixed_folder(tmp_path / "mixed")
    cfg = make_config({**BASE, "instance_data_dir": str(folder), "enable_bucket": True,
                       "output_dir": str(tmp_path / "o")})
    assert cfg.min_bucket_reso is None  # filled in once the base model's resolution is known
    cfg.resolve_buckets(8)
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps) == (32, 128, 16)
    with caplog.at_level("INFO"):
        data = build_dataset(cfg)
    assert len(set(data.targets())) == 3  # landscape, portrait and square: not one square bucket
    assert any("aspect-ratio buckets (sides 32..128, step 16): 3 in use" in r.getMessage() for r in caplog.records)
    # a model whose latents need multiples of 64 rounds the step up, and a bad explicit step is one line
    cfg = make_config({**BASE, "instance_data_dir": str(folder), "enable_bucket": True, "resolution": 512,
                       "output_dir": str(tmp_path / "o")})
    cfg.resolve_buckets(64)
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps) == (256, 1024, 64)
    cfg = make_config({**BASE, "enable_bucket": True, "bucket_reso_steps": 8, "output_dir": str(tmp_path / "o")})
    with pytest.raises(Exception, match="--bucket_reso_steps 8 does not suit this model: .* multiples of 16"):
        cfg.resolve_buckets(16)


def test_the_refactoring_warm_up_follows_the_run_length(tmp_path):
    from sd_helpers import make_trainer

    base = {**FAST, "method": "reflora", "refactor_warmup_steps": None}
    for steps, warmup in ((30, 3), (600, 60), (5000, 100)):
        trainer = make_trainer(tmp_path / f"r{steps}", **{**base, "max_train_steps": steps})
        assert trainer.cfg.refactor_warmup_steps == warmup and trainer.ref.warmup_steps == warmup
        assert json.loads((tmp_path / f"r{steps}" / "config.json").read_text())["refactor_warmup_steps"] == warmup
