"""A quantized frozen base (--base_model_precision): torchao int8 weight-only trains SD3 and FLUX with the core's
methods on a CPU, stores the base in fewer bytes, and exports exactly the keys of an unquantized run; what cannot run
here or cannot work is refused in one line before anything is written."""

import math

import pytest
from safetensors.torch import load_file

from reflora_diffusion.rundir import read_events
from reflora_diffusion.sd.config import ConfigError

from sd_helpers import make_trainer, train

FLOW = dict(max_sequence_length=32, validation_steps=4, checkpointing_steps=10, mixed_precision="bf16")


@pytest.mark.parametrize("preset,method", [("tiny-flux", "reflora"), ("tiny-sd3", "reflora-s")])
def test_int8_base_trains_and_exports_the_keys_of_a_full_precision_run(tmp_path, preset, method):
    from torchao.quantization import Int8Tensor

    run = tmp_path / "q"
    trainer = train(run, pretrained_model_name_or_path=preset, method=method, base_model_precision="int8", **FLOW)
    denoiser = trainer.components.denoiser
    assert any(isinstance(p, Int8Tensor) for p in denoiser.parameters())
    assert all(not isinstance(p, Int8Tensor) for p in denoiser.parameters() if p.requires_grad)  # LoRA: float32
    events = read_events(run)
    losses = [e["loss"] for e in events if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    stored = next(e for e in events if "base_weight_bytes" in e)
    full = train(tmp_path / "full", pretrained_model_name_or_path=preset, method=method, **FLOW)
    frozen = [p for p in full.components.denoiser.parameters() if not p.requires_grad]
    assert stored["base_weight_bytes"] < 0.75 * sum(p.numel() for p in frozen) * 2  # vs the same weights in bf16
    last = [e for e in events if "refactor" in e][-1]["refactor"]
    assert last["skipped_nonfinite"] == 0 and (last["refactored"] == last["layers"] or method == "reflora-s")
    a = load_file(str(run / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("options,message", [
    ({"base_model_precision": "int8", "mixed_precision": "no"}, "int8 \\(torchao\\) computes in bf16: add --mixed_precision bf16"),
    ({"base_model_precision": "nf4"}, "nf4 needs bitsandbytes and a CUDA GPU"),
    ({"base_model_precision": "fp8"}, "fp8 needs a CUDA GPU of compute capability >= 8.9"),
    ({"base_model_precision": "int8", "method": "cola"}, "--method cola merges LoRA links into the base weights"),
    ({"base_model_precision": "int4"}, "--base_model_precision must be one of no, int8, fp8, nf4"),
])
def test_what_cannot_run_is_refused_in_one_line_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as e:
        make_trainer(tmp_path / "x", **{"pretrained_model_name_or_path": "tiny-flux", **FLOW, **options})
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
