"""The held-out loss at fixed noise and timesteps (issue 26's instrument): logged as eval_loss in events.jsonl,
identical across methods and training seeds where the weights are (the start), on every model family."""

import pytest

from reflora_diffusion.rundir import read_events
from reflora_diffusion.sd.config import ConfigError, make_config
from sd_helpers import BASE, train

EVAL = dict(validation_prompt=[], checkpointing_steps=1000, max_train_steps=4, eval_loss_every=2, eval_timesteps=3,
            eval_noises=2, learning_rate=1e-3)


def eval_losses(run) -> dict[int, float]:
    return {e["step"]: e["eval_loss"] for e in read_events(run) if "eval_loss" in e}


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "tiny-flux"])
def test_eval_loss_is_logged_and_paired_across_methods_and_seeds(tmp_path, preset):
    runs = {}
    for name, opts in (("lora", {"method": "lora", "seed": 0}), ("reflora", {"method": "reflora", "seed": 1,
                                                                              "refactor_warmup_steps": 1})):
        train(tmp_path / name, pretrained_model_name_or_path=preset, **{**EVAL, **opts})  # (BASE: 64 px)
        runs[name] = eval_losses(tmp_path / name)
        assert list(runs[name]) == [0, 2, 4]
    # at step 0 the adapters change nothing (B = 0): both runs see the same noise, timesteps and weights
    assert runs["lora"][0] == runs["reflora"][0]
    assert runs["lora"][4] != runs["lora"][0]  # training moved it
    # the same run again gives the same numbers (fixed noise, not the training RNG)
    train(tmp_path / "again", pretrained_model_name_or_path=preset, **{**EVAL, "method": "lora", "seed": 0})
    assert eval_losses(tmp_path / "again") == runs["lora"]


def test_eval_data_dir_and_bad_values(tmp_path):
    import shutil

    from sd_helpers import DOG

    held_out = tmp_path / "held"
    held_out.mkdir()
    shutil.copy(sorted(DOG.glob("*.jpg"))[-1], held_out / "x.jpg")
    run = tmp_path / "run"
    train(run, **{**EVAL, "eval_data_dir": str(held_out), "max_train_steps": 2})
    assert list(eval_losses(run)) == [0, 2]
    with pytest.raises(ConfigError, match="--eval_timesteps must be >= 1"):
        make_config({**BASE, "output_dir": str(tmp_path / "o"), "eval_loss_every": 1, "eval_timesteps": 0})
    with pytest.raises(ConfigError, match=r"^--eval_data_dir '.*held' is given but the eval loss is off; add "
                                          r"--eval_loss_every N \(e.g. 100\), or leave out --eval_data_dir$"):
        make_config({**BASE, "output_dir": str(tmp_path / "o"), "eval_data_dir": str(held_out)})
