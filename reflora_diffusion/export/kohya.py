"""kohya/A1111/ComfyUI format: `lora_unet_<layer>.lora_down.weight / .lora_up.weight / .alpha` + ss_* metadata.

Layer names follow kohya's sd-scripts: for SD 1.x its UNet uses diffusers' module names
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), for SDXL the original
(sgm/LDM) UNet names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); text encoders
are `lora_te_` (SD 1.x) or `lora_te1_` / `lora_te2_` (SDXL). diffusers' kohya loader
(`_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`) reads them back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from reflora_diffusion.presets import FLOW_FAMILIES

from .factors import WEIGHT_NAME, ExportError, LoraFactors
from .files import save_safetensors

# diffusers ResnetBlock2D -> sgm ResBlock
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$")


def sgm_unet_name(name: str, blocks: dict) -> str:
    """diffusers UNet module name -> the original SDXL (sgm) UNet name that kohya's sd-scripts uses."""
    if name in _TOP:
        return _TOP[name]
    lpb = blocks["layers_per_block"]
    if not isinstance(lpb, int):
        raise ExportError(f"kohya SDXL naming needs one layers_per_block for all blocks (got {lpb}); "
                          "export in diffusers format instead.")

    def inner(kind: str, rest: str) -> str:
        if kind == "resnets":
            first, _, tail = rest.partition(".")
            return _RESNET.get(first, first) + (f".{tail}" if tail else "")
        return rest

    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m and (m[1], int(m[2])) in _MID:
        return f"middle_block.{_MID[m[1], int(m[2])]}.{inner(m[1], m[3])}"
    m = _BLOCK.match(name)
    if m:
        where, b, kind, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5] or ""
        if where == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op"
            return f"input_blocks.{1 + b * (lpb + 1) + i}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"
        if kind == "upsamplers":  # the upsampler follows the block's last resnet (and attention, if any)
            has_attn = "CrossAttn" in blocks["up_block_types"][b]
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv"
        return f"output_blocks.{b * (lpb + 1) + i}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"
    raise ExportError(f"UNet layer {name!r} has no name in kohya's SDXL format; leave it out of "
                      "target_modules or export in diffusers format.")


def kohya_name(component: str, name: str, sdxl: bool, blocks: dict | None = None) -> str:
    """The kohya LoRA name (key prefix) of one layer."""
    if component == "unet":
        if sdxl:
            if blocks is None:
                raise ExportError("kohya SDXL naming needs the UNet layout (layers_per_block, up_block_types); "
                                  "pass the UNet or the base model.")
            name = sgm_unet_name(name, blocks)
        prefix = "lora_unet"
    else:
        prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{name.replace('.', '_')}"


def kohya_metadata(factors: LoraFactors, name: str) -> dict[str, str]:
    """ss_* metadata as sd-scripts writes it (A1111/ComfyUI show it), plus the RefLoRA method."""
    info = factors.info
    conv = [f for layers in factors.layers.values() for f in layers.values() if f.A.dim() == 4 and f.A.shape[-1] > 1]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(factors.common("rank")),
        "ss_network_alpha": str(factors.common("alpha")),
        "ss_base_model_version": "sdxl_base_v1-0" if factors.sdxl else "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": str(info.get("base_model", "")),
        "ss_steps": str(info.get("steps", "")),
        "ss_output_name": name,
        "ss_network_args": json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": str(conv[0].alpha)}
                                      if conv else {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if factors.sdxl else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": name,
        "reflora_method": str(info.get("method", "")),
        "reflora_info": json.dumps({**info, "sdxl": factors.sdxl}, sort_keys=True),
        "format": "pt",
    }  # fmt: skip
    return {k: v for k, v in meta.items() if v != ""}


def write_kohya(factors: LoraFactors, path: str | Path, overwrite: bool = False) -> Path:
    """Write factors as one kohya-format .safetensors file; returns its path."""
    path = Path(path)
    if factors.family in FLOW_FAMILIES:
        raise ExportError(f"kohya export covers SD 1.x/SDXL only; for {factors.family.upper()} use the diffusers "
                          f"file ({WEIGHT_NAME}), which ComfyUI's Load LoRA node reads as is")
    blocks = factors.info.get("unet_blocks")
    tensors: dict[str, torch.Tensor] = {}
    for component, layers in factors.layers.items():
        for name, f in layers.items():
            key = kohya_name(component, name, factors.sdxl, blocks)
            tensors[f"{key}.lora_down.weight"] = f.A.contiguous()
            tensors[f"{key}.lora_up.weight"] = f.B.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(f.alpha))  # kohya's scale is alpha / rank
    return save_safetensors(tensors, path, kohya_metadata(factors, path.stem), overwrite)


def export_kohya(output: str | Path, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None, *, refactorer=None, adapter: str | None = None,
                 sdxl: bool | None = None, info: dict | None = None, name: str = "lora",
                 overwrite: bool = False) -> Path:
    """Export the LoRA of a UNet and/or text encoders in kohya format as <output>/<name>.safetensors
    (or to `output` itself when it ends in .safetensors). Arguments as in export_diffusers."""
    from .factors import factors_from_models

    factors = factors_from_models(unet, text_encoder, text_encoder_2, refactorer, adapter, sdxl, info)
    output = Path(output)
    path = output if output.suffix == ".safetensors" else output / f"{name}.safetensors"
    return write_kohya(factors, path, overwrite=overwrite)
