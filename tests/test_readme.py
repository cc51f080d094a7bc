"""The README as a newcomer uses it: the quick-start job makes what the README lists, the three-line loading
snippet runs, and the example job file is a valid config."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHARED = ROOT.parent / "shared" / "data"


def quick_start_args() -> list[str]:
    line = next(ln for ln in README.splitlines() if "accelerate launch train/sd.py --pretrained_model_name_or_path" in ln)
    return shlex.split(line.split("accelerate launch train/sd.py", 1)[1])


@pytest.fixture(scope="module")
def quick_start_run(tmp_path_factory):
    """The README's main job, as written (only the output folder moved to a temporary place)."""
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "shared").symlink_to(SHARED.parent)  # so "../shared/data/..." resolves from cwd/project
    project = cwd / "project"
    project.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train" / "sd.py"), *quick_start_args()], cwd=project,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return project


def test_quick_start_makes_what_the_readme_lists(quick_start_run):
    run = quick_start_run / "runs" / "dog-reflora"
    for rel in ("pytorch_lora_weights.safetensors", "README.md", "config.json", "events.jsonl",
                "samples/step_200", "samples/step_600", "samples/grid_step_200.png", "samples/grid_step_600.png",
                "checkpoints/checkpoint-300", "checkpoints/checkpoint-600"):
        assert (run / rel).exists(), rel
    import json

    config = json.loads((run / "config.json").read_text())
    assert config["resolution"] == 64 and Path(config["base_model_folder"], "model_index.json").is_file()


def test_loading_snippet_runs(quick_start_run):
    snippet = re.search(r"```python\n(from diffusers import StableDiffusionPipeline\n.*?)```", README, re.S).group(1)
    assert len(snippet.strip().splitlines()) == 3
    code = snippet + "\nimage = pipe('a photo of sks dog', num_inference_steps=2).images[0]\nprint(image.size)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=quick_start_run, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(64, 64)"


def test_quick_start_teaches_the_base_the_subject(quick_start_run):
    """The point of the quick start: with the adapter the base draws the dog photos' subject. Over 6 seeds the
    samples' distance to the nearest training photo falls to <= 0.6 of the base's (measured: ~0.5)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from reflora_diffusion.presets import resolve_pretrained
    from reflora_diffusion.sd.sample import nearest_distance

    args = quick_start_args()
    photos = [Image.open(p) for p in sorted((quick_start_run / args[args.index("--instance_data_dir") + 1]).glob("*.jpg"))]
    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained("tiny-emoji"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def mean_distance():
        images = [pipe("a photo of sks dog", num_inference_steps=25, generator=torch.Generator().manual_seed(s)).images[0]
                  for s in range(6)]
        return sum(nearest_distance(im, photos) for im in images) / len(images)

    base = mean_distance()
    pipe.load_lora_weights(str(quick_start_run / "runs" / "dog-reflora"))
    adapted = mean_distance()
    assert adapted <= 0.6 * base, (adapted, base)


def test_example_job_file_is_a_valid_config_used_by_the_readme(monkeypatch):
    from reflora_diffusion.sd.config import parse_args

    assert "--config examples/job.yaml" in README
    monkeypatch.chdir(ROOT)
    cfg = parse_args(["--config", "examples/job.yaml"])
    assert cfg.method == "reflora" and cfg.checkpointing_steps < cfg.max_train_steps and cfg.validation_prompt
    assert Path(cfg.instance_data_dir).is_dir()
