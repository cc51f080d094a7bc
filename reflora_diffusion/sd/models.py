"""Base model components (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1), frozen, with peft LoRA adapters added.

Everything loads through `from_pretrained`, so a hub id, a local diffusers folder and the offline presets
("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", built by `presets.resolve_pretrained`) take the same path.
The denoiser is the UNet (SD, SDXL) or the transformer (SD3, FLUX); what differs per family is in
reflora_diffusion.families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError
from reflora_diffusion.families import TEXT_ENCODERS, Family, family_of
from reflora_diffusion.presets import resolve_pretrained


@dataclass
class Components:
    path: str  # local folder or hub id actually loaded
    family: Family  # reflora_diffusion.families
    tokenizers: list
    text_encoders: list[nn.Module]
    vae: nn.Module
    denoiser: nn.Module  # UNet or transformer
    noise_scheduler: object
    block_swap: object = None  # offload.BlockSwap with --offload_blocks

    @property
    def sdxl(self) -> bool:
        return self.family.name == "sdxl"

    @property
    def flow(self) -> bool:
        return self.family.flow

    @property
    def denoiser_name(self) -> str:
        return self.family.denoiser_folder

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    @property
    def lora_text_encoders(self) -> list[nn.Module]:
        """The text encoders --train_text_encoder adapts: all CLIP encoders, never T5."""
        return self.text_encoders[: self.family.lora_text_encoders]

    @property
    def models(self) -> dict[str, nn.Module]:
        """Trainable-capable models by their pipeline name (unet/transformer, text_encoder, ...)."""
        return {self.denoiser_name: self.denoiser, **dict(zip(TEXT_ENCODERS, self.text_encoders))}


def _text_encoder_class(path: str, subfolder: str, revision):
    # SD 1.x/2.x use CLIPTextModel, SDXL's second encoder CLIPTextModelWithProjection: read it from the config.
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, subfolder=subfolder, revision=revision)
    return getattr(transformers, config.architectures[0])


def quantization_config(cfg, weight_dtype: torch.dtype, device: torch.device):
    """diffusers' quantization config for --base_model_precision, or None; one-line errors where it cannot run."""
    import importlib.util

    precision = cfg.base_model_precision
    if precision == "no":
        return None
    flag = f"--base_model_precision {precision}"
    if precision in ("int8", "fp8"):
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(f"{flag} needs torchao: pip install torchao (or 'reflora-diffusion[quantization]')")
        if weight_dtype != torch.bfloat16:
            raise ConfigError(f"{flag} (torchao) computes in bf16: add --mixed_precision bf16")
        if precision == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
            raise ConfigError(f"{flag} needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); use "
                              "--base_model_precision int8 here")
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig() if precision == "int8" else Float8WeightOnlyConfig())
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{flag} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes, or use "
                          "--base_model_precision int8")
    if weight_dtype == torch.float32:
        raise ConfigError(f"{flag} computes in the mixed-precision dtype: add --mixed_precision bf16 (or fp16)")
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=weight_dtype)


def load_components(cfg, weight_dtype: torch.dtype = torch.float32, device=torch.device("cpu")) -> Components:
    """Tokenizers, text encoders, VAE, denoiser and the training scheduler (DDPM, or flow matching for SD3 and
    FLUX); all frozen."""
    import diffusers
    from transformers import AutoTokenizer

    path = resolve_pretrained(cfg.pretrained_model_name_or_path)
    family = family_of(path)
    kw = {"revision": cfg.revision}
    try:
        encoders = family.text_encoder_names
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=e.replace("text_encoder", "tokenizer"), **kw)
                      for e in encoders]
        text_encoders = [_text_encoder_class(path, e, cfg.revision).from_pretrained(
            path, subfolder=e, variant=cfg.variant, **kw) for e in encoders]
        vae = getattr(diffusers, family.vae_class).from_pretrained(path, subfolder="vae", variant=cfg.variant, **kw)
        quant = quantization_config(cfg, weight_dtype, device)
        quant_kw = {"quantization_config": quant, "torch_dtype": weight_dtype} if quant is not None else {}
        denoiser = getattr(diffusers, family.denoiser_class).from_pretrained(
            path, subfolder=family.denoiser_folder, variant=cfg.variant, **kw, **quant_kw)
        noise_scheduler = family.scheduler_class().from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load base model {cfg.pretrained_model_name_or_path!r}: "
                          f"{str(e).strip().splitlines()[0]} (use a local diffusers folder, a hub id "
                          "reachable online, or 'tiny')") from None
    if cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    if family.default_max_sequence_length:  # T5's training length (--max_sequence_length)
        tokenizers[-1].model_max_length = cfg.max_sequence_length or family.default_max_sequence_length
    for m in (vae, denoiser, *text_encoders):
        m.requires_grad_(False)
    return Components(path, family, tokenizers, text_encoders, vae, denoiser, noise_scheduler)


