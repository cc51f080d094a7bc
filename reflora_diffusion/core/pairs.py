"""Finding the (A, B) factor pairs of peft LoRA layers.

Orientation is peft's (docs/methods.md): ``A`` is r x d_in, ``B`` is d_out x r and the adapter adds
``scaling * B @ A``. Conv factors are viewed as matrices: A as r x (C_in * k * k), B as C_out x r.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(eq=False)
class LoraPair:
    """One LoRA factor pair of one adapter in one layer.

    ``A`` and ``B`` are looked up in the layer on every access, so a pair follows parameters that a wrapper
    replaces after the pair was found (FSDP2's ``fully_shard`` swaps them for sharded DTensor parameters).
    """

    name: str  # module name as in model.named_modules() (wrappers such as DDP unwrapped)
    scaling: float
    kind: str  # "linear" | "conv" | "embedding"
    module: nn.Module  # the peft LoraLayer
    adapter: str

    @property
    def A(self) -> nn.Parameter:
        if self.kind == "embedding":
            return self.module.lora_embedding_A[self.adapter]
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:
        if self.kind == "embedding":
            return self.module.lora_embedding_B[self.adapter]
        return self.module.lora_B[self.adapter].weight

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.A.shape[1:])  # the global shape, also for a sharded DTensor

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    def a_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """View a tensor shaped like A (weight or grad) as r x d_in (also a shard with no rows)."""
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))

    def b_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """View a tensor shaped like B as d_out x r (conv B is C_out x r x 1 x 1)."""
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP / torch.compile wrappers so module names match the bare model."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def _active_adapters(module: nn.Module, adapter: str | None) -> list[str]:
    if adapter is not None:
        return [adapter]
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def find_lora_pairs(model: nn.Module, adapter: str | None = None, trainable_only: bool = True) -> list[LoraPair]:
    """Return the (A, B) pairs of every active peft LoRA layer of ``model``.

    Works on a ``PeftModel``, a ``LoraModel`` and a plain model given adapters with
    ``add_adapter`` (diffusers' UNet and text encoders). Pairs whose factors are both frozen are
    left out unless ``trainable_only=False`` (export). Grouped convolutions are skipped with a warning
    (their LoRA is not one matrix product).
    """
    from peft.tuners.lora import LoraLayer

    model = unwrap_model(model)
    pairs: list[LoraPair] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for ad in _active_adapters(module, adapter):
            if ad in getattr(module, "lora_A", {}):
                lora_a, lora_b = module.lora_A[ad], module.lora_B[ad]
                if isinstance(lora_a, nn.Linear):
                    kind = "linear"
                elif isinstance(lora_a, nn.modules.conv._ConvNd):
                    if getattr(module.get_base_layer(), "groups", 1) > 1:
                        warnings.warn(f"find_lora_pairs: skipping grouped conv LoRA layer {name!r}; "
                                      "its update is not a single low-rank product.", stacklevel=2)
                        continue
                    kind = "conv"
                else:
                    raise TypeError(
                        f"LoRA layer {name!r} has an unsupported factor type {type(lora_a).__name__}; "
                        "only Linear, Conv and Embedding LoRA can be refactored: leave this module out of "
                        "target_modules or use method='lora'.")
                A, B = lora_a.weight, lora_b.weight
            elif ad in getattr(module, "lora_embedding_A", {}):
                kind = "embedding"
                A, B = module.lora_embedding_A[ad], module.lora_embedding_B[ad]
            else:
                continue
            if trainable_only and not (A.requires_grad or B.requires_grad):
                continue
            pairs.append(LoraPair(name=name, scaling=float(module.scaling[ad]), kind=kind,
                                  module=module, adapter=ad))
    return pairs
