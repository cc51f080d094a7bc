"""Rectified-flow training (SD3/SD3.5, FLUX.1) as diffusers' train_dreambooth_lora_sd3.py / _flux.py do it.

    x_t = (1 - sigma) * x_0 + sigma * noise        the transformer predicts the velocity noise - x_0

sigma is drawn from a density over the scheduler's discrete sigmas (--weighting_scheme logit_normal with
--logit_mean/--logit_std, mode with --mode_scale, or uniform for none/sigma_sqrt/cosmap), and the
sigma_sqrt/cosmap schemes also weight the loss. Latents are (VAE sample - shift_factor) * scaling_factor;
FLUX packs them into 2x2 patches with image/text position ids and, for guidance-distilled models
(FLUX.1-dev: transformer.config.guidance_embeds), takes --guidance_scale as an input. What differs per family
(targets, prompt encoding, the transformer call) is in reflora_diffusion.families.
"""

from __future__ import annotations

import torch

WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")

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
