"""What a model family declares: its pipeline and components, defaults, prompt encoding and loss target.

One subclass per family (sd.py, sdxl.py, sd3.py, flux.py); the registry in ``__init__`` finds a folder's family
from its ``model_index.json``. The trainer, the presets, the exporters and the app read these facts here and
nowhere else, so adding a family is one module (and one offline preset).
"""

from __future__ import annotations

import torch
from torch import nn

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # pipeline names, in order


class Family:
    name = ""  # short name, also written into exports' metadata ("family")
    label = ""  # for people: error messages, the app
    pipeline = ""  # diffusers pipeline class
    denoiser_class = ""  # diffusers model class of the denoiser
    denoiser_folder = "unet"  # its subfolder and pipeline component name ("unet" or "transformer")
    vae_class = "AutoencoderKL"
    n_text_encoders = 1
    lora_text_encoders = 1  # --train_text_encoder adapts the first N (the CLIP ones; the loaders have no T5 slot)
    flow = False  # rectified flow (FlowMatchEulerDiscreteScheduler) instead of DDPM noise prediction
    default_weighting: str | None = None  # flow: --weighting_scheme default (the diffusers example's)
    default_max_sequence_length: int | None = None  # flow: T5 tokens in training (the diffusers example's)
    fp16 = True  # fp16 mixed precision works (SD3 and FLUX overflow: bf16)
    kohya = True  # a kohya / A1111 layout exists for its LoRA files (--format kohya)
    # --format kohya writes the original-checkpoint layout instead ("diffusion_model.<diffusers module name>" with
    # lora_down / lora_up / alpha), the one diffusers' lora_conversion_utils reads for this family
    original_layout = False
    comfyui_reads_diffusers = False  # without a kohya layout: whether ComfyUI's Load LoRA reads the diffusers file
    hub_tag = ""  # the model card's tag on the hub
    presets: tuple[str, ...] = ()  # offline presets of this family (presets.py builds them)
    resolution = 512  # the released models' image size (when their config cannot be read)
    block_lists: tuple[str, ...] = ()  # the denoiser's transformer block lists, in order (--offload_blocks)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return TEXT_ENCODERS[: self.n_text_encoders]

    def matches(self, index: dict) -> bool:
        """Whether a pipeline's model_index.json is this family's."""
        return index.get("_class_name", "") == self.pipeline

    def matches_name(self, hub_id: str) -> bool:
        """A guess from a hub id alone (offline, model_index.json never fetched)."""
        return False

    # ------------------------------------------------------------------ defaults
    def default_targets(self, denoiser: nn.Module) -> list[str] | None:
        """LoRA targets of the denoiser (None: the UNet's attention default, config.DEFAULT_UNET_TARGETS)."""
        return None

    def vae_factor(self, vae_config: dict) -> int:
        """The VAE's spatial downsampling."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    def sample_size(self, denoiser_config: dict) -> int:
        """Latent side the denoiser was made for."""
        sample = denoiser_config["sample_size"]
        return int(sample[0] if isinstance(sample, (list, tuple)) else sample)

    def pixel_multiple(self, vae_factor: int, denoiser_config: dict) -> int:
        """What every image side must be a multiple of: the VAE's downsampling times the denoiser's."""
        return vae_factor * 2 ** (len(denoiser_config["down_block_types"]) - 1)

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype

    def encode_images(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of (B, 3, H, W) pixels, as (B, C, h, w) latents."""
        dist = vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def model_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (float32) in the denoiser's space: shifted (SD3/FLUX VAEs) and scaled."""
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def added_cond_kwargs(self, batch: dict, pooled: torch.Tensor | None, device, dtype) -> dict | None:
        """The UNet's added conditioning (SDXL's pooled text and size ids), or None."""
        return None

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def scheduler_class(self):
        import diffusers

        return diffusers.FlowMatchEulerDiscreteScheduler if self.flow else diffusers.DDPMScheduler

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, text_encoders: list, tokenizers: list, prompts: list[str], device):
        """(per-prompt encoder hidden states, pooled embeddings or None) of ``prompts``, as the family's pipeline
        computes them. The hidden states are indexable per prompt (``batch_embeds`` puts cached ones together)."""
        return self.encode_prompts(text_encoders, tokenize(tokenizers, prompts), device)

    def encode_prompts(self, text_encoders: list, input_ids: list[torch.Tensor],
                       device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder hidden states, pooled embedding or None) from token ids (one tensor per tokenizer)."""
        raise NotImplementedError

    def batch_embeds(self, per_prompt: list):
        """Cached per-prompt hidden states as the denoiser's batch input."""
        return torch.stack(per_prompt)

    def cached_prompt_kwargs(self, hidden: torch.Tensor, pooled: torch.Tensor | None, prefix: str = "") -> dict:
        """Pipeline arguments for one prompt's cached embeddings (``prefix``: "negative_")."""
        out = {f"{prefix}prompt_embeds": hidden[None]}
        if pooled is not None:
            out[f"{prefix}pooled_prompt_embeds"] = pooled[None]
        return out

    def validation_kwargs(self, cfg) -> dict:
        """Pipeline arguments the family's validation samples take besides the prompt."""
        return {}

    def negative_prompt_cached(self) -> bool:
        """Whether validation from cached embeddings needs the empty prompt's as the negative (SD3)."""
        return False

    # ------------------------------------------------------------------ options it cannot use
    def check_options(self, cfg, mixed_precision: str) -> None:
        """One-line errors (config.ConfigError) for options this family cannot use."""
        if cfg.train_text_encoder and not self.lora_text_encoders:
            from reflora_diffusion.sd.config import ConfigError

            raise ConfigError(f"--train_text_encoder: {self.label}'s LoRA loader has no text encoder slot; train the "
                              "transformer only (drop the flag)")


def tokenize(tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids per tokenizer, padded to its model_max_length."""
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers]


def cast(embeds, dtype: torch.dtype):
    """Embeddings (a tensor, a list of tensors or None) in ``dtype``."""
    if embeds is None:
        return None
    if isinstance(embeds, (list, tuple)):
        return [e.to(dtype) for e in embeds]
    return embeds.to(dtype)
