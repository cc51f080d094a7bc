"""SD trainer: options (config.py) and training images (data.py). Fast; no model is loaded."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reflora_diffusion.sd.config import ConfigError, make_config, parse_args
from reflora_diffusion.sd.data import (Crop, DataError, EpochSampler, ImageCaptionSet, TrainDataset, build_dataset,
                                       check_data_dirs, collate, load_class_images)

REPO = Path(__file__).resolve().parents[1]
DOG = (REPO / ".." / "shared" / "data" / "dreambooth" / "dog").resolve()
BASE = ["--pretrained_model_name_or_path", "tiny", "--output_dir", "/tmp/unused"]


def dog_copy(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(DOG.glob("*.jpg"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


# --- config ----------------------------------------------------------------------------------------------
def test_cli_flags_override_config_file(tmp_path):
    (tmp_path / "job.yaml").write_text("rank: 16\nmethod: reflora\ninstance_data_dir: photos\n"
                                       "instance_prompt: a photo of sks dog\nlearning_rate: 2e-4\n"
                                       "target_modules: to_q,to_v\n")
    cfg = parse_args(BASE + ["--config", str(tmp_path / "job.yaml"), "--rank", "8", "--random_flip"])
    assert cfg.rank == 8 and cfg.method == "reflora" and cfg.learning_rate == 2e-4
    assert cfg.target_modules == ["to_q", "to_v"] and cfg.random_flip is True
    # the resolved config written to a run folder reproduces itself
    cfg.save(tmp_path / "run" / "config.json")
    again = parse_args(["--config", str(tmp_path / "run" / "config.json")])
    assert again == cfg


def test_config_errors_are_one_line_and_name_the_option(tmp_path):
    cases = [
        (BASE + ["--instance_data_dir", "x"], "--instance_prompt is required"),
        (BASE, "no training data"),
        (BASE + ["--train_data_dir", "x", "--rank", "0"], "--rank must be >= 1"),
        (BASE + ["--train_data_dir", "x", "--rank", "four"], "argument --rank: invalid int value: 'four'"),
        (BASE + ["--train_data_dir", "x", "--method", "nope"], "--method 'nope' is unknown"),
        (BASE + ["--train_data_dir", "x", "--with_prior_preservation"], "needs DreamBooth data"),
        (BASE + ["--train_data_dir", "x", "--resolution", "60"], "multiple of 8"),
        (BASE + ["--train_data_dir", "x", "--lr_scheduler", "cosine2"], "--lr_scheduler 'cosine2' is unknown"),
    ]
    for argv, expected in cases:
        with pytest.raises(ConfigError, match=expected) as e:
            parse_args(argv)
        assert "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text(json.dumps({"rnak": 4}))
    with pytest.raises(ConfigError, match="unknown option.*rnak"):
        parse_args(["--config", str(tmp_path / "bad.json")])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_method_options_and_conv_targets():
    cfg = make_config({"pretrained_model_name_or_path": "tiny", "output_dir": "o", "train_data_dir": "d",
                       "method": "lora+", "loraplus_lr_ratio": 16, "lora_conv": True, "lora_alpha": 8, "rank": 4})
    assert cfg.method_options() == {"warmup_steps": None, "interval": 1, "ratio": 16.0}  # None: min(100, 10 % of the run)
    assert cfg.unet_targets == ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut"]
    assert cfg.alpha == 8.0


# --- folders ---------------------------------------------------------------------------------------------
def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageCaptionSet.from_folder(tmp_path / "nope", 64, prompt="p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ImageCaptionSet.from_folder(tmp_path / "empty", 64, prompt="p")


def test_non_image_and_corrupt_files_are_skipped_and_named(tmp_path):
    folder = dog_copy(tmp_path / "dog", 2)
    (folder / "notes.pdf").write_bytes(b"%PDF")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    with open(DOG / "00.jpg", "rb") as f:  # a truncated JPEG: opens, fails to decode
        (folder / "cut.jpg").write_bytes(f.read()[:2000])
    with pytest.warns(UserWarning) as record:
        s = ImageCaptionSet.from_folder(folder, 64, prompt="a photo of sks dog")
    text = " ".join(str(w.message) for w in record)
    assert "notes.pdf" in text and "broken.jpg" in text and "cut.jpg" in text
    assert [p.name for p in s.paths] == ["00.jpg", "01.jpg"]
    assert all(min(im.size) == 64 for im in s.images)
    assert s.sizes[0] == Image.open(DOG / "00.jpg").size[::-1]  # original (h, w) for SDXL conditioning


def test_only_corrupt_images_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"no usable image left \(unreadable: a.png\)"), pytest.warns(UserWarning):
        ImageCaptionSet.from_folder(tmp_path, 64, prompt="p")


def test_captions_from_metadata_jsonl_and_txt(tmp_path):
    folder = dog_copy(tmp_path / "cap", 3)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "00.jpg", "text": "a dog on grass"}) + "\n"
                                           + json.dumps({"file_name": "01.jpg", "text": "a dog indoors"}) + "\n")
    (folder / "02.txt").write_text("a dog from a txt file\n")
    s = ImageCaptionSet.from_folder(folder, 64, captions=True)
    assert s.prompts == ["a dog on grass", "a dog indoors", "a dog from a txt file"]
    (folder / "02.txt").unlink()
    with pytest.raises(DataError, match="no caption for .*02.jpg"):
        ImageCaptionSet.from_folder(folder, 64, captions=True)
    # the instance prompt is the fallback caption; other column names are configurable
    assert ImageCaptionSet.from_folder(folder, 64, captions=True, prompt="sks").prompts[2] == "sks"
    (folder / "metadata.jsonl").write_text(json.dumps({"image": "00.jpg", "caption": "custom"}) + "\n")
    s = ImageCaptionSet.from_folder(folder, 64, captions=True, prompt="sks", image_column="image",
                                    caption_column="caption")
    assert s.prompts[0] == "custom"
    with pytest.raises(DataError, match="lacks column"):
        ImageCaptionSet.from_folder(folder, 64, captions=True, prompt="sks")


def test_imagefolder_metadata_naming_files_in_a_subfolder(tmp_path):
    """datasets' imagefolder layout: metadata.jsonl beside an images/ folder it names files in."""
    folder = tmp_path / "set"
    dog_copy(folder / "images", 2)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "images/00.jpg", "text": "first dog"}) + "\n"
                                           + json.dumps({"file_name": "images/01.jpg", "text": "second dog"}) + "\n")
    cfg = make_config({"pretrained_model_name_or_path": "tiny", "output_dir": str(tmp_path / "o"), "seed": 0,
                       "train_data_dir": str(folder), "resolution": 64})
    check_data_dirs(cfg)
    data = build_dataset(cfg)
    assert [p.relative_to(folder).as_posix() for p in data.instances.paths] == ["images/00.jpg", "images/01.jpg"]
    assert data.instances.prompts == ["first dog", "second dog"]


