"""Aspect-ratio buckets, kohya folders and caption augmentation (issue 12, data): buckets.py and data.py,
then short runs of the tiny presets at 64 px with buckets of 32..128 px in steps of 16."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from reflora_diffusion.sd.buckets import Buckets, default_bucket_options
from reflora_diffusion.sd.data import bucket_counts
from reflora_diffusion.sd.config import ConfigError, make_config
from reflora_diffusion.sd.data import (BucketBatchSampler, CaptionAugment, DataError, ImageCaptionSet, build_dataset,
                                       check_data_dirs, collate)
from reflora_diffusion.families.sdxl import time_ids as sdxl_time_ids
from reflora_diffusion.sd.train import SDTrainer
from sd_helpers import DOG, losses, make_trainer, train

SMALL = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
SHAPES = ((96, 64), (64, 96), (64, 64))  # (w, h): landscape, portrait, square


def mixed_folder(folder: Path, copies: int = 1) -> Path:
    """Non-square (and square) crops of the DreamBooth dog photos, resized to SHAPES."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(DOG.glob("*.jpg"))
    for c in range(copies):
        for k, (w, h) in enumerate(SHAPES):
            im = Image.open(photos[(c * len(SHAPES) + k) % len(photos)]).convert("RGB")
            side = min(im.size)
            im = im.crop((0, 0, side, side * h // w) if w >= h else (0, 0, side * w // h, side))
            im.resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{c}_{w}x{h}.png")
    return folder


# --- buckets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [Buckets(64, 32, 128, 16), Buckets(1024), Buckets(512, 256, 1024, 64)])
def test_bucket_sizes_follow_kohyas_rule(spec):
    sizes, step, area = spec.sizes, spec.step, spec.resolution ** 2
    assert len(set(sizes)) == len(sizes) and sizes == sorted(sizes)
    side = spec.resolution // step * step
    assert (side, side) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0 and w * h <= area and (h, w) in sizes
        if (w, h) != (side, side):
            assert spec.min_reso <= min(w, h) and max(w, h) <= spec.max_reso
            # the tallest height within the area and max_reso, for this width (or the transpose)
            taller, wider = (w, h + step), (w + step, h)
            assert any(a * b > area or max(a, b) > spec.max_reso for a, b in (taller, wider))
    # every width in range whose tallest height reaches min_reso has its bucket
    for w in range(spec.min_reso, spec.max_reso + 1, step):
        h = min(spec.max_reso, area // w // step * step)
        assert (h < spec.min_reso) or (w, h) in sizes


def test_small_buckets_and_nearest_ratio():
    spec = Buckets(**{"resolution": 64, "min_reso": 32, "max_reso": 128, "step": 16})
    assert spec.sizes == [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32),
                          (128, 32)]
    assert spec.select(96, 64) == (80, 48)  # ratio 1.5: 80/48 = 1.67 is nearest
    assert spec.select(64, 96) == (48, 80)
    assert spec.select(780, 780) == spec.select(40, 40) == (64, 64)  # enlarged to the square bucket
    assert spec.select(300, 100) == (96, 32)  # ratio 3
    # no upscaling: fewer pixels than 64^2 keep their own size, rounded down to the step
    small = Buckets(64, 32, 128, 16, no_upscale=True)
    assert small.select(50, 40) == (48, 32) and small.select(40, 40) == (32, 32) and small.select(64, 64) == (64, 64)
    assert small.select(10, 300) == (16, 128)  # at least one step, at most max_reso
    assert small.select(96, 64) == (80, 48)  # more pixels than 64^2: the predefined buckets as usual


def test_images_train_at_their_bucket(tmp_path):
    folder = mixed_folder(tmp_path / "mixed")
    paths = sorted(folder.glob("*.png"))
    spec = Buckets(64, 32, 128, 16)
    s = ImageCaptionSet.from_folder(folder, 64, prompt="p", buckets=spec)
    want = {"0_96x64.png": (80, 48), "0_64x96.png": (48, 80), "0_64x64.png": (64, 64)}
    assert {p.name: t for p, t in zip(s.paths, s.targets)} == want
    for p, im, (w, h), (oh, ow) in zip(s.paths, s.images, s.targets, s.sizes):
        assert im.size[0] >= w and im.size[1] >= h and (im.size[0] == w or im.size[1] == h)  # just covers it
        assert Image.open(p).size == (ow, oh)
    assert bucket_counts(paths, 64, 32, 128, 16) == {(48, 80): 1, (64, 64): 1, (80, 48): 1}
    assert bucket_counts([(96, 64), (192, 128), (64, 64)], 64, **default_bucket_options(64)) == {(64, 64): 1,
                                                                                                 (80, 48): 2}
    assert default_bucket_options(64) == {"min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16}
    assert default_bucket_options(512) == {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}
    from reflora_diffusion.app.views import bucket_summary  # the app's upload form shows the same counts

    assert bucket_summary([str(p) for p in paths], 64, True) == \
        "Aspect-ratio buckets (width x height: images): 48x80: 1, 64x64: 1, 80x48: 1"
    assert bucket_summary([str(p) for p in paths], 64, False) == ""
    # --bucket_no_upscale: a small photo trains at its own size (rounded down), not enlarged (and not warned about)
    small = tmp_path / "small"
    small.mkdir()
    Image.open(paths[0]).resize((40, 36)).save(small / "small.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ImageCaptionSet.from_folder(small, 64, prompt="p", buckets=Buckets(64, 32, 128, 16, no_upscale=True))
    assert s.targets == [(32, 32)] and s.images[0].size == (36, 32)
    with pytest.warns(UserWarning, match="upscaled more than 2x"):
        ImageCaptionSet.from_folder(small, 160, prompt="p", buckets=Buckets(160, 32, 320, 16))
    # without buckets everything is the square resolution, as before
    assert ImageCaptionSet.from_folder(folder, 64, prompt="p").targets == [(64, 64)] * 3

    cfg = make_config({"pretrained_model_name_or_path": "tiny", "output_dir": str(tmp_path / "o"), "seed": 0,
                       "instance_data_dir": str(folder), "instance_prompt": "p", "enable_bucket": True, **SMALL})
    ds = build_dataset(cfg)
    for i, p in enumerate(ds.instances.paths):
        item = ds[(0, i)]
        w, h = want[p.name]
        assert item["pixel_values"].shape == (3, h, w) and item["target_size"] == (h, w)
        assert item["original_size"] == tuple(reversed(Image.open(p).size))


def test_sdxl_time_ids_carry_the_bucket():
    items = [{"index": 0, "pixel_values": torch.zeros(3, 48, 80), "prompt": "a", "original_size": (64, 96),
              "crop_top_left": (0, 3), "target_size": (48, 80)},
             {"index": 1, "pixel_values": torch.zeros(3, 48, 80), "prompt": "b", "original_size": (128, 192),
              "crop_top_left": (0, 5), "target_size": (48, 80)}]
    batch = collate(items)
    ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
    assert ids.tolist() == [[64, 96, 0, 3, 48, 80], [128, 192, 0, 5, 48, 80]]


# --- batches ---------------------------------------------------------------------------------------------
BUCKETS = [(80, 48)] * 7 + [(48, 80)] * 4 + [(64, 64)] * 2


def test_batches_never_mix_buckets_and_follow_seed_and_epoch():
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=7)
    first = list(sampler)
    assert len(first) == len(sampler) == 3 + 2 + 1  # per bucket: ceil(7/3), ceil(4/3), ceil(2/3)
    assert sorted(i for b in first for _, i in b) == list(range(len(BUCKETS)))  # each image once per epoch
    for batch in first:
        assert len({BUCKETS[i] for _, i in batch}) == 1 and {e for e, _ in batch} == {0}
    assert list(BucketBatchSampler(BUCKETS, batch_size=3, seed=7)) == first  # a pure function of (seed, epoch)
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for b in second for e, _ in b} == {1} and [[i for _, i in b] for b in second] != \
        [[i for _, i in b] for b in first]
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(BucketBatchSampler(BUCKETS, batch_size=3, seed=8)) != first


def test_accelerate_shards_and_skips_bucket_batches():
    """Through accelerate's own prepare_data_loader / skip_first_batches: 2 processes with batch 2 see the global
    batches of 1 process with batch 4, set_epoch reaches the sampler, and skipping drops whole batches."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    buckets = [(80, 48)] * 6 + [(48, 80)] * 4 + [(64, 64)] * 2  # even buckets: no padding on 2 processes

    class Keys(torch.utils.data.Dataset):  # hands back the (epoch, index) key it is asked for
        def __len__(self):
            return len(buckets)

        def __getitem__(self, key):
            return key

    def keys_loader(batch_size, processes):
        sampler = BucketBatchSampler(buckets, batch_size, seed=1, num_processes=processes)
        return torch.utils.data.DataLoader(Keys(), batch_sampler=sampler, collate_fn=lambda items: items)

    def epoch(loader, e):
        loader.set_epoch(e)
        return [[i for _, i in batch] for batch in loader]

    for e in (0, 1):
        one = epoch(prepare_data_loader(keys_loader(4, 1), num_processes=1, process_index=0, put_on_device=False), e)
        parts = [epoch(prepare_data_loader(keys_loader(2, 2), num_processes=2, process_index=k, put_on_device=False), e)
                 for k in (0, 1)]
        assert len(parts[0]) == len(parts[1]) == len(one)
        assert [a + b for a, b in zip(*parts)] == one
        loader = prepare_data_loader(keys_loader(4, 1), num_processes=1, process_index=0, put_on_device=False)
        loader.set_epoch(e)
        skipped = skip_first_batches(loader, 2)
        skipped.set_epoch(e)
        assert epoch(skipped, e) == one[2:]
    assert epoch(prepare_data_loader(keys_loader(4, 1), num_processes=1, process_index=0, put_on_device=False),
                 0) != one  # epoch 0 differs from epoch 1
    # uneven buckets on 2 processes: each bucket's last batch is padded from the same bucket to split evenly
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=0, num_processes=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % 2 == 0
    for a, b in zip(batches[0::2], batches[1::2]):
        assert len(a) == len(b) >= 1 and len({BUCKETS[i] for _, i in a + b}) == 1


# --- kohya folders and captions --------------------------------------------------------------------------
def test_kohya_folders_repeat_and_caption(tmp_path):
    root = tmp_path / "train"
    dog = mixed_folder(root / "10_sks dog")
    (dog / "0_64x64.caption").write_text("sks dog, on grass\n")
    cat = root / "3_a cat"
    cat.mkdir()
    Image.open(DOG / "00.jpg").save(cat / "cat.jpg")
    (cat / "cat.txt").write_text("a txt caption")
    (cat / "cat.caption").write_text("loses to the .txt")
    cfg = make_config({"pretrained_model_name_or_path": "tiny", "output_dir": str(tmp_path / "o"), "seed": 0,
                       "train_data_dir": str(root), "resolution": 64})
    check_data_dirs(cfg)
    data = build_dataset(cfg)
    s = data.instances  # every image once; the repeats are an index map
    assert len(s) == 4 and len(data) == 3 * 10 + 3
    assert s.prompts == ["sks dog, on grass", "sks dog", "sks dog", "a txt caption"]  # sidecar, else the folder's
    assert [data[(0, k)]["prompt"] for k in range(len(data))] == s.prompts[:3] * 10 + ["a txt caption"] * 3
    assert [data.repeats(k) for k in (0, 3, 29, 30, 32)] == [0, 0, 2, 3, 3]

    # one-line errors for layouts that are not kohya's and not a plain folder
    (root / "misc").mkdir()
    with pytest.raises(DataError, match="mixes kohya .* subfolders with others \\(misc\\)"):
        check_data_dirs(cfg)
    (root / "misc").rmdir()
    Image.open(DOG / "00.jpg").save(root / "loose.jpg")
    with pytest.raises(DataError, match="holds images \\(loose.jpg\\) beside kohya"):
        check_data_dirs(cfg)
    (root / "loose.jpg").unlink()
    (root / "0_never").mkdir()
    with pytest.raises(DataError, match="0_never repeat 0 times"):
        check_data_dirs(cfg)
    (root / "0_never").rename(root / "5_empty")
    with pytest.raises(DataError, match="5_empty.* holds no images"):
        check_data_dirs(cfg)


def test_plain_folder_reads_caption_sidecars(tmp_path):
    folder = mixed_folder(tmp_path / "cap")
    (folder / "0_64x64.caption").write_text("from .caption")
    (folder / "0_64x96.txt").write_text("from .txt")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0_96x64.png", "text": "from metadata"}) + "\n")
    s = ImageCaptionSet.from_folder(folder, 64, captions=True)
    assert dict(zip((p.name for p in s.paths), s.prompts)) == {
        "0_64x64.png": "from .caption", "0_64x96.png": "from .txt", "0_96x64.png": "from metadata"}


def test_caption_dropout_and_shuffle_depend_only_on_seed_epoch_index():
    caption = "sks dog, grass, sunny, park, red collar"
    drop = CaptionAugment(dropout_rate=0.5, seed=1)
    seen = [drop(caption, e, i) for e in range(10) for i in range(20)]
    assert seen == [drop(caption, e, i) for e in range(10) for i in range(20)]
    assert set(seen) == {"", caption} and 70 < seen.count("") < 130
    assert CaptionAugment(dropout_rate=1.0)(caption, 0, 0) == "" and CaptionAugment()(caption, 3, 4) == caption

    shuffle = CaptionAugment(shuffle=True, keep_tokens=1, seed=1)
    outs = {shuffle(caption, e, 0) for e in range(20)}
    assert len(outs) > 5 and shuffle(caption, 3, 2) == shuffle(caption, 3, 2)
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "sks dog" and sorted(tags) == sorted(caption.split(", "))

    with pytest.raises(ConfigError, match="--caption_dropout_rate must be in"):
        make_config({"pretrained_model_name_or_path": "tiny", "output_dir": "o", "train_data_dir": "d",
                     "caption_dropout_rate": 1.5})


def test_bucket_option_errors():
    base = {"pretrained_model_name_or_path": "tiny", "output_dir": "o", "instance_data_dir": "d",
            "instance_prompt": "p", "enable_bucket": True, **SMALL}
    with pytest.raises(ConfigError, match="must be multiples of --bucket_reso_steps 16"):
        make_config({**base, "min_bucket_reso": 40}).resolve_buckets(8)
    with pytest.raises(ConfigError, match="--resolution 256 must lie within"):
        make_config({**base, "resolution": 256}).resolve_buckets(8)
    with pytest.raises(ConfigError, match="--bucket_reso_steps must be >= 1"):
        make_config({**base, "bucket_reso_steps": 0})
    with pytest.raises(ConfigError, match="does not work with --with_prior_preservation"):
        make_config({**base, "with_prior_preservation": True, "class_data_dir": "c", "class_prompt": "dog"})


# --- training --------------------------------------------------------------------------------------------
def test_mixed_aspect_kohya_folder_trains_with_buckets_and_resumes_exactly(tmp_path, monkeypatch):
    root = tmp_path / "train"
    mixed_folder(root / "2_sks dog")  # 3 shapes x 2 repeats: 3 buckets of 2 images
    opts = dict(train_data_dir=str(root), instance_data_dir=None, instance_prompt=None, enable_bucket=True, **SMALL,
                method="reflora", max_train_steps=5, checkpointing_steps=2, train_batch_size=2, random_flip=True,
                caption_dropout_rate=0.3, validation_prompt=[])
    shapes = []
    original_loss = SDTrainer.loss

    def record(self, batch):
        shapes.append(tuple(batch["pixel_values"].shape))
        return original_loss(self, batch)

    monkeypatch.setattr(SDTrainer, "loss", record)
    full = train(tmp_path / "full", **opts)
    assert len(full.dataloader) == 3  # one batch of 2 per bucket per epoch
    assert set(shapes) == {(2, 3, 48, 80), (2, 3, 80, 48), (2, 3, 64, 64)}  # every batch is one bucket

    original_log = SDTrainer._log_step

    def interrupt_after_step_3(self, *a, **k):
        original_log(self, *a, **k)
        if self.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(SDTrainer, "_log_step", interrupt_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", **opts)
    monkeypatch.setattr(SDTrainer, "_log_step", original_log)
    shapes.clear()
    train(tmp_path / "cut", resume_from_checkpoint="latest", **opts)  # from step 2: mid-epoch, 2 batches skipped
    assert len(shapes) == 3
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exact, step for step
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_trains_with_the_buckets_size_conditioning(tmp_path, monkeypatch):
    seen = []

    def record(original_sizes, crop_top_lefts, target_sizes):
        ids = sdxl_time_ids(original_sizes, crop_top_lefts, target_sizes)
        seen.append(ids)
        return ids

    import reflora_diffusion.families.sdxl as sdxl_module

    monkeypatch.setattr(sdxl_module, "time_ids", record)
    folder = mixed_folder(tmp_path / "mixed")
    train(tmp_path / "xl", pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=str(folder),
          enable_bucket=True, **SMALL, max_train_steps=3, validation_prompt=[], checkpointing_steps=10)
    rows = sorted(tuple(int(v) for v in ids[0]) for ids in seen)
    # original (h, w), crop top-left (y, x) within the resized image, the bucket's (h, w)
    assert [(r[0], r[1], r[4], r[5]) for r in rows] == [(64, 64, 64, 64), (64, 96, 48, 80), (96, 64, 80, 48)]
    assert all(r[2] == 0 or r[3] == 0 for r in rows)  # the image covers the bucket exactly along one side

    with pytest.raises(ConfigError, match="--bucket_reso_steps 2 does not suit this model: .* multiples of 4"):
        make_trainer(tmp_path / "bad", instance_data_dir=str(folder), enable_bucket=True,
                     **{**SMALL, "min_bucket_reso": 32, "bucket_reso_steps": 2}, validation_prompt=[])


@pytest.mark.slow
def test_two_processes_match_one_process_with_buckets(tmp_path):
    """gloo DDP on CPU, batch 1 per process, equals one process with batch 2: the same one-bucket global batches."""
    import os
    import subprocess
    import sys

    from sd_helpers import BASE, REPO

    folder = mixed_folder(tmp_path / "mixed", copies=2)  # 3 buckets of 2 images: every global batch of 2 is full
    opts = dict(instance_data_dir=str(folder), enable_bucket=True, **SMALL, method="reflora", max_train_steps=4,
                validation_prompt=[], checkpointing_steps=10, random_flip=True)
    train(tmp_path / "one", train_batch_size=2, **opts)
    args = [f"--{k}={v}" if not isinstance(v, bool) else f"--{k}" for k, v in {**BASE, **opts}.items()
            if v not in ([], None)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "train" / "sd.py"), *args, "--train_batch_size=1", f"--output_dir={tmp_path / 'two'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
