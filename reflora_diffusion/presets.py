"""Built-in offline presets: tiny Stable Diffusion (1.x-style), SDXL, SD3.5, FLUX.1, FLUX.2 [klein], Z-Image and
Qwen-Image pipelines.

The models are made from config with a fixed seed, saved with the pipeline's own `save_pretrained` and
then used through the same `from_pretrained` path as a hub model, so the whole trainer runs on a CPU in
minutes with no network. They keep the real architecture features (cross-attention blocks with
to_q/to_k/to_v/to_out.0, resnets with convs, SDXL's "text_time" added conditioning and two text
encoders; SD3.5's MMDiT with dual attention, qk norms and CLIP-L + CLIP-G + T5 encoders; FLUX.1-dev's
double/single-stream transformer with guidance embedding and CLIP + T5; 16-channel VAEs with their shift
and scaling factors) at a few channels.

    folder = resolve_pretrained("tiny")       # built once into the cache, then reused
    pipe = StableDiffusionPipeline.from_pretrained(folder)

`tiny-emoji` is different: a pretrained SD 1.x-architecture pipeline (64 px, ~27 MB of safetensors) that
draws emoji from their names ("blue heart", "dog face", "flag of egypt"). It ships with the package in
`assets/tiny-emoji/` (made by `python -m reflora_diffusion.emoji.pretrain`, see docs/sd.md) and is
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

from reflora_diffusion.families import FAMILIES, family_of

PRESETS = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-zimage", "tiny-qwenimage", "tiny-emoji")
# Presets that ship as pretrained weights inside the package (read in place, never built).
SHIPPED = {"tiny-emoji": Path(__file__).parent / "assets" / "tiny-emoji"}
# Model families (reflora_diffusion.families): what the trainer, the sampler and the exporters switch on.
PIPELINES = {name: f.pipeline for name, f in FAMILIES.items()}
FLOW_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.flow)
# Bump when a preset's architecture or weights change so old caches are not reused.
PRESET_VERSION = 1
# Image size the presets are made for: UNet sample_size (32) * VAE scale factor (2).
PRESET_RESOLUTION = 64
SEED = 0


def cache_dir() -> Path:
    """Where presets are built: $REFLORA_CACHE/presets, else ~/.cache/reflora_diffusion/presets."""
    root = os.environ.get("REFLORA_CACHE")
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "reflora_diffusion"
    return root / "presets"


def resolve_pretrained(name_or_path: str) -> str:
    """Local folder for a preset (built on first use; "tiny-emoji" ships with the package); anything else is
    returned unchanged."""
    name = str(name_or_path)
    if name not in PRESETS:
        return name
    if name in SHIPPED:
        folder = SHIPPED[name]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the {name!r} preset's weights are missing from {folder}: reinstall reflora-diffusion, or "
                "remake them with `python -m reflora_diffusion.emoji.pretrain` (docs/sd.md)")
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


def model_family(folder_or_id: str) -> str:
    """"sd", "sdxl", "sd3" or "flux" for a preset name, local folder or hub id (``families.family_of``)."""
    return family_of(folder_or_id).name


def is_sdxl(folder_or_id: str) -> bool:
    """True for an SDXL pipeline (preset name, local folder or hub id)."""
    return model_family(folder_or_id) == "sdxl"


def pipeline_class(family: str):
    """The diffusers pipeline class of a model family."""
    import diffusers

    return getattr(diffusers, FAMILIES[family].pipeline)


def _read_config(folder_or_id: str, subfolder: str, revision=None) -> dict:
    """A component's config.json from a local pipeline folder or (online) a hub repository."""
    local = Path(folder_or_id) / subfolder / "config.json"
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(folder_or_id, "config.json", subfolder=subfolder, revision=revision))
    return json.loads(local.read_text())


