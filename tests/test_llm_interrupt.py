"""Ctrl-C in the LLM trainers is one line and exit code 130, like the SD trainer (issue 24)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(script: str):
    spec = importlib.util.spec_from_file_location(script.replace("/", "_")[:-3], ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("script, argv, target", [
    ("train/glue.py", ["--task_name", "rte", "--model_name_or_path", "m", "--output_dir", "o"], "run"),
    ("train/commonsense.py", ["eval", "--model_name_or_path", "m", "--dataset", "boolq", "--output_dir", "o"], None),
])
def test_ctrl_c_is_one_line_and_exit_130(script, argv, target, monkeypatch, capsys):
    module = load(script)
    if target:
        monkeypatch.setattr(module, target, interrupt)
    else:
        import reflora_diffusion.llm.commonsense_run as run

        monkeypatch.setattr(run, "run_eval", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("old, new", [("llm/glue.py", "train/glue.py"), ("llm/commonsense.py", "train/commonsense.py")])
def test_the_old_entry_paths_still_run_the_trainers(old, new):
    """llm/*.py moved to train/ beside train/sd.py; the old commands keep working (same flags, same errors)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    argv = ["--task_name", "nope", "--model_name_or_path", "m", "--output_dir", "o"] if "glue" in old else []
    runs = [subprocess.run([sys.executable, str(repo / p), *argv], capture_output=True, text=True, cwd=repo,
                           timeout=120) for p in (old, new)]
    assert runs[0].returncode == runs[1].returncode != 0
    assert runs[0].stdout + runs[0].stderr.splitlines()[-1] == runs[1].stdout + runs[1].stderr.splitlines()[-1]
