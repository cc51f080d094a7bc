"""SDXL: UNet with "text_time" added conditioning, CLIP-L + CLIP-G text encoders, DDPM."""

from __future__ import annotations

import torch

from .base import Family


class SDXL(Family):
    name = "sdxl"
    label = "SDXL"
    pipeline = "StableDiffusionXLPipeline"
    denoiser_class = "UNet2DConditionModel"
    n_text_encoders = 2
    lora_text_encoders = 2
    hub_tag = "stable-diffusion-xl"
    presets = ("tiny-sdxl",)
    resolution = 1024

    def matches(self, index: dict) -> bool:
        return "XL" in index.get("_class_name", "") or "text_encoder_2" in index

    def matches_name(self, hub_id: str) -> bool:
        return "xl" in hub_id.lower()

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # SDXL's VAE overflows in fp16

    def added_cond_kwargs(self, batch, pooled, device, dtype):
        ids = time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
        return {"text_embeds": pooled.to(dtype), "time_ids": ids.to(device, dtype)}

    def encode_prompts(self, text_encoders, input_ids, device):
        # penultimate hidden states of both encoders concatenated; pooled output of the second
        hidden, pooled = [], None
        for te, ids in zip(text_encoders, input_ids):
            out = te(ids.to(device), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled


def time_ids(original_sizes, crop_top_lefts, target_sizes) -> torch.Tensor:
    """SDXL micro-conditioning per sample: original (h, w), crop top-left (y, x), target (h, w)."""
    return torch.tensor([[*o, *c, *t] for o, c, t in zip(original_sizes, crop_top_lefts, target_sizes)],
                        dtype=torch.float32)
