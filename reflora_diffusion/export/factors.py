"""LoRA factors in one neutral form, collected from peft models (and a Refactorer) or read from a file.

Every writer works from this form: per component ("unet" or "transformer", "text_encoder", "text_encoder_2") and module
name, the factors A (r x d_in; conv r x C_in x k x k) and B (d_out x r; conv C_out x r x 1 x 1) in peft's
layout and alpha, such that the layer adds alpha / r * B @ A. Writing alpha = scaling * r keeps any
scaling exact (also rsLoRA and chains of rank K*r) in formats that only know alpha and rank.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Pipeline components that can hold LoRA: SD/SDXL's UNet, SD3/FLUX's transformer, the CLIP text encoders
# (SD3: CLIP-L, CLIP-G; T5 never: the pipelines' LoRA loaders have no slot for it).
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name


class ExportError(ValueError):
    """A user-fixable export problem; the message is one line naming the input and the fix."""


@dataclass
class Factor:
    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraFactors:
    layers: dict[str, dict[str, Factor]]  # component -> module name -> factors
    sdxl: bool
    # method, base_model, steps, unet_blocks (layers_per_block, up_block_types: kohya's SDXL names need them)
    info: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """"sd", "sdxl", "sd3" or "flux" (a reflora_diffusion.families name): which pipeline loads the file."""
        return self.info.get("family") or ("sdxl" if self.sdxl else "sd")

    def common(self, attr: str) -> float:
        """The most common rank or alpha (kohya's ss_network_dim / ss_network_alpha)."""
        values = [getattr(f, attr) for layers in self.layers.values() for f in layers.values()]
        return Counter(values).most_common(1)[0][0]


def unet_blocks(config) -> dict:
    """The UNet layout facts kohya's SDXL block numbering depends on."""
    return {"layers_per_block": config.layers_per_block, "up_block_types": list(config.up_block_types)}


def _refactored(refactorer) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """{(id(peft layer), adapter): (A, B, scaling)} from Refactorer.effective_factors() (chains: all links)."""
    if refactorer is None:
        return {}
    out = {}
    for ref in refactorer if isinstance(refactorer, (list, tuple)) else [refactorer]:
        # effective_factors() is built in ref.pairs order; match by layer object, not name, so it works
        # whichever model (UNet, text encoder, a container of both) the Refactorer was made on.
        for pair, (A, B, scaling) in zip(ref.pairs, ref.effective_factors().values()):
            out[id(pair.module), pair.adapter] = (*_drop_zero_links(A, B, pair.rank), scaling)
    return out


def _drop_zero_links(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave out chain links that add exactly nothing (e.g. the fresh link, B = 0, right after a merge)."""
    keep = [k for k in range(0, A.shape[0], r) if A[k:k + r].any() and B[:, k:k + r].any()]
    if len(keep) in (0, A.shape[0] // r):
        return A, B
    return torch.cat([A[k:k + r] for k in keep]), torch.cat([B[:, k:k + r] for k in keep], dim=1)


def _bare(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    from reflora_diffusion.core import unwrap_model

    model = unwrap_model(model)
    if isinstance(model, PeftModel):  # names as in the bare model, as diffusers expects
        model = model.base_model.model
    return model


def _canonical_prefix(component: str, model: nn.Module) -> str:
    """"text_model." for a CLIP text encoder without that level: transformers 5 flattened CLIPTextModel,
    but kohya/A1111/ComfyUI files and older transformers name its layers text_model.encoder.layers.N..."""
    if component.startswith("text_encoder") and not hasattr(model, "text_model") and hasattr(model, "encoder"):
        return "text_model."
    return ""


def _lora_pairs(model: nn.Module, adapter: str | None):
    """The core's pairs of every LoRA layer (frozen ones too), one adapter per layer (the first active one)."""
    from reflora_diffusion.core import find_lora_pairs

    seen = set()
    for pair in find_lora_pairs(model, adapter, trainable_only=False):
        if pair.kind == "embedding":
            raise ExportError(f"layer {pair.name!r} has an embedding LoRA, which diffusers/kohya SD files "
                              "cannot hold; leave embeddings out of target_modules.")
        if pair.name not in seen:
            seen.add(pair.name)
            yield pair


def collect_factors(unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
                    text_encoder_2: nn.Module | None = None, refactorer=None, adapter: str | None = None,
                    transformer: nn.Module | None = None) -> dict[str, dict[str, Factor]]:
    """Factors of every LoRA layer of the given models; a Refactorer (or a list) supplies chain factors.

    Text-encoder layers get their portable names (text_model.encoder.layers.N...) whatever the installed
    transformers calls them."""
    refactored = _refactored(refactorer)
    layers: dict[str, dict[str, Factor]] = {}
    models = {"unet": unet, "transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for component, model in models.items():
        if model is None:
            continue
        model = _bare(model)
        prefix = _canonical_prefix(component, model)
        found = {}
        for pair in _lora_pairs(model, adapter):
            module, ad = pair.module, pair.adapter
            if module.use_dora.get(ad, False) or getattr(module, "lora_bias", {}).get(ad, False):
                raise ExportError(f"layer {pair.name!r} uses DoRA or a LoRA bias, which kohya/A1111 files cannot "
                                  "hold; export works for plain LoRA layers.")
            A, B, scaling = refactored.get((id(module), ad), (pair.A, pair.B, pair.scaling))
            A = A.detach().float().cpu().contiguous()
            found[prefix + pair.name] = Factor(A, B.detach().float().cpu().contiguous(), float(scaling) * A.shape[0])
        if found:
            layers[component] = found
    if not layers:
        raise ExportError("no LoRA layers found in the given models; add adapters (unet.add_adapter(LoraConfig("
                          "...))) before exporting.")
    return layers


def factors_from_models(unet, text_encoder, text_encoder_2, refactorer=None, adapter=None, sdxl=None,
                        info=None, transformer=None) -> LoraFactors:
    """LoraFactors of trained models, with the UNet layout facts kohya's names need; SDXL (or, from the
    transformer's class, SD3/FLUX) detected if not given."""
    from reflora_diffusion.core import unwrap_model

    unet = unwrap_model(unet) if unet is not None else None
    layers = collect_factors(unet, text_encoder, text_encoder_2, refactorer, adapter, transformer)
    info = dict(info or {})
    if transformer is not None:
        from reflora_diffusion.families import FAMILIES

        cls = type(_bare(transformer)).__name__
        info.setdefault("family", next(f.name for f in FAMILIES.values() if f.denoiser_class == cls))
        sdxl = False
    if sdxl is None:
        sdxl = text_encoder_2 is not None or (
            unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time")
    if unet is not None:
        info.setdefault("unet_blocks", unet_blocks(unet.config))
    return LoraFactors(layers, bool(sdxl), info)


# ---- reading a diffusers file back ---------------------------------------------------------------------

_SUFFIXES = {  # the key spellings diffusers' save_lora_weights writes (peft and its "diffusers" renaming)
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora.down.weight": "A", ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B",
}  # fmt: skip


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_diffusers(path: str | Path) -> LoraFactors:
    """Read a diffusers-format LoRA file (as written by export_diffusers) into factors."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
        meta = read_metadata(path)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ExportError(f"{path} is not a readable safetensors file ({e}); re-export it from the run.") from e
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        if component not in COMPONENTS or suffix is None:
            raise ExportError(f"{path} is not a diffusers LoRA file (unexpected key {key!r}); give the "
                              f"{WEIGHT_NAME} of a run or checkpoint.")
        parts.setdefault(component, {}).setdefault(rest[: -len(suffix)], {})[_SUFFIXES[suffix]] = t
    config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    layers = {}
    for component, modules in parts.items():
        cfg = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(component + ".")}
        layers[component] = {}
        for name, ab in modules.items():
            if ab.keys() != {"A", "B"}:
                raise ExportError(f"{path}: layer {component}.{name} lacks its lora_A or lora_B tensor; "
                                  "re-export it from the run.")
            r = ab["A"].shape[0]
            alpha = r  # diffusers' convention without metadata: scale 1
            if cfg:  # peft's LoraConfig semantics: alpha_pattern overrides lora_alpha
                pattern = get_pattern_key(cfg.get("alpha_pattern", {}).keys(), name)
                alpha = cfg.get("alpha_pattern", {}).get(pattern, cfg.get("lora_alpha", r))
                if cfg.get("use_rslora"):
                    alpha = alpha / r**0.5 * r  # rsLoRA scales by alpha / sqrt(r)
            layers[component][name] = Factor(ab["A"].float(), ab["B"].float(), float(alpha))
    info = json.loads(meta.get("reflora_info", "{}"))
    from reflora_diffusion.families import FAMILIES

    family = FAMILIES.get(info.get("family", ""))
    flows = "transformer" in layers or (family is not None and family.flow)  # SD3 has a text_encoder_2 too
    sdxl = not flows and ("text_encoder_2" in layers or bool(info.get("sdxl")))
    return LoraFactors(layers, sdxl, info)
