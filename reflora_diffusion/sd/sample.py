"""Sampling with the models being trained: validation images and DreamBooth class images.

The pipeline is built from the base folder with the live (LoRA-carrying) UNet and text encoders passed in,
so it samples exactly the weights the loop trains, without copying or merging them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .data import IMAGE_EXTENSIONS


def build_pipeline(path: str, family, models: dict | None = None, dtype=torch.float32, revision=None):
    """The base pipeline of the model family (a ``families.Family`` or its name) with any of its components (unet
    or transformer, text_encoder..., vae) replaced by `models`."""
    import diffusers

    from reflora_diffusion import families

    family = families.get(family) if isinstance(family, str) else family
    cls = getattr(diffusers, family.pipeline)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    pipe = cls.from_pretrained(path, revision=revision, **(models or {}), **extra)
    if not models:  # given models keep their own dtypes (LoRA weights stay fp32)
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], images_per_prompt: int, seed: int, resolution: int, steps: int,
             device, prompt_kwargs=None) -> list:
    """PIL images, prompt-major; image i of each prompt uses seed + i, so every call is comparable.
    prompt_kwargs(prompt): the pipeline arguments for a prompt (default: the prompt itself)."""
    out = []
    for prompt in prompts:
        for i in range(images_per_prompt):
            g = torch.Generator(device="cpu").manual_seed(seed + i)
            kwargs = prompt_kwargs(prompt) if prompt_kwargs else {"prompt": prompt}
            out += pipe(**kwargs, num_inference_steps=steps, generator=g, height=resolution,
                        width=resolution).images
    return out


def save_validation_samples(pipe, cfg, step: int, run_dir: Path, device, prompt_kwargs=None) -> list[str]:
    """samples/step_<N>/<i>.png for the validation prompts and samples/grid_step_<N>.png with all of them;
    returns the paths of the single images relative to the run folder."""
    folder = Path(run_dir) / "samples" / f"step_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    images = generate(pipe, cfg.validation_prompt, cfg.num_validation_images, cfg.seed, cfg.resolution,
                      cfg.validation_inference_steps, device, prompt_kwargs)
    rel = []
    for i, im in enumerate(images):
        tmp = folder / f".{i}.png.tmp"
        im.save(tmp, format="PNG")
        tmp.replace(folder / f"{i}.png")
        rel.append(f"samples/step_{step}/{i}.png")
    # one picture per validation: a row per prompt, a column per seed
    from diffusers.utils import make_image_grid

    grid = make_image_grid(images, rows=len(cfg.validation_prompt), cols=cfg.num_validation_images)
    tmp = folder.parent / f".grid_step_{step}.png.tmp"
    grid.save(tmp, format="PNG")
    tmp.replace(folder.parent / f"grid_step_{step}.png")
    return rel


def ensure_class_images(cfg, accelerator) -> None:
    """DreamBooth prior preservation: generate the missing class images with the base pipeline."""
    folder = Path(cfg.class_data_dir)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        have = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        missing = cfg.num_class_images - len(have)
        if missing > 0:
            from tqdm.auto import tqdm

            from reflora_diffusion.families import family_of
            from reflora_diffusion.presets import resolve_pretrained

            path = resolve_pretrained(cfg.pretrained_model_name_or_path)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
            if accelerator.device.type == "cpu":
                dtype = torch.float32
            pipe = build_pipeline(path, family_of(path), dtype=dtype, revision=cfg.revision).to(accelerator.device)
            for start in tqdm(range(0, missing, cfg.sample_batch_size), desc="class images"):
                n = min(cfg.sample_batch_size, missing - start)
                g = torch.Generator("cpu").manual_seed(cfg.seed + len(have) + start)
                images = pipe(prompt=[cfg.class_prompt] * n, generator=g, height=cfg.resolution, width=cfg.resolution,
                              num_inference_steps=cfg.validation_inference_steps).images
                for im in images:
                    name = hashlib.sha1(im.tobytes()).hexdigest()[:16]
                    tmp = folder / f".{name}.png.tmp"
                    im.save(tmp, format="PNG")
                    tmp.replace(folder / f"{len(have) + start}-{name}.png")
            del pipe
    accelerator.wait_for_everyone()


def nearest_distance(image, references) -> float:
    """How far a generated image is from the nearest of `references` (training images): the RMS pixel difference
    (0..255) of centre-cropped 32x32 copies. A subject or style learned brings it down; the benchmarks'
    measure (benchmarks/quickstart.py) and the quick start's test use it."""
    x = thumbnail(image)
    return min(float(((x - thumbnail(r)) ** 2).mean() ** 0.5) for r in references)


def thumbnail(image):
    """A centre-cropped square image at 32x32 as float RGB 0..255 (numpy)."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    s = min(image.size)
    left, top = (image.width - s) // 2, (image.height - s) // 2
    image = image.crop((left, top, left + s, top + s)).resize((64, 64), Image.Resampling.BICUBIC)
    return np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64)
