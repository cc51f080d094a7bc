"""SD3 / SD3.5: MMDiT transformer, CLIP-L + CLIP-G + T5, rectified flow (diffusers'
examples/dreambooth/train_dreambooth_lora_sd3.py)."""

from __future__ import annotations

import torch
from torch import nn

from .flow import ATTENTION, FlowFamily


class SD3(FlowFamily):
    name = "sd3"
    label = "SD3"
    block_lists = ("transformer_blocks",)
    pipeline = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    n_text_encoders = 3  # CLIP-L, CLIP-G, T5
    lora_text_encoders = 2
    default_weighting = "logit_normal"
    default_max_sequence_length = 77
    kohya = False  # ComfyUI reads the diffusers file as it is
    comfyui_reads_diffusers = True
    hub_tag = "sd3"
    presets = ("tiny-sd3",)
    resolution = 1024

    def matches(self, index: dict) -> bool:
        return index.get("_class_name", "").startswith("StableDiffusion3")

    def matches_name(self, hub_id: str) -> bool:
        low = hub_id.lower()
        return "stable-diffusion-3" in low or "sd3" in low

    def default_targets(self, denoiser: nn.Module) -> list[str]:
        # joint attention (and SD3.5's second attention); the last block drops its text stream, so its
        # add_q_proj gets no gradient: named per block where it has one
        targets = [t for t in ATTENTION if t != "add_q_proj"]
        return targets + [f"transformer_blocks.{i}.attn.add_q_proj"
                          for i, block in enumerate(denoiser.transformer_blocks) if not block.context_pre_only]

    def pixel_multiple(self, vae_factor: int, denoiser_config: dict) -> int:
        return vae_factor * int(denoiser_config.get("patch_size", 2))

    def negative_prompt_cached(self) -> bool:
        return True

    def encode_prompts(self, text_encoders, input_ids, device):
        # penultimate states of CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's tokens after
        # them; pooled: both CLIP projections concatenated (StableDiffusion3Pipeline)
        clip, pooled = [], []
        for te, ids in zip(text_encoders[:2], input_ids[:2]):
            out = te(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            clip.append(out.hidden_states[-2])
        t5 = text_encoders[2](input_ids[2].to(device))[0]
        clip = torch.cat(clip, dim=-1)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def predict(self, transformer, config, noisy, timesteps, hidden, pooled, guidance_scale):
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]
