"""The SD trainer with Adafactor, Prodigy and schedule-free AdamW next to AdamW: each trains with the core's methods
it can run, exports from the right weights, and the pairs that cannot work are refused in one line."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from reflora_diffusion.rundir import read_events
from reflora_diffusion.sd.config import ConfigError

from sd_helpers import make_trainer, train


FLOW = dict(max_sequence_length=32, validation_prompt=[])


@pytest.mark.parametrize("optimizer,method,lr,base", [
    ("adafactor", "reflora-s", 1e-3, "tiny-sd3"), ("adafactor", "reflora", 1e-3, "tiny-flux"),
    ("prodigy", "reflora", 1.0, "tiny-sd3"), ("prodigy", "reflora", 1.0, "tiny"),
    ("schedulefree_adamw", "reflora-s", 1e-3, "tiny"), ("schedulefree_adamw", "reflora", 1e-3, "tiny-flux")])
def test_each_optimizer_trains_with_the_methods_it_can_run(tmp_path, optimizer, method, lr, base):
    run = tmp_path / "run"
    extra = {} if base == "tiny" else {"pretrained_model_name_or_path": base, **FLOW}
    trainer = train(run, optimizer=optimizer, method=method, learning_rate=lr, eval_loss_every=2, **extra)
    inner = trainer.optimizer.optimizer
    assert type(inner).__name__ == {"adafactor": "Adafactor", "prodigy": "Prodigy",
                                    "schedulefree_adamw": "AdamWScheduleFree"}[optimizer]
    events = read_events(run)
    losses = [e["loss"] for e in events if "loss" in e]
    evals = [e["eval_loss"] for e in events if "eval_loss" in e]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses + evals)))
    last = [e for e in events if "refactor" in e][-1]["refactor"]
    if method == "reflora-s":
        assert last["balance_max"] == pytest.approx(1.0, rel=1e-4)
    else:
        assert last["refactored"] == last["layers"]
    if optimizer == "schedulefree_adamw":  # the export holds the averaged (evaluation) point, not the training one
        exported = load_file(str(run / "pytorch_lora_weights.safetensors"))
        component = trainer.components.denoiser_name
        denoiser = trainer.accelerator.unwrap_model(trainer.models[component])
        name, layer = next((n, m) for n, m in denoiser.named_modules() if n.endswith("to_q") and hasattr(m, "lora_A"))
        key = next(k for k in exported if k.startswith(f"{component}.{name}.lora_A"))
        train_point = layer.lora_A["default"].weight.detach().clone()
        with trainer.evaluation_weights():
            eval_point = layer.lora_A["default"].weight.detach().clone()
        assert torch.equal(exported[key], eval_point) and not torch.equal(eval_point, train_point)
        assert inner.param_groups[0]["train_mode"]  # back to training after the export


@pytest.mark.parametrize("options,message", [
    ({"optimizer": "prodigy", "method": "reflora-s"}, "--optimizer prodigy: --method reflora-s rescales the factors"),
    ({"optimizer": "adafactor", "method": "reflora", "reflora_apply_to": "factors"},
     "--optimizer adafactor: --reflora_apply_to factors maps the optimizer state by r x r matrices"),
    ({"optimizer": "schedulefree_adamw", "lr_scheduler": "cosine"},
     "--optimizer schedulefree_adamw replaces the learning-rate schedule .* use --lr_scheduler constant"),
    ({"optimizer": "adamax2"}, "--optimizer 'adamax2' is unknown; use adamw, adamw8bit, adafactor, prodigy"),
])
def test_optimizer_and_method_pairs_that_cannot_work_are_refused_in_one_line(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as e:
        make_trainer(tmp_path / "x", **options).setup()
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_a_missing_optimizer_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    with pytest.raises(ConfigError, match="--optimizer prodigy needs prodigyopt: pip install prodigyopt"):
        make_trainer(tmp_path / "x", optimizer="prodigy", method="lora").setup()
    assert not (tmp_path / "x").exists()  # refused before the run folder is written
