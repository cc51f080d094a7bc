"""FLUX.1: double/single-stream transformer on 2x2-packed latents, CLIP + T5, rectified flow, guidance embedding
for guidance-distilled models (diffusers' examples/dreambooth/train_dreambooth_lora_flux.py)."""

from __future__ import annotations

import torch

from .flow import ATTENTION, FlowFamily

# FluxPipeline's default latent size (its transformer config has no sample_size): 128 x 8 = 1024 px.
SAMPLE_SIZE = 128


class Flux(FlowFamily):
    name = "flux"
    label = "FLUX"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    pipeline = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    n_text_encoders = 2  # CLIP, T5
    lora_text_encoders = 1
    default_weighting = "none"
    default_max_sequence_length = 512
    hub_tag = "flux"
    presets = ("tiny-flux",)
    resolution = 1024

    def matches(self, index: dict) -> bool:
        cls = index.get("_class_name", "")
        return cls.startswith("Flux") and not cls.startswith("Flux2")  # (FLUX.2 is another architecture)

    def matches_name(self, hub_id: str) -> bool:
        return "flux" in hub_id.lower()

    def default_targets(self, denoiser) -> list[str]:
        # the example's: attention and the MLPs; the final output layer is also called proj_out, like the single
        # blocks' output projections, so those go by full name
        targets = ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]
        return targets + [n for n, _ in denoiser.named_modules()
                          if n.startswith("single_transformer_blocks.") and n.endswith(".proj_out")]

    def sample_size(self, denoiser_config: dict) -> int:
        return int(denoiser_config.get("sample_size", SAMPLE_SIZE))

    def pixel_multiple(self, vae_factor: int, denoiser_config: dict) -> int:
        return vae_factor * 2  # the 2x2 packing

    def validation_kwargs(self, cfg) -> dict:
        return {**super().validation_kwargs(cfg), "guidance_scale": cfg.guidance_scale}

    def encode_prompts(self, text_encoders, input_ids, device):
        # CLIP's pooled output + T5's hidden states (FluxPipeline)
        pooled = text_encoders[0](input_ids[0].to(device), output_hidden_states=False).pooler_output
        return text_encoders[1](input_ids[1].to(device))[0], pooled

    def predict(self, transformer, config, noisy, timesteps, hidden, pooled, guidance_scale):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((b,), guidance_scale, device=noisy.device, dtype=torch.float32)
                    if config.guidance_embeds else None)
        packed = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps / 1000,
                             guidance=guidance, pooled_projections=pooled, encoder_hidden_states=hidden,
                             txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(packed, h, w, vae_scale_factor=1)
