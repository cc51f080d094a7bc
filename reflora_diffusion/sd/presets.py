"""Built-in offline presets: tiny Stable Diffusion (1.x-style) and tiny SDXL pipelines, and `tiny-emoji`.

The models are made from config with a fixed seed, saved with the pipeline's own `save_pretrained` and
then used through the same `from_pretrained` path as a hub model, so the whole trainer runs on a CPU in
minutes with no network. They keep the real architecture features (cross-attention blocks with
to_q/to_k/to_v/to_out.0, resnets with convs, SDXL's "text_time" added conditioning and two text
encoders) at a few channels.

    folder = resolve_pretrained("tiny")       # built once into the cache, then reused
    pipe = StableDiffusionPipeline.from_pretrained(folder)

`tiny-emoji` is different: a pretrained SD 1.x-architecture pipeline (64 px, ~27 MB of safetensors) that
draws emoji from their names ("blue heart", "dog face", "flag of egypt"). It ships with the package in
`assets/tiny-emoji/` (made by `python -m reflora_diffusion.sd.pretrain_emoji`, see docs/sd.md) and is
returned from there, nothing is built.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

PRESETS = ("tiny", "tiny-sdxl", "tiny-emoji")
# Presets that ship as pretrained weights inside the package (read in place, never built).
SHIPPED = {"tiny-emoji": Path(__file__).parent / "assets" / "tiny-emoji"}
# Bump when a preset's architecture or weights change so old caches are not reused.
PRESET_VERSION = 1
# Image size the presets are made for: UNet sample_size (32) * VAE scale factor (2); tiny-emoji: 16 * 4.
PRESET_RESOLUTION = 64
SEED = 0


def cache_dir() -> Path:
    """Where presets are built: $REFLORA_CACHE/presets, else ~/.cache/reflora_diffusion/presets."""
    root = os.environ.get("REFLORA_CACHE")
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "reflora_diffusion"
    return root / "presets"


def resolve_pretrained(name_or_path: str) -> str:
    """Local folder for a preset ("tiny"/"tiny-sdxl" built on first use, "tiny-emoji" shipped); anything else
    is returned unchanged."""
    name = str(name_or_path)
    if name not in PRESETS:
        return name
    if name in SHIPPED:
        folder = SHIPPED[name]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the {name!r} preset's weights are missing from {folder}: reinstall reflora-diffusion, or "
                "remake them with `python -m reflora_diffusion.sd.pretrain_emoji` (docs/sd.md)"
            )
        return str(folder)
    folder = cache_dir() / f"{name}-v{PRESET_VERSION}"
    if (folder / "model_index.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f"{folder.name}.lock"):
        if not (folder / "model_index.json").is_file():  # another process may have built it meanwhile
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                build_preset(name, tmp)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the cache may be shared
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


@contextmanager
def _file_lock(path: Path):
    """Exclusive lock across processes (two trainers starting at once build the preset only once)."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_sdxl(folder_or_id: str) -> bool:
    """True for an SDXL pipeline (preset name, local folder or hub id)."""
    name = str(folder_or_id)
    if name in PRESETS:
        return name == "tiny-sdxl"
    index = Path(name) / "model_index.json"
    if not index.is_file():
        try:  # hub id: read its model_index.json (cached or downloaded; fails offline if never fetched)
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(name, "model_index.json"))
        except Exception:
            return "xl" in name.lower()
    info = json.loads(index.read_text())
    return "XL" in info.get("_class_name", "") or "text_encoder_2" in info


def build_preset(name: str, folder: str | os.PathLike) -> None:
    """Make the preset's components from config (seeded) and save the full pipeline into `folder`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in PRESETS or name in SHIPPED:
        raise ValueError(f"cannot build preset {name!r}: choose one of {', '.join(p for p in PRESETS if p not in SHIPPED)}")
    sdxl = name == "tiny-sdxl"

    def seeded(make):
        torch.manual_seed(SEED)
        return make()

    def text_config(**extra):
        return CLIPTextConfig(
            vocab_size=len(_tokenizer_vocab()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=_BOS_ID, eos_token_id=_EOS_ID,
            pad_token_id=_EOS_ID, hidden_act="quick_gelu", **extra,
        )  # fmt: skip

    vae = seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=PRESET_RESOLUTION,
    ))  # fmt: skip
    scheduler = DDPMScheduler(  # Stable Diffusion's training noise schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    tokenizer = make_tokenizer()

    if not sdxl:
        unet = seeded(lambda: UNet2DConditionModel(
            # attention at full latent resolution like SD 1.x; one resnet per block keeps a step ~0.1 s
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
        ))  # fmt: skip
        text_encoder = seeded(lambda: CLIPTextModel(text_config()))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        time_dim, proj_dim = 8, 32
        unet = seeded(lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            cross_attention_dim=64,  # hidden sizes of both text encoders, concatenated
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + pooled text embedding
            projection_class_embeddings_input_dim=6 * time_dim + proj_dim, norm_num_groups=32,
        ))  # fmt: skip
        text_encoder = seeded(lambda: CLIPTextModel(text_config()))
        text_encoder_2 = seeded(lambda: CLIPTextModelWithProjection(text_config(projection_dim=proj_dim)))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)


# ---- tokenizer: byte-level CLIP BPE with no merges, so any text tokenizes (one token per byte) ----


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer_vocab() -> dict[str, int]:
    # Same layout as CLIP's vocab: byte characters, the same with the end-of-word marker, then specials.
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


_BOS_ID, _EOS_ID = 512, 513


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_tokenizer_vocab(), merges=[], model_max_length=77)
