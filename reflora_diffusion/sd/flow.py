"""SD3/SD3.5 and FLUX.1: rectified-flow training as diffusers' train_dreambooth_lora_sd3.py / _flux.py do it.

    x_t = (1 - sigma) * x_0 + sigma * noise        the transformer predicts the velocity noise - x_0

sigma is drawn from a density over the scheduler's discrete sigmas (--weighting_scheme logit_normal with
--logit_mean/--logit_std, mode with --mode_scale, or uniform for none/sigma_sqrt/cosmap), and the
sigma_sqrt/cosmap schemes also weight the loss. Latents are (VAE sample - shift_factor) * scaling_factor;
FLUX packs them into 2x2 patches with image/text position ids and, for guidance-distilled models
(FLUX.1-dev: transformer.config.guidance_embeds), takes --guidance_scale as an input.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")
DEFAULT_WEIGHTING = {"sd3": "logit_normal", "flux": "none"}  # the diffusers examples' defaults
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 77, "flux": 512}  # T5 tokens in training (the examples' defaults)
# Text encoders that can take LoRA: the CLIP ones. The pipelines' LoRA loaders have no slot for T5.
LORA_TEXT_ENCODERS = {"sd3": 2, "flux": 1}

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# diffusers' examples: SD3 adapts joint attention (also SD3.5's second attention); FLUX adds the MLPs.
DEFAULT_TARGETS = {
    "sd3": _ATTENTION,
    "flux": _ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"],
}


def default_targets(family: str, transformer: nn.Module) -> list[str]:
    """The family's LoRA targets. By full name where a bare one would hit a layer that must stay out: SD3's
    last block drops its text stream, so its add_q_proj gets no gradient; FLUX's final output layer is also
    called proj_out, like the single blocks' output projections."""
    targets = list(DEFAULT_TARGETS[family])
    if family == "sd3":
        targets.remove("add_q_proj")
        targets += [f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(transformer.transformer_blocks)
                    if not block.context_pre_only]
    if family == "flux":
        targets += [n for n, _ in transformer.named_modules()
                    if n.startswith("single_transformer_blocks.") and n.endswith(".proj_out")]
    return targets


def encode_prompts(family: str, text_encoders: list, input_ids: list[torch.Tensor],
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder hidden states, pooled projection) as StableDiffusion3Pipeline / FluxPipeline compute them."""
    if family == "flux":  # CLIP's pooled output + T5's hidden states
        pooled = text_encoders[0](input_ids[0].to(device), output_hidden_states=False).pooler_output
        return text_encoders[1](input_ids[1].to(device))[0], pooled
    # SD3: penultimate states of CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's tokens
    # after them; pooled: both CLIP projections concatenated.
    clip, pooled = [], []
    for te, ids in zip(text_encoders[:2], input_ids[:2]):
        out = te(ids.to(device), output_hidden_states=True)
        pooled.append(out[0])
        clip.append(out.hidden_states[-2])
    t5 = text_encoders[2](input_ids[2].to(device))[0]
    clip = torch.cat(clip, dim=-1)
    clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def sample_density(cfg, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws u in [0, 1] of the timestep density (--weighting_scheme, --logit_mean/std, --mode_scale)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(cfg.weighting_scheme, n, logit_mean=cfg.logit_mean,
                                                 logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                                 device=generator.device, generator=generator)


def timesteps_and_sigmas(scheduler, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's training timesteps and sigmas at u (index = u * num_train_timesteps, as the examples)."""
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1).cpu()
    return scheduler.timesteps[indices].to(u.device), scheduler.sigmas[indices].to(u.device)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas)


def predict(family: str, transformer: nn.Module, config, noisy: torch.Tensor, timesteps: torch.Tensor,
            hidden: torch.Tensor, pooled: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The transformer's velocity prediction in the latents' (B, C, H, W) layout. `config` is the bare
    transformer's config (`transformer` may be wrapped by accelerate)."""
    if family == "sd3":
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]
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
