"""diffusers format: pytorch_lora_weights.safetensors written by diffusers' own save_lora_weights.

The per-component LoraConfig goes in as adapter metadata (unet_lora_adapter_metadata, ...), so
`pipe.load_lora_weights` rebuilds the exact scaling, also when alpha != rank or ranks differ per layer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from torch import nn

from .factors import WEIGHT_NAME, Factor, LoraFactors, factors_from_models, read_metadata
from .files import save_safetensors


def lora_config(layers: dict[str, Factor]) -> dict:
    """LoraConfig kwargs reproducing every layer's rank and alpha (the most common ones + patterns)."""
    # Without a leading "text_model." the names suffix-match the layers in both the flattened
    # (transformers 5) and the nested CLIPTextModel; diffusers strips the prefix from the tensor keys.
    layers = {n.removeprefix("text_model."): f for n, f in layers.items()}
    r = Counter(f.rank for f in layers.values()).most_common(1)[0][0]
    alpha = Counter(f.alpha for f in layers.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        # full module names: peft matches pattern keys as "(.*\.)?key$", so they hit exactly one layer
        "rank_pattern": {n: f.rank for n, f in layers.items() if f.rank != r},
        "alpha_pattern": {n: f.alpha for n, f in layers.items() if f.alpha != alpha},
        "target_modules": sorted(layers),
        "use_rslora": False,  # alpha already holds scaling * r
        "use_dora": False,
        "lora_bias": False,
    }


def write_diffusers(factors: LoraFactors, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write factors as output_dir/pytorch_lora_weights.safetensors; returns the file path."""
    from safetensors.torch import load_file

    from reflora_diffusion.presets import pipeline_class

    pipeline_cls = pipeline_class(factors.family)  # its save_lora_weights takes this family's components
    kwargs = {}
    for component, layers in factors.layers.items():
        peft_sd = {}
        for name, f in layers.items():
            peft_sd[f"{name}.lora_A.weight"], peft_sd[f"{name}.lora_B.weight"] = f.A, f.B
        # Keys stay in peft's spelling (lora_A/lora_B), which load_lora_weights reads as is. Not the example
        # scripts' convert_state_dict_to_diffusers: it renames only attention keys, and the loader judges
        # the format by the first key, so a mixed file (attention + conv LoRA) loads with layers missing.
        kwargs[f"{component}_lora_layers"] = peft_sd
        kwargs[f"{component}_lora_adapter_metadata"] = lora_config(layers)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=output_dir))
    try:
        pipeline_cls.save_lora_weights(tmp_dir, **kwargs)
        written = tmp_dir / WEIGHT_NAME
        # add our own facts (method, base model, steps, UNet layout) to diffusers' metadata, then move
        # the file into place atomically (refusing to replace a different adapter)
        meta = read_metadata(written)
        meta["reflora_info"] = json.dumps({**factors.info, "sdxl": factors.sdxl}, sort_keys=True)
        return save_safetensors(load_file(str(written)), output_dir / WEIGHT_NAME, meta, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def export_diffusers(output_dir: str | Path, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
                     text_encoder_2: nn.Module | None = None, *, transformer: nn.Module | None = None,
                     refactorer=None, adapter: str | None = None, sdxl: bool | None = None, info: dict | None = None,
                     overwrite: bool = False) -> Path:
    """Export the LoRA of a UNet or an SD3/FLUX transformer and/or text encoders (peft adapters) in diffusers
    format (the keys StableDiffusion(XL|3)Pipeline / FluxPipeline.load_lora_weights read).

    refactorer: the training Refactorer (or a list of them); its effective_factors() are exported, so a
    rac-lora/cola chain becomes one ordinary LoRA of rank K*r. info: method, base_model, steps (free-form,
    stored in the file's metadata and used by the kohya converter and the model card).
    """
    factors = factors_from_models(unet, text_encoder, text_encoder_2, refactorer, adapter, sdxl, info, transformer)
    return write_diffusers(factors, output_dir, overwrite=overwrite)