def native_resolution(folder_or_id: str, revision=None) -> int:
    """The image size a pipeline was made for: UNet/transformer sample_size x VAE scale factor (tiny 64,
    SD 1.5 512, SDXL 1024, SD3.5 1024; FLUX has no sample_size: FluxPipeline's default 128 x 8 = 1024,
    tiny-flux 256). Reads two small config files, so a trainer can size its data before loading weights."""
    path = resolve_pretrained(folder_or_id)
    family = family_of(path)
    denoiser = _read_config(path, family.denoiser_folder, revision)
    return family.sample_size(denoiser) * family.vae_factor(_read_config(path, "vae", revision))


def pixel_multiple(folder_or_id: str, revision=None) -> int:
    """What every image side must be a multiple of for the model's latents: the VAE's downsampling times the
    denoiser's (SD/SDXL UNet: 2^(down blocks - 1); SD3: the transformer's patch size; FLUX: its 2x2 packing).
    SD 1.5 and SDXL: 64; SD3 and FLUX: 16."""
    path = resolve_pretrained(folder_or_id)
    family = family_of(path)
    vae = family.vae_factor(_read_config(path, "vae", revision))
    return family.pixel_multiple(vae, _read_config(path, family.denoiser_folder, revision))


def _seeded(make):
    """make() with the presets' fixed seed: every component's random weights are the same on every machine."""
    import torch

    torch.manual_seed(SEED)
    return make()


def _flow_vae(shift_factor: float, scaling_factor: float):
    """The flow presets' 16-channel VAE (no quant convs, like SD3's and FLUX.1's), with the real shift/scaling."""
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=PRESET_RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    ))  # fmt: skip


def build_preset(name: str, folder: str | os.PathLike) -> None:
    """Make the preset's components from config (seeded) and save the full pipeline into `folder`."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name not in PRESETS or name in SHIPPED:
        raise ValueError(f"cannot build preset {name!r}: choose one of {', '.join(p for p in PRESETS if p not in SHIPPED)}")
    if name == "tiny-zimage":
        return _build_zimage_preset(folder)
    if name == "tiny-flux2":
        return _build_flux2_preset(folder)
    if name == "tiny-qwenimage":
        return _build_qwenimage_preset(folder)
    if model_family(name) in FLOW_FAMILIES:
        return _build_flow_preset(name, folder)
    sdxl = name == "tiny-sdxl"

    vae = _seeded(lambda: AutoencoderKL(
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
        unet = _seeded(lambda: UNet2DConditionModel(
            # attention at full latent resolution like SD 1.x; one resnet per block keeps a step ~0.1 s
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
        ))  # fmt: skip
        text_encoder = _seeded(lambda: CLIPTextModel(_clip_config()))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        time_dim, proj_dim = 8, 32
        unet = _seeded(lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            cross_attention_dim=64,  # hidden sizes of both text encoders, concatenated
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + pooled text embedding
            projection_class_embeddings_input_dim=6 * time_dim + proj_dim, norm_num_groups=32,
        ))  # fmt: skip
        text_encoder = _seeded(lambda: CLIPTextModel(_clip_config()))
        text_encoder_2 = _seeded(lambda: CLIPTextModelWithProjection(_clip_config(projection_dim=proj_dim)))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)


def _clip_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(byte_vocab()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=_BOS_ID, eos_token_id=_EOS_ID,
        pad_token_id=_EOS_ID, hidden_act="quick_gelu", **extra,
    )  # fmt: skip


def _build_flow_preset(name: str, folder) -> None:
    """tiny-sd3 (SD3.5-medium-like: dual attention, qk RMS norm) and tiny-flux (FLUX.1-dev-like: guidance
    embedding), with 16-channel VAEs (no quant convs, the real shift/scaling factors) and a tiny T5."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(cls, **extra):
        return _seeded(lambda: cls(_clip_config(**extra)))

    t5 = _seeded(lambda: T5EncoderModel(T5Config(
        vocab_size=len(_t5_vocab()), d_model=64, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)))
    sd3 = name == "tiny-sd3"
    vae = _flow_vae(0.0609, 1.5305) if sd3 else _flow_vae(0.1159, 0.3611)
    tokenizer, t5_tokenizer = make_tokenizer(), make_t5_tokenizer()
    if sd3:
        transformer = _seeded(lambda: SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64,  # T5's d_model (CLIP-L + CLIP-G are padded to it)
            caption_projection_dim=32, pooled_projection_dim=64,  # both CLIPs' pooled projections
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        ))  # fmt: skip
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=clip(CLIPTextModelWithProjection, projection_dim=32), tokenizer=tokenizer,
            text_encoder_2=clip(CLIPTextModelWithProjection, projection_dim=32), tokenizer_2=tokenizer,
            text_encoder_3=t5, tokenizer_3=t5_tokenizer,
        )  # fmt: skip
    else:
        transformer = _seeded(lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=64,  # 16 latent channels packed 2 x 2
            num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        ))  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
        pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=clip(CLIPTextModel),
                            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)


