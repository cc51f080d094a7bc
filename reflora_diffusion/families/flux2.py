"""FLUX.2 [klein]: FLUX.2's double/single-stream transformer with one Qwen3 text encoder, latents patchified 2x2 and
normalised by the VAE's batch-norm statistics, rectified flow.

Follows diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py (diffusers 0.42 era): LoRA on the
attention projections, the single blocks' fused qkv+MLP input (``to_qkv_mlp_proj``) and their output projections;
prompts through the chat template (thinking off), hidden states of layers 9, 18 and 27 side by side; latents
``(patchify(z) - bn_mean) / bn_std`` packed to tokens with 4-axis position ids; timestep / 1000; guidance only for
guidance-distilled transformers.
"""

from __future__ import annotations

import torch

from .flow import FlowFamily

SAMPLE_SIZE = 128  # Flux2KleinPipeline.default_sample_size: 1024 px at the VAE's factor 8
HIDDEN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers


class Flux2Klein(FlowFamily):
    name = "flux2"
    label = "FLUX.2 [klein]"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    pipeline = "Flux2KleinPipeline"
    denoiser_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"  # with the batch-norm statistics of its patchified latents
    n_text_encoders = 1  # Qwen3
    lora_text_encoders = 0  # Flux2KleinPipeline's LoRA loader has the transformer only
    default_weighting = "none"
    default_max_sequence_length = 512
    kohya = False
    hub_tag = "flux2"
    presets = ("tiny-flux2",)
    resolution = 1024

    def matches(self, index: dict) -> bool:
        return index.get("_class_name", "").startswith("Flux2Klein")

    def matches_name(self, hub_id: str) -> bool:
        return "flux.2" in hub_id.lower() and "klein" in hub_id.lower()

    def default_targets(self, denoiser) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"] + [
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(denoiser.single_transformer_blocks))]

    def sample_size(self, denoiser_config: dict) -> int:
        return SAMPLE_SIZE

    def pixel_multiple(self, vae_factor: int, denoiser_config: dict) -> int:
        return vae_factor * 2  # the 2x2 patchify

    def model_latents(self, vae, latents):
        from diffusers import Flux2KleinPipeline

        patched = Flux2KleinPipeline._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patched)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patched)
        return (patched - mean) / std

    def negative_prompt_cached(self) -> bool:
        return True  # classifier-free guidance (non-distilled klein) needs the empty prompt's embeddings

    def encode_text(self, text_encoders, tokenizers, prompts, device):
        from diffusers import Flux2KleinPipeline

        tok = tokenizers[0]
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoders[0], tok, list(prompts), device=device,
                                                             max_sequence_length=tok.model_max_length,
                                                             hidden_states_layers=HIDDEN_LAYERS)
        return embeds, None

    def predict(self, transformer, config, noisy, timesteps, hidden, pooled, guidance_scale):
        from diffusers import Flux2KleinPipeline as P

        img_ids = P._prepare_latent_ids(noisy).to(noisy.device)
        txt_ids = P._prepare_text_ids(hidden).to(noisy.device)
        guidance = (torch.full((noisy.shape[0],), guidance_scale, device=noisy.device, dtype=torch.float32)
                    if config.guidance_embeds else None)
        packed = P._pack_latents(noisy)
        out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                          encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return P._unpack_latents_with_ids(out[:, : packed.shape[1]], img_ids)
