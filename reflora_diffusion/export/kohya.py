"""kohya/A1111/ComfyUI format: `lora_unet_<layer>.lora_down.weight / .lora_up.weight / .alpha` + ss_* metadata.

Layer names follow kohya's sd-scripts: for SD 1.x its UNet uses diffusers' module names
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), for SDXL the original
(sgm/LDM) UNet names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); text encoders
are `lora_te_` (SD 1.x) or `lora_te1_` / `lora_te2_` (SDXL). diffusers' kohya loader
(`_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`) reads them back.

FLUX.1 uses sd-scripts' FLUX layout (`networks.lora_flux`: Black Forest Labs' module names, which ComfyUI, Forge
and diffusers' `_convert_kohya_flux_lora_to_diffusers` read): `lora_unet_double_blocks_<i>_img_attn_qkv`, ...,
`lora_unet_single_blocks_<i>_linear1`, with q/k/v (and in single blocks the MLP input) fused into one linear, so
their LoRAs are written as one of the summed rank: down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v).
SD3 has no kohya layout that diffusers reads; its diffusers-format file is what ComfyUI loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn


from .factors import WEIGHT_NAME, ExportError, Factor, LoraFactors
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


def kohya_name(component: str, name: str, sdxl: bool, blocks: dict | None = None, flux: bool = False) -> str:
    """The kohya LoRA name (key prefix) of one layer."""
    if component == "unet":
        if sdxl:
            if blocks is None:
                raise ExportError("kohya SDXL naming needs the UNet layout (layers_per_block, up_block_types); "
                                  "pass the UNet or the base model.")
            name = sgm_unet_name(name, blocks)
        prefix = "lora_unet"
    else:
        prefix = {"text_encoder": "lora_te1" if sdxl or flux else "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{name.replace('.', '_')}"


# FLUX: diffusers module name -> (sd-scripts name, part of the fused layer or None)
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None), "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None), "norm1_context.linear": ("txt_mod_lin", None),
}
_FLUX_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None)}
_FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1",
}  # fmt: skip
_BLOCKS = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def flux_kohya_name(name: str) -> tuple[str, int | None]:
    """diffusers FLUX transformer module name -> (sd-scripts LoRA name, part of a fused layer or None)."""
    m = _BLOCKS.match(name)
    table, prefix = (_FLUX_TOP, "lora_unet") if not m else (
        (_FLUX_DOUBLE, f"lora_unet_double_blocks_{m[2]}") if m[1] == "transformer_blocks" else
        (_FLUX_SINGLE, f"lora_unet_single_blocks_{m[2]}"))
    entry = table.get(m[3] if m else name)
    if entry is None:
        raise ExportError(f"FLUX layer {name!r} has no name in kohya's FLUX layout; leave it out of "
                          "target_modules or export in diffusers format.")
    kohya, part = entry if m else (entry, None)
    return f"{prefix}_{kohya}", part


def _swap_halves(B: torch.Tensor) -> torch.Tensor:
    """diffusers' final AdaLayerNormContinuous emits (scale, shift), BFL's final layer (shift, scale)."""
    first, second = B.chunk(2, dim=0)
    return torch.cat([second, first])


def flux_kohya_tensors(layers: dict[str, Factor]) -> dict[str, torch.Tensor]:
    """The transformer's factors in sd-scripts' FLUX layout. A fused layer (q/k/v, + MLP in single blocks) gets
    down = [A_0; A_1; ...], up = blockdiag(B_0 c_0, B_1 c_1, ...) and alpha = s_0 * (sum of ranks), where
    c_j = s_j / s_0 carries a part's own scaling s_j = alpha_j / r_j: up @ down * alpha / rank = s_j B_j A_j per part.
    A part without LoRA gets a zero block of the others' rank (the MLP part's width is 4 x the hidden size)."""
    fused: dict[str, dict[int, Factor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, f in layers.items():
        key, part = flux_kohya_name(name)
        if part is not None:
            fused.setdefault(key, {})[part] = f
            continue
        if "final_layer" in key:  # diffusers reads these two without their alpha: scale baked in, alpha = rank
            f = Factor(f.A, f.B * f.scaling, float(f.rank))
        tensors[f"{key}.lora_down.weight"] = f.A.contiguous()
        tensors[f"{key}.lora_up.weight"] = (_swap_halves(f.B) if key.endswith("adaLN_modulation_1") else f.B).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(f.alpha))
    for key, parts in fused.items():
        first = parts[min(parts)]
        n = 4 if key.endswith("linear1") else 3
        width = {j: f.B.shape[0] for j, f in parts.items()}
        qkv_width = next((w for j, w in width.items() if j < 3), None)
        if qkv_width is None:  # only the single block's MLP input is adapted
            qkv_width = width[3] // 4
        downs, ups = [], []
        for j in range(n):
            f = parts.get(j)
            if f is None:
                rows = qkv_width * (4 if j == 3 else 1)
                f = Factor(torch.zeros_like(first.A), first.B.new_zeros(rows, first.rank), first.alpha)
            downs.append(f.A)
            ups.append(f.B * (f.scaling / first.scaling))
        tensors[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
        tensors[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(first.scaling * sum(d.shape[0] for d in downs)))
    return tensors


def kohya_metadata(factors: LoraFactors, name: str) -> dict[str, str]:
    """ss_* metadata as sd-scripts writes it (A1111/ComfyUI show it), plus the RefLoRA method."""
    info = factors.info
    flux = factors.family == "flux"
    conv = [f for layers in factors.layers.values() for f in layers.values() if f.A.dim() == 4 and f.A.shape[-1] > 1]
    meta = {
        "ss_network_module": "networks.lora_flux" if flux else "networks.lora",
        "ss_network_dim": str(factors.common("rank")),
        "ss_network_alpha": str(factors.common("alpha")),
        "ss_base_model_version": {"flux": "flux1", "sdxl": "sdxl_base_v1-0", "zimage": "z_image",
                                  "qwenimage": "qwen_image"}.get(factors.family, "sd_v1"),
        "ss_v2": "False",
        "ss_sd_model_name": str(info.get("base_model", "")),
        "ss_steps": str(info.get("steps", "")),
        "ss_output_name": name,
        "ss_network_args": json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": str(conv[0].alpha)}
                                      if conv else {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": {"flux": "flux-1-dev", "sdxl": "stable-diffusion-xl-v1-base", "zimage": "z-image",
                                   "qwenimage": "qwen-image"}.get(factors.family, "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": name,
        "reflora_method": str(info.get("method", "")),
        "reflora_info": json.dumps({**info, "sdxl": factors.sdxl}, sort_keys=True),
        "format": "pt",
    }  # fmt: skip
    return {k: v for k, v in meta.items() if v != ""}


def original_layout_tensors(factors: LoraFactors) -> dict[str, torch.Tensor]:
    """The transformer's LoRA as "diffusion_model.<module>.lora_down/lora_up/alpha" (the layout of LoRAs made for the
    original checkpoints, which diffusers' lora_conversion_utils converts for Z-Image and Qwen-Image)."""
    tensors = {}
    for name, f in factors.layers.get("transformer", {}).items():
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lora_down.weight"] = f.A.contiguous()
        tensors[f"{key}.lora_up.weight"] = f.B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(f.alpha))
    return tensors


def write_kohya(factors: LoraFactors, path: str | Path, overwrite: bool = False) -> Path:
    """Write factors as one kohya-format .safetensors file; returns its path."""
    path = Path(path)
    from reflora_diffusion import families

    family = families.get(factors.family)
    if not family.kohya:
        raise ExportError(f"kohya export covers SD 1.x, SDXL, FLUX, Z-Image and Qwen-Image; for {family.label} use "
                          f"the diffusers file ({WEIGHT_NAME})"
                          + (", which ComfyUI's Load LoRA node reads as is" if family.comfyui_reads_diffusers else ""))
    if family.original_layout:
        return save_safetensors(original_layout_tensors(factors), path, kohya_metadata(factors, path.stem), overwrite)
    blocks = factors.info.get("unet_blocks")
    tensors: dict[str, torch.Tensor] = {}
    for component, layers in factors.layers.items():
        if component == "transformer":
            tensors.update(flux_kohya_tensors(layers))
            continue
        for name, f in layers.items():
            key = kohya_name(component, name, factors.sdxl, blocks, flux=factors.family == "flux")
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
