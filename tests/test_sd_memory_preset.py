"""--memory_preset: the family's memory options in one flag, what the command line gave kept, one line saying what
was set."""

import pytest

from reflora_diffusion.sd.config import ConfigError
from reflora_diffusion.sd.memory import preset_options

from sd_helpers import make_trainer


def test_rungs_add_up_and_large_families_get_a_quantized_base():
    for family in ("sd", "flux"):
        rungs = [preset_options(p, family) for p in ("24gb", "16gb", "12gb")]
        assert all(set(rungs[i]) <= set(rungs[i + 1]) for i in range(2))  # each rung keeps the one above
    assert preset_options("24gb", "flux")["base_model_precision"] == "int8"
    assert preset_options("16gb", "qwenimage")["base_model_precision"] == "nf4"
    assert "base_model_precision" not in preset_options("16gb", "sd")
    assert preset_options("12gb", "sdxl")["base_model_precision"] == "int8"


def test_preset_sets_the_defaults_keeps_given_options_and_says_so(tmp_path, caplog):
    with caplog.at_level("INFO"):
        trainer = make_trainer(tmp_path / "run", pretrained_model_name_or_path="tiny-flux", memory_preset="24gb",
                               max_sequence_length=32, validation_prompt=[], optimizer="sgd")
    cfg = trainer.cfg
    assert cfg.gradient_checkpointing and cfg.cache_latents and cfg.base_model_precision == "int8"
    assert trainer.accelerator.mixed_precision == "bf16" and cfg.optimizer == "sgd"  # the given optimizer stays
    line = next(r.getMessage() for r in caplog.records if "--memory_preset" in r.getMessage())
    assert line.endswith("--memory_preset 24gb for flux: set --gradient_checkpointing true, --cache_latents true, "
                    "--mixed_precision bf16, --base_model_precision int8")
    trainer.train()  # and the run trains with them (int8 base on this CPU)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_unknown_preset_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="--memory_preset must be 24gb, 16gb or 12gb \\(got '8gb'\\)"):
        make_trainer(tmp_path / "x", memory_preset="8gb")
