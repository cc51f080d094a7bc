"""Stable Diffusion 1.x / 2.x: UNet, one CLIP text encoder, DDPM (epsilon or v prediction)."""

from __future__ import annotations

from .base import Family


class SD(Family):
    name = "sd"
    label = "SD 1.x/2.x"
    pipeline = "StableDiffusionPipeline"
    denoiser_class = "UNet2DConditionModel"
    hub_tag = "stable-diffusion"
    presets = ("tiny", "tiny-emoji")

    def matches(self, index: dict) -> bool:
        return True  # the fallback: any other UNet pipeline with one text encoder

    def encode_prompts(self, text_encoders, input_ids, device):
        return text_encoders[0](input_ids[0].to(device))[0], None
