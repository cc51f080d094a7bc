"""--offload_blocks N: the frozen weights of the denoiser's last N transformer blocks live in CPU memory.

The block swap of the leading trainers (kohya's and musubi-tuner's ``blocks_to_swap``), for training: each swapped
block's frozen weights (the base layers under the LoRA, norms, biases) stay in (pinned) CPU memory and are copied to
the GPU just before the block runs, and dropped again right after it; the LoRA factors, the rest of the denoiser and
the optimizer state stay on the GPU, so the core's hook and the optimizer see the same tensors as without it.

Why gradient checkpointing is required: without it autograd keeps every block's weights for the backward pass, so
nothing could be dropped. With PyTorch's non-reentrant checkpointing a block keeps only its inputs; its backward
recomputes the forward, which onloads the weights again (the recomputed graph holds that copy until the block's
backward is done). ``early_stop=False`` makes the recomputation run the block to its end, so the hook that drops
the weights runs in the backward too.

The copies run on the compute stream (no prefetch yet): each swapped block costs two host-to-device copies of its
frozen weights per step (forward and recomputation). diffusers' group offloading is not used: it moves every
parameter of a group, the trained LoRA factors included, and with streams it restores the CPU copy it made at the
start, which would undo every LoRA update.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .config import ConfigError


def checkpoint_without_early_stop(module: nn.Module, *args):
    """The gradient-checkpointing function diffusers calls per block, recomputing each block to its end."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module.__call__, *args, use_reentrant=False, early_stop=False)


def family_blocks(denoiser: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    """The denoiser's transformer blocks in execution order (the family's block lists, one after the other)."""
    blocks = []
    for name in names:
        blocks.extend(getattr(denoiser, name, None) or [])
    return blocks


class BlockSwap:
    """Keeps the frozen tensors of ``blocks`` on the host and onloads each block around its forward."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per block: (tensor, its host copy)
        self.onloads = 0
        for block in blocks:
            frozen = [t for t in (*block.parameters(), *block.buffers()) if not t.requires_grad]
            held = []
            for t in frozen:
                host = t.data.to("cpu")
                held.append((t, host.pin_memory() if pin else host))
            self.blocks.append(held)
            block.register_forward_pre_hook(functools.partial(self._onload, held))
            block.register_forward_hook(functools.partial(self._offload, held))
        self.swapped = {id(t) for held in self.blocks for t, _ in held}
        for held in self.blocks:  # from now on the block's tensors point at the host copies between uses
            self._offload(held, None, None, None)

    def place(self, model: nn.Module) -> None:
        """Move everything of ``model`` but the swapped tensors to the device (instead of ``model.to(device)``)."""
        for t in (*model.parameters(), *model.buffers()):
            if id(t) not in self.swapped and t.device != self.device:
                t.data = t.data.to(self.device)

    def _onload(self, held, module, args):
        self.onloads += 1
        for t, host in held:  # a copy also on a CPU, so a test sees the same swap a GPU run makes
            t.data = host.to(self.device, non_blocking=True, copy=True)

    def _offload(self, held, module, args, output):
        for t, host in held:
            t.data = host


def check_offload(cfg, family, processes: int) -> None:
    """One-line refusals for --offload_blocks, before the run folder is touched."""
    n = cfg.offload_blocks
    if not n:
        return
    flag = f"--offload_blocks {n}"
    if not family.block_lists:
        raise ConfigError(f"{flag}: the {family.label} UNet has no transformer block list to swap; its weights fit "
                          "a 12 GB card with --memory_preset 12gb (leave --offload_blocks out)")
    if not cfg.gradient_checkpointing:
        raise ConfigError(f"{flag} needs --gradient_checkpointing (without it every block's weights are kept for the "
                          "backward pass, so none could leave the GPU)")
    if cfg.base_model_precision != "no":
        raise ConfigError(f"{flag}: a quantized base (--base_model_precision {cfg.base_model_precision}) is not "
                          "swapped; use one of the two")
    if cfg.method in ("cola", "rac-lora") or cfg.reinit:
        raise ConfigError(f"{flag}: --method {cfg.method}{' --reinit' if cfg.reinit else ''} merges LoRA links into "
                          "the base weights, which live on the host; use another method or leave --offload_blocks out")
    if processes > 1:
        raise ConfigError(f"{flag} is for one GPU; with {processes} processes shard the model instead (FSDP2)")


def attach_block_swap(denoiser: nn.Module, family, count: int, device) -> BlockSwap:
    """Swap the last ``count`` blocks (-1 or more than there are: all) of the family's block lists; checkpoint
    without early stop."""
    blocks = family_blocks(denoiser, family.block_lists)
    chosen = blocks if count < 0 or count >= len(blocks) else blocks[len(blocks) - count:]
    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_without_early_stop)
    swap = BlockSwap(chosen, device)
    swap.place(denoiser)
    host = sum(h.numel() * h.element_size() for held in swap.blocks for _, h in held)
    logging.getLogger(__name__).info(f"--offload_blocks {count}: {len(chosen)} of the {family.label} transformer's "
                                     f"{len(blocks)} blocks keep their frozen weights in CPU memory "
                                     f"({host / 2**30:.2f} GiB)")
    return swap
