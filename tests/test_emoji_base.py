"""The shipped `tiny-emoji` base: loads as a diffusers pipeline, is made for 64 px and draws the emoji asked for;
the emoji data script's captions and its npm error."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from reflora_diffusion.emoji import data as emoji_data
from reflora_diffusion.presets import is_sdxl, resolve_pretrained

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURES = Path(__file__).parent / "fixtures" / "emoji"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    folder = resolve_pretrained("tiny-emoji")
    assert Path(folder, "model_index.json").is_file() and not is_sdxl(folder) and not is_sdxl("tiny-emoji")
    p = StableDiffusionPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def test_preset_loads_at_native_resolution_64(pipe):
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    weights = sum(f.stat().st_size for f in Path(resolve_pretrained("tiny-emoji")).rglob("*.safetensors"))
    assert weights <= 30 * 2**20
    assert not list(Path(resolve_pretrained("tiny-emoji")).rglob("*.bin"))  # safetensors only
    # the trainer reads the DDPM training schedule from the same folder
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(resolve_pretrained("tiny-emoji"), subfolder="scheduler")
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000


def test_tokenizer_loads_and_knows_caption_words(pipe):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(resolve_pretrained("tiny-emoji"), subfolder="tokenizer")
    assert tok.tokenize("flag of egypt") == ["flag</w>", "of</w>", "egypt</w>"]  # one token per caption word
    ids = tok("a naïve café 🐶").input_ids  # any text still tokenizes (byte fallback)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def _to32(images):
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(x, 2).reshape(len(x), -1)


def test_generation_is_closer_to_its_own_emoji_than_to_the_others(pipe):
    from PIL import Image

    rows = [json.loads(line) for line in (FIXTURES / "metadata.jsonl").read_text().splitlines()]
    refs = _to32(np.stack([np.asarray(Image.open(FIXTURES / r["file_name"]).convert("RGB")) / 255.0 for r in rows]))
    prompts = [r["text"] for r in rows]
    images = pipe(prompts, num_inference_steps=12, guidance_scale=5.0, output_type="np",
                  generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images  # fmt: skip
    assert images.shape == (len(prompts), 64, 64, 3)
    d = torch.cdist(_to32(images), refs)  # generated x reference
    own = d.diag()
    others = (d.sum(dim=1) - own) / (len(prompts) - 1)
    closer = (own < others).tolist()
    nearest_is_own = (d.argmin(dim=1) == torch.arange(len(prompts))).tolist()
    assert sum(closer) >= len(prompts) - 1, dict(zip(prompts, closer))
    assert sum(nearest_is_own) >= 3, dict(zip(prompts, nearest_is_own))  # chance: 1 of 8


def test_caption_builder_on_fixture():
    entries = json.loads((FIXTURES / "emoji_subset.json").read_text())
    items = emoji_data.build_items(entries, "google")
    captions = [i.caption for i in items]
    assert captions[:2] == ["red heart", "blue heart"]  # in emoji-data's sort order
    assert {"blue heart", "red heart", "dog face", "flag of egypt", "flag of england", "pirate flag",
            "open mailbox with raised flag", "woman: beard", "man in tuxedo"} == set(captions)  # fmt: skip
    assert captions.count("man in tuxedo") == 1  # repeated caption: first emoji only
    assert not any("fitzpatrick" in c for c in captions)  # skin-tone swatches ("Component") skipped
    assert emoji_data.caption_for("flag: Egypt") == "flag of egypt"
    assert emoji_data.caption_for("FACE WITH TEARS OF JOY") == "face with tears of joy"


def test_clear_error_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(RuntimeError, match="npm was not found on PATH"):
        emoji_data.prepare("google", root=tmp_path / "cache")
    assert not (tmp_path / "cache" / "emoji" / "google-16.0.0").exists()  # nothing half-written


def test_prepared_folder_is_composited_rgb_on_white():
    from PIL import Image

    image = Image.open(FIXTURES / "red_heart.png")
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.asarray(image)[0, 0].tolist() == [255, 255, 255]  # transparent corner became white


def test_pretraining_is_seeded_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The base's recipe on the 9 fixture emoji, a few steps: a run stopped right after a checkpoint and run
    again ends with the same shipped (EMA) weights as an uninterrupted one, and writes a loadable pipeline."""
    from PIL import Image
    from safetensors.torch import load_file

    from reflora_diffusion.emoji import pretrain as pretrain_emoji

    rows = [json.loads(line) for line in (FIXTURES / "metadata.jsonl").read_text().splitlines()]
    pixels = np.stack([np.asarray(Image.open(FIXTURES / r["file_name"]).convert("RGB")) for r in rows])
    monkeypatch.setattr(emoji_data, "load", lambda style: ([r["text"] for r in rows], pixels))
    flags = ["--vae_steps", "4", "--steps", "6", "--checkpoint_every", "3", "--batch_size", "4", "--threads", "1"]

    pretrain_emoji.main(["--output_dir", str(tmp_path / "whole"), *flags])

    save_state = pretrain_emoji.save_state

    def save_then_stop(path, modules, optimizer, meta):  # the process dies right after the UNet checkpoint
        save_state(path, modules, optimizer, meta)
        if "unet" in modules:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_emoji, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain_emoji.main(["--output_dir", str(tmp_path / "resumed"), *flags])
    assert not (tmp_path / "resumed" / "pipeline").exists()
    monkeypatch.setattr(pretrain_emoji, "save_state", save_state)
    pretrain_emoji.main(["--output_dir", str(tmp_path / "resumed"), *flags])

    for part in ("unet", "text_encoder", "vae"):
        whole, resumed = (load_file(str(next((tmp_path / run / "pipeline" / part).glob("*.safetensors"))))
                          for run in ("whole", "resumed"))  # fmt: skip
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), part
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "resumed" / "pipeline")
    assert pipe.tokenizer.tokenize("flag of egypt") == ["flag</w>", "of</w>", "egypt</w>"]
    assert not (tmp_path / "resumed" / "checkpoints" / "unet-state.safetensors").exists()  # removed when done


@pytest.mark.parametrize("old, new", [("reflora_diffusion.sd.pretrain_emoji", "reflora_diffusion.emoji.pretrain"),
                                      ("reflora_diffusion.sd.emoji_data", "reflora_diffusion.emoji.data")])
def test_the_old_module_paths_still_run(old, new):
    """The emoji data and pretraining left the SD trainer's package; `python -m` on the old names still runs them."""
    import re
    import subprocess
    import sys

    outs = [subprocess.run([sys.executable, "-m", m, "--help"], capture_output=True, text=True, timeout=120)
            for m in (old, new)]
    assert outs[0].returncode == outs[1].returncode == 0
    flags = [sorted(set(re.findall(r"--\w+", o.stdout))) for o in outs]
    assert flags[0] == flags[1] and len(flags[0]) > 1
