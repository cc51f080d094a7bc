"""What the SD trainer's tests share: the data, the small default run, and in-process trainers."""

from pathlib import Path

from reflora_diffusion.rundir import read_events
from reflora_diffusion.sd.config import make_config
from reflora_diffusion.sd.train import SDTrainer

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
DOG = SHARED / "data" / "dreambooth" / "dog"
PROMPT = "a photo of sks dog"
BASE = dict(pretrained_model_name_or_path="tiny", instance_data_dir=str(DOG), instance_prompt=PROMPT,
            resolution=64, rank=4, seed=0, max_train_steps=4, refactor_warmup_steps=2, checkpointing_steps=2,
            validation_prompt=[PROMPT], validation_steps=2, num_validation_images=1, validation_inference_steps=2)


def reset_accelerate():
    """Runs are in-process: accelerate's singletons are reset between them (SDTrainer.in_process does it too)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_trainer(out: Path, **overrides) -> SDTrainer:
    trainer = SDTrainer.in_process(make_config({**BASE, "output_dir": str(out), **overrides}))
    trainer.setup()
    return trainer


def train(out: Path, **overrides) -> SDTrainer:
    trainer = make_trainer(out, **overrides)
    trainer.train()
    return trainer


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run) if "loss" in e}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The command line in-process: (exit code, the last line on stderr)."""
    from reflora_diffusion.sd.cli import main

    reset_accelerate()
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()  # progress bars and library notices come first
    return code, lines[-1] if lines else ""
