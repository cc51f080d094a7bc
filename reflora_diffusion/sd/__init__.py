"""Stable Diffusion side: presets, data, models, training loop, sampling."""