# --- LoRA --------------------------------------------------------------------------------------------------
def _factor_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a layer as LoRA factors see it, or None if peft cannot adapt it."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):  # A: r x (C_in * k * k), B: C_out x r
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels
    return None


def check_targets(model: nn.Module, targets: list[str], rank: int, what: str) -> None:
    """Every target name matches a Linear/Conv2d layer (peft's own matching rule) and the rank fits each one."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = dict(model.named_modules())
    for target in targets:
        one = LoraConfig(target_modules=[target])
        hits = {n: m for n, m in modules.items() if n and check_target_module_exists(one, n)}
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _factor_dims(m)})
            raise ConfigError(f"target module {target!r} matches no layer of the {what}; layer names there "
                              f"include {', '.join(leaves[:12])}")
        for name, module in hits.items():
            dims = _factor_dims(module)
            if dims is None:
                raise ConfigError(f"target module {target!r} matches {what} module {name!r}, a "
                                  f"{type(module).__name__} rather than a Linear/Conv2d layer; name its layers "
                                  "(e.g. to_q, to_k, to_v, to_out.0)")
            if rank > min(dims):
                raise ConfigError(f"--rank {rank} is larger than {what} layer {name!r} allows (min(d_in, d_out) = "
                                  f"{min(dims)}); use --rank {min(dims)} or less, or leave {target!r} out")


def add_lora_adapter(model: nn.Module, targets: list[str], cfg, what: str) -> None:
    """Add a peft LoRA adapter ("default") to `model` in place (diffusers' add_adapter / transformers')."""
    from peft import LoraConfig

    check_targets(model, targets, cfg.rank, what)
    model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                                 init_lora_weights="gaussian", target_modules=targets))


def prepare_for_training(components: Components, cfg, weight_dtype: torch.dtype, device) -> None:
    """Add the adapters, place and cast the models, choose the attention kernel."""
    denoiser = components.denoiser
    targets = cfg.denoiser_targets(components.family.default_targets(denoiser))
    add_lora_adapter(denoiser, targets, cfg, "transformer" if components.flow else "UNet")
    if cfg.train_text_encoder:
        for i, te in enumerate(components.lora_text_encoders):
            add_lora_adapter(te, cfg.text_encoder_target_modules, cfg, f"text encoder {i + 1}")
    # Frozen weights in the compute dtype; LoRA parameters stay fp32 so small updates are not rounded away.
    vae_dtype = components.family.vae_dtype(weight_dtype)
    swapped = cfg.offload_blocks != 0
    for m in (components.vae, *components.models.values()):  # (T5 too: bf16 on a GPU)
        if getattr(m, "is_quantized", False):  # loaded in its compute dtype; bitsandbytes places itself
            if cfg.base_model_precision != "nf4":
                m.to(device)
            continue
        dtype = vae_dtype if m is components.vae else weight_dtype
        place = {} if swapped and m is denoiser else {"device": device}  # (swapped: placed block by block below)
        cast = {"dtype": dtype} if dtype != torch.float32 else {}  # (diffusers warns on a no-op dtype cast)
        if place or cast:  # one pass, tensor by tensor: a bf16 run never holds the fp32 base on the device
            m.to(**place, **cast)
    from diffusers.training_utils import cast_training_params

    cast_training_params(list(components.models.values()), torch.float32)
    if swapped:  # also turns on the denoiser's checkpointing (recomputing each block to its end)
        from .offload import attach_block_swap

        components.block_swap = attach_block_swap(denoiser, components.family, cfg.offload_blocks, device)
    if cfg.gradient_checkpointing:
        if not swapped:
            denoiser.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in components.lora_text_encoders:
                te.gradient_checkpointing_enable()
    if cfg.enable_xformers_memory_efficient_attention:
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers, "
                              "or drop the flag (PyTorch SDPA attention is used by default)")
        denoiser.enable_xformers_memory_efficient_attention()


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies: a quantized tensor subclass (torchao) through its inner tensors (codes, scales)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
