"""reflora-diffusion: RefLoRA (refactored low-rank adaptation) and LoRA trainers for diffusion and language models."""

__version__ = "0.1.0"
