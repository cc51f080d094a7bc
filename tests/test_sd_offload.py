"""--offload_blocks: the frozen weights of the last N transformer blocks live on the host and are copied in only while
their block runs (forward, and the recomputation in the backward); training is unchanged by it: the same losses and
the same LoRA factors as the run without it, the factors never leave the device, the export has the same keys. What
cannot work is refused in one line before anything is written."""

import math

import pytest
import torch
from safetensors.torch import load_file

from reflora_diffusion.sd.config import ConfigError
from reflora_diffusion.sd.offload import family_blocks

from sd_helpers import losses, make_trainer, train

FLOW = dict(max_sequence_length=32, validation_steps=10, checkpointing_steps=10, max_train_steps=4,
            gradient_checkpointing=True)


@pytest.mark.parametrize("preset,method", [("tiny-flux", "reflora"), ("tiny-sd3", "reflora-s")])
def test_swapped_blocks_train_exactly_like_resident_ones(tmp_path, preset, method):
    train(tmp_path / "plain", pretrained_model_name_or_path=preset, method=method, **FLOW)
    swapped = train(tmp_path / "swap", pretrained_model_name_or_path=preset, method=method, offload_blocks=2, **FLOW)
    swap = swapped.components.block_swap
    denoiser = swapped.components.denoiser
    blocks = family_blocks(denoiser, swapped.components.family.block_lists)
    assert len(swap.blocks) == 2
    # each swapped block came in for its forward and again for the recomputation in the backward, at every step
    # (the validation at step 4 adds its own forwards)
    assert swap.onloads >= 2 * 2 * 4
    # between uses the frozen weights are the host copies; the LoRA factors are never swapped
    for block, held in zip(blocks[-2:], swap.blocks):
        frozen = [p for p in block.parameters() if not p.requires_grad]
        assert len(held) >= len(frozen) > 0
        assert all(t.untyped_storage().data_ptr() == host.untyped_storage().data_ptr() for t, host in held)
        assert all(id(p) not in swap.swapped for p in block.parameters() if p.requires_grad)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "swap")
    assert a.keys() == b.keys() and len(a) == 4 and all(math.isfinite(v) for v in a.values())
    # equal up to float rounding: a block's weights are fresh copies each time, and the CPU's matmul kernels may
    # round differently for differently aligned memory (FLUX here is bitwise equal, SD3 within 1e-7 relative)
    assert all(math.isclose(a[k], b[k], rel_tol=1e-5) for k in a), (a, b)
    ea = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    eb = load_file(str(tmp_path / "swap" / "pytorch_lora_weights.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.allclose(ea[k], eb[k], rtol=1e-4, atol=1e-7) for k in ea)
    assert any("lora_B" in k and eb[k].abs().max() > 0 for k in eb)  # (it trained: B starts at zero)


@pytest.mark.parametrize("preset,options,message", [
    ("tiny-flux", {"gradient_checkpointing": False}, "needs --gradient_checkpointing"),
    ("tiny-flux", {"method": "cola"}, "--method cola merges LoRA links into the base weights"),
    ("tiny-flux", {"offload_blocks": -2}, "--offload_blocks must be a block count, or -1 for all"),
    ("tiny-sd", {}, "UNet has no transformer block list to swap"),
])
def test_what_cannot_be_swapped_is_refused_in_one_line(tmp_path, preset, options, message):
    opts = {**FLOW, "offload_blocks": 2, **options}
    with pytest.raises(ConfigError, match=message) as e:
        make_trainer(tmp_path / "x", pretrained_model_name_or_path=preset, **opts)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


class _Blocks(torch.nn.Module):
    """Checkpointed blocks, each a frozen linear layer plus a trained one, called the way diffusers calls them."""

    def __init__(self, checkpoint_fn):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
                                          for _ in range(3))
        for b in self.blocks:
            b[0].requires_grad_(False)
        self.checkpoint_fn = checkpoint_fn

    def forward(self, x):
        for b in self.blocks:
            x = self.checkpoint_fn(b, x).tanh()
        return x


@pytest.mark.parametrize("early_stop", [False, True])
def test_the_recomputation_in_the_backward_drops_the_weights_again(early_stop):
    """After the backward no swapped block holds a device copy; PyTorch's default early stop would leave the last
    recomputed block's weights onloaded (its forward hook never runs), which is why the swap turns it off."""
    from torch.utils.checkpoint import checkpoint

    from reflora_diffusion.sd.offload import BlockSwap, checkpoint_without_early_stop

    fn = checkpoint_without_early_stop if not early_stop else (
        lambda m, *a: checkpoint(m.__call__, *a, use_reentrant=False))
    model = _Blocks(fn)
    swap = BlockSwap(list(model.blocks), torch.device("cpu"))
    x = torch.randn(4, 8)
    model(x).square().sum().backward()
    assert swap.onloads == 6  # 3 forwards, 3 recomputations
    onloaded = [t for held in swap.blocks for t, host in held
                if t.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()]
    assert (len(onloaded) > 0) == early_stop
    assert all(p.grad is not None for b in model.blocks for p in b[1].parameters())