# --- augmentation and order ------------------------------------------------------------------------------
def test_crop_and_flip_depend_only_on_seed_epoch_index():
    image = ImageCaptionSet.from_folder(DOG, 64, prompt="p").images[0]
    image = image.resize((96, 64))  # landscape: random crops move horizontally
    crop = Crop(64, center_crop=False, random_flip=True, seed=3)
    a, _ = crop(image, epoch=1, index=2)
    b, _ = crop(image, epoch=1, index=2)
    assert torch.equal(a, b)
    assert a.shape == (3, 64, 64) and -1 <= a.min() and a.max() <= 1
    # a crop is a window of the image (possibly mirrored)
    full = torch.from_numpy(np.array(image)).float().permute(2, 0, 1) / 127.5 - 1
    seen_flip = seen_plain = False
    for epoch in range(12):
        x, (top, left) = crop(image, epoch, 0)
        window = full[:, top:top + 64, left:left + 64]
        if torch.allclose(x, window, atol=1e-6):
            seen_plain = True
        elif torch.allclose(x, window.flip(-1), atol=1e-6):
            seen_flip = True
        else:
            raise AssertionError("crop is not a window of the image")
    assert seen_flip and seen_plain
    x, (top, left) = Crop(64, True, False, 0)(image, 0, 0)
    assert (top, left) == (0, 16)


def test_epoch_sampler_is_a_seeded_permutation():
    s = EpochSampler(7, seed=5)
    first = list(s)
    assert sorted(i for _, i in first) == list(range(7)) and {e for e, _ in first} == {0}
    s.set_epoch(1)
    second = list(s)
    assert [i for _, i in second] != [i for _, i in first] and {e for e, _ in second} == {1}
    s.set_epoch(0)
    assert list(s) == first


def test_prior_preservation_batch_puts_class_half_second(tmp_path):
    cfg = make_config({"pretrained_model_name_or_path": "tiny", "output_dir": str(tmp_path / "o"),
                       "instance_data_dir": str(dog_copy(tmp_path / "inst", 2)), "instance_prompt": "sks dog",
                       "with_prior_preservation": True, "class_data_dir": str(dog_copy(tmp_path / "cls", 3)),
                       "class_prompt": "a dog", "num_class_images": 3, "resolution": 64})
    ds = build_dataset(cfg)
    ds.classes = load_class_images(cfg)  # (the trainer first generates missing class images)
    assert isinstance(ds, TrainDataset) and len(ds) == 3  # max(instances, class images)
    batch = collate([ds[(0, 0)], ds[(0, 2)]])
    assert batch["prompts"] == ["sks dog", "sks dog", "a dog", "a dog"]
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["index"].tolist() == [0, 2]
