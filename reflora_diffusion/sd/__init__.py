"""Diffusion LoRA training (SD 1.x/2.x, SDXL, SD3, FLUX.1/2, Z-Image, Qwen-Image) with any reflora_diffusion.core
method.

    from reflora_diffusion.sd.config import parse_args
    from reflora_diffusion.sd.train import train
    train(parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", "photos",
                      "--instance_prompt", "a photo of sks dog", "--output_dir", "runs/dog"]))

Modules: config, data, buckets (aspect-ratio buckets), models (loading + LoRA), flow (rectified-flow timesteps and
weights), train (the loop), sample (pipelines for validation and class images), disk_cache, memory (presets).
What differs per model family is in reflora_diffusion.families; shared with the other packages:
reflora_diffusion.presets (offline tiny models) and reflora_diffusion.rundir (the run folder).
"""