def _build_zimage_preset(folder) -> None:
    """tiny-zimage (Z-Image-like: single-stream DiT with noise and context refiners, qk norms, 3-axis RoPE; a Qwen3
    text encoder behind a chat template; a 16-channel VAE with FLUX's shift/scaling; Z-Image-Turbo's scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = make_qwen_tokenizer()
    text_encoder = _seeded(lambda: Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)))
    transformer = _seeded(lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32,  # the text encoder's hidden size
        axes_dims=[4, 6, 6], axes_lens=[1024, 512, 512],
    ))  # fmt: skip
    vae = _flow_vae(0.1159, 0.3611)  # FLUX.1's factors
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)


def _build_flux2_preset(folder) -> None:
    """tiny-flux2 (FLUX.2 [klein]-like: 1 double + 2 single blocks, fused qkv+MLP single blocks, 4-axis RoPE, no
    guidance embedding; a Qwen3 causal LM with 27 layers so that the pipeline's hidden layers 9/18/27 exist; a
    batch-norm VAE whose running statistics are set, so the latent normalisation is not the identity)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = make_qwen_tokenizer()
    text_encoder = _seeded(lambda: Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)))
    vae = _seeded(lambda: AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=PRESET_RESOLUTION,
    ))  # fmt: skip
    with torch.no_grad():  # statistics of the patchified latents (4 x 8 channels), as a trained VAE has them
        g = torch.Generator().manual_seed(SEED)
        vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    transformer = _seeded(lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48,  # 3 text-encoder layers x 16
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.2's
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def _build_qwenimage_preset(folder) -> None:
    """tiny-qwenimage (Qwen-Image-like: MMDiT with 3-axis scaled RoPE over 2x2-packed latents; a Qwen2.5-VL text
    encoder with a one-layer vision tower; the causal video VAE with per-channel latent statistics; Qwen-Image's
    exponential-shift scheduler)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = make_qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
    )  # fmt: skip
    text_encoder = _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config))
    transformer = _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ))  # fmt: skip
    vae = _seeded(lambda: AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                                temperal_downsample=[False]))
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)


# Qwen's chat layout (the part ZImagePipeline uses: one user turn and the assistant's start)
_QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_qwen_tokenizer():
    """A byte-level Qwen2 tokenizer with no merges (one token per byte) and Qwen's special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    chars = list(_bytes_to_unicode().values())
    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


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


def byte_vocab() -> dict[str, int]:
    # Same layout as CLIP's vocab: byte characters, the same with the end-of-word marker, then specials.
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


_BOS_ID, _EOS_ID = 512, 513


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)


# ---- T5 tokenizer: a unigram model over single characters (sentencepiece layout), so any text tokenizes ----


def _t5_vocab() -> list[tuple[str, float]]:
    # T5's layout: <pad> 0, </s> 1, <unk> 2, then pieces; "▁" marks a word start (sentencepiece).
    chars = [chr(c) for c in range(33, 127)] + list("äöüéèàçñß")
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]


def make_t5_tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)
