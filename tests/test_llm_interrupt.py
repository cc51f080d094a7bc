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
    ("llm/glue.py", ["--task_name", "rte", "--model_name_or_path", "m", "--output_dir", "o"], "run"),
    ("llm/commonsense.py", ["eval", "--model_name_or_path", "m", "--dataset", "boolq", "--output_dir", "o"], None),
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
