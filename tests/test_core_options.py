"""Method options are declared once (core.options.MethodOptions) and drive both trainers' command lines."""

import dataclasses

import pytest

from reflora_diffusion.core import METHODS, MethodOptions


def test_every_declared_method_option_has_a_flag_and_a_home():
    declared = {name for cls in METHODS.values() for name in cls.options} - {"seed"}  # seeds come from the run
    from reflora_diffusion.core.options import CORE_NAMES

    assert set(CORE_NAMES) == {f.name for f in dataclasses.fields(MethodOptions)} - {"method"}
    assert declared <= set(CORE_NAMES.values()), declared - set(CORE_NAMES.values())
    help_ratio = next(f for f in dataclasses.fields(MethodOptions) if f.name == "loraplus_lr_ratio").metadata["help"]
    assert "(lora+; default 16.0)" in help_ratio


def test_one_check_for_method_and_options():
    assert MethodOptions(method="rac-lora", chain_every=5, rac_p=0.5).method_options() == {
        "warmup_steps": 100, "interval": 1, "chain_every": 5, "p": 0.5}
    with pytest.raises(ValueError, match=r"--method reflora: unknown option --rac_p \(an option of rac-lora\)"):
        MethodOptions(method="reflora", rac_p=0.5)
    with pytest.raises(ValueError, match="--method 'relora' is unknown"):
        MethodOptions(method="relora")
    with pytest.raises(ValueError, match="--refactor_interval >= 1"):
        MethodOptions(refactor_interval=0)


def test_both_command_lines_take_the_same_names_and_the_old_ones_with_a_warning(tmp_path):
    from reflora_diffusion.llm.trainer import MethodArguments, parse_hf_args
    from reflora_diffusion.sd.config import SDTrainConfig, parse_args

    sd_fields = {f.name for f in dataclasses.fields(SDTrainConfig)}
    llm_fields = {f.name for f in dataclasses.fields(MethodArguments)}
    assert llm_fields <= sd_fields
    common = ["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(tmp_path), "--instance_prompt",
              "p", "--output_dir", str(tmp_path / "o")]
    cfg = parse_args(common + ["--method", "lora+", "--loraplus_lr_ratio", "4", "--refactor_warmup_steps", "7"])
    assert cfg.method_options() == {"warmup_steps": 7, "interval": 1, "ratio": 4.0}
    with pytest.warns(FutureWarning, match="--warmup_steps is deprecated; use --refactor_warmup_steps"):
        old = parse_args(common + ["--method", "reflora", "--warmup_steps", "7", "--normalize"])
    assert old.method_options() == {"warmup_steps": 7, "interval": 1, "normalize": True}
    (args,), _ = parse_hf_args((MethodArguments,), ["--method", "lora+", "--loraplus_lr_ratio", "4"])
    assert args.method_options() == {"warmup_steps": 100, "interval": 1, "ratio": 4.0}
    with pytest.warns(FutureWarning, match="--ratio is deprecated; use --loraplus_lr_ratio"):
        (args,), given = parse_hf_args((MethodArguments,), ["--method", "lora+", "--ratio", "4"])
    assert args.loraplus_lr_ratio == 4 and "loraplus_lr_ratio" in given
