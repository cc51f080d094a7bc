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
    n_text_encoders = 1
    lora_text_encoders = 1  # --train_text_encoder adapts the first N (the CLIP ones; the loaders have no T5 slot)
    flow = False  # rectified flow (FlowMatchEulerDiscreteScheduler) instead of DDPM noise prediction
    default_weighting: str | None = None  # flow: --weighting_scheme default (the diffusers example's)
    default_max_sequence_length: int | None = None  # flow: T5 tokens in training (the diffusers example's)
    fp16 = True  # fp16 mixed precision works (SD3 and FLUX overflow: bf16)
    kohya = True  # a kohya / A1111 layout exists for its LoRA files
    hub_tag = ""  # the model card's tag on the hub
    presets: tuple[str, ...] = ()  # offline presets of this family (presets.py builds them)
    resolution = 512  # the released models' image size (when their config cannot be read)

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

    def sample_size(self, denoiser_config: dict) -> int:
        """Latent side the denoiser was made for."""
        sample = denoiser_config["sample_size"]
        return int(sample[0] if isinstance(sample, (list, tuple)) else sample)

    def pixel_multiple(self, vae_factor: int, denoiser_config: dict) -> int:
        """What every image side must be a multiple of: the VAE's downsampling times the denoiser's."""
        return vae_factor * 2 ** (len(denoiser_config["down_block_types"]) - 1)

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype

    def added_cond_kwargs(self, batch: dict, pooled: torch.Tensor | None, device, dtype) -> dict | None:
        """The UNet's added conditioning (SDXL's pooled text and size ids), or None."""
        return None

    def scheduler_class(self):
        import diffusers

        return diffusers.FlowMatchEulerDiscreteScheduler if self.flow else diffusers.DDPMScheduler

    # ------------------------------------------------------------------ conditioning
    def encode_prompts(self, text_encoders: list, input_ids: list[torch.Tensor],
                       device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder hidden states, pooled embedding or None) as the family's pipeline computes them."""
        raise NotImplementedError

    def validation_kwargs(self, cfg) -> dict:
        """Pipeline arguments the family's validation samples take besides the prompt."""
        return {}

    def negative_prompt_cached(self) -> bool:
        """Whether validation from cached embeddings needs the empty prompt's as the negative (SD3)."""
        return False

    # ------------------------------------------------------------------ options it cannot use
    def check_options(self, cfg, mixed_precision: str) -> None:
        """One-line errors (config.ConfigError) for options this family cannot use."""
