"""What the rectified-flow families (SD3, FLUX) share: the scheduler, the fp16 and DDPM-option refusals."""

from __future__ import annotations

import torch
from torch import nn

from .base import Family

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class FlowFamily(Family):
    denoiser_folder = "transformer"
    flow = True
    fp16 = False

    def sample_size(self, denoiser_config: dict) -> int:
        return int(denoiser_config["sample_size"])

    def check_options(self, cfg, mixed_precision: str) -> None:
        from reflora_diffusion.sd.config import ConfigError

        super().check_options(cfg, mixed_precision)
        if mixed_precision == "fp16" and not self.fp16:
            raise ConfigError(f"--mixed_precision fp16 does not work for {self.label} (its activations overflow "
                              "fp16); use --mixed_precision bf16 (or no)")
        sd_only = [f"--{k}" for k in ("snr_gamma", "prediction_type") if getattr(cfg, k) is not None]
        sd_only += ["--noise_offset"] if cfg.noise_offset else []
        if sd_only:
            raise ConfigError(f"{', '.join(sd_only)} belong to SD/SDXL's DDPM loss; {self.label} trains by flow "
                              "matching: use --weighting_scheme (logit_normal, mode, none, sigma_sqrt, cosmap)")

    def validation_kwargs(self, cfg) -> dict:
        return {"max_sequence_length": cfg.max_sequence_length}

    def predict(self, transformer: nn.Module, config, noisy: torch.Tensor, timesteps: torch.Tensor,
                hidden: torch.Tensor, pooled: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The transformer's velocity prediction in the latents' (B, C, H, W) layout. ``config`` is the bare
        transformer's config (``transformer`` may be wrapped by accelerate)."""
        raise NotImplementedError
