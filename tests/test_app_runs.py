"""Run-folder reading for the app: safe paths, incremental events, status, ETA, samples, log tail."""

import json
import os
import subprocess
import sys
import time

import pytest

from reflora_diffusion.app import runs
from reflora_diffusion.app.runs import RunPathError, safe_path, sanitize_run_name


def make_run(root, name, state="running", step=0, max_steps=10, pid=None, method="reflora", events=()):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"method": method, "max_train_steps": max_steps,
                                               "pretrained_model_name_or_path": "tiny"}))
    now = time.time()
    (d / "status.json").write_text(json.dumps({"state": state, "step": step, "max_steps": max_steps,
                                               "started_at": now - 10, "updated_at": now, "error": None,
                                               "pid": os.getpid() if pid is None else pid}))
    with open(d / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    return d


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("raw,clean", [("my run", "my-run"), ("../../etc/passwd", "etc-passwd"),
                                       ("a/b\\c", "a-b-c"), (".hidden", "hidden"), ("_compare", "compare"),
                                       ("ok_name-1.2", "ok_name-1.2")])
def test_sanitize_run_name(raw, clean):
    assert sanitize_run_name(raw) == clean


@pytest.mark.parametrize("raw", ["", "...", "/", "   "])
def test_sanitize_run_name_rejects_empty(raw):
    with pytest.raises(ValueError, match="no usable characters"):
        sanitize_run_name(raw)


def test_safe_path_blocks_traversal(tmp_path):
    root = tmp_path / "runs"
    (root / "r1" / "samples").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("x")
    assert safe_path(root, "r1", "samples") == (root / "r1" / "samples").resolve()
    for bad in [("..", "secret.txt"), ("r1", "../../secret.txt"), (str(tmp_path / "secret.txt"),),
                ("r1/../../secret.txt",), ("a\x00b",)]:
        with pytest.raises(RunPathError):
            safe_path(root, *bad)
    os.symlink(tmp_path, root / "escape")  # a symlink out of the runs dir is outside too
    with pytest.raises(RunPathError):
        safe_path(root, "escape", "secret.txt")


def test_event_log_reads_incrementally(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    log = runs.EventLog(path).update()
    assert log.steps == [1, 2, 3] and log.losses == [1.0, 0.5, pytest.approx(1 / 3)]
    offset = log.offset
    with open(path, "a") as f:  # the trainer is mid-way through writing a line
        f.write('{"step": 4, "lo')
    log.update()
    assert log.steps == [1, 2, 3] and log.offset == offset
    with open(path, "a") as f:
        f.write('ss": 0.25}\n{"step": 4, "samples": ["samples/step_4/0.png"]}\n{"step": 5, "loss": null}\n')
    log.update()
    assert log.steps == [1, 2, 3, 4] and log.losses[-1] == 0.25  # the NaN (null) loss is no point
    assert [e["step"] for e in log.samples] == [4]
    assert log.offset == path.stat().st_size


def test_event_log_resume_and_rewrite(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3)))
    log = runs.EventLog(path).update()
    with open(path, "a") as f:  # a resumed run logs step 3 again: the later value wins
        f.write(json.dumps({"step": 3, "loss": 30.0}) + "\n")
    assert log.update().losses == [1.0, 2.0, 30.0]
    tmp = tmp_path / "tmp.jsonl"  # the trainer rewrites the file (truncate_after on resume): start over
    tmp.write_text(json.dumps({"step": 1, "loss": 7.0}) + "\n")
    os.replace(tmp, path)
    assert log.update().steps == [1] and log.losses == [7.0]


def test_status_dead_pid_is_failed_and_eta(tmp_path):
    events = [{"step": s, "loss": 1.0, "sec_per_step": 0.5, "refactor": {"balance_mean": 1.5, "step": s}}
              for s in range(1, 11)]
    make_run(tmp_path, "alive", step=10, max_steps=30, events=events)
    make_run(tmp_path, "crashed", step=3, pid=dead_pid())
    alive = runs.read_run(tmp_path, "alive")
    assert alive.state == "running" and alive.progress == pytest.approx(1 / 3)
    assert alive.eta_seconds == pytest.approx(20 * 0.5)  # 20 steps left at the median 0.5 s/step
    crashed = runs.read_run(tmp_path, "crashed")
    assert crashed.state == "failed" and "no longer running" in crashed.error
    assert json.loads((tmp_path / "crashed" / "status.json").read_text())["state"] == "running"  # read-only
    assert runs.balance_stats(tmp_path, "alive") == {"balance_mean": 1.5, "step": 10}


def test_list_runs_finds_cli_runs_and_skips_others(tmp_path):
    make_run(tmp_path, "a", state="done")
    make_run(tmp_path, "b")
    (tmp_path / "_compare" / "x").mkdir(parents=True)
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "file.txt").write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    make_run(outside, "ext")
    os.symlink(outside / "ext", tmp_path / "link")
    assert sorted(r.name for r in runs.list_runs(tmp_path)) == ["a", "b"]
    assert runs.list_runs(tmp_path / "missing") == []
    with pytest.raises(FileNotFoundError):
        runs.read_run(tmp_path, "not-a-run")


def test_samples_only_inside_the_run(tmp_path):
    d = make_run(tmp_path, "r", events=[{"step": 5, "samples": ["samples/step_5/0.png", "../../../etc/passwd"]},
                                        {"step": 10, "samples": ["samples/step_10/0.png", "samples/step_10/1.png"]}])
    for rel in ("samples/step_5/0.png", "samples/step_10/0.png", "samples/step_10/1.png"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(b"png")
    assert runs.sample_steps(tmp_path, "r") == {5: [d / "samples/step_5/0.png"],
                                                10: [d / "samples/step_10/0.png", d / "samples/step_10/1.png"]}
    assert runs.latest_samples(tmp_path, "r") == (10, [d / "samples/step_10/0.png", d / "samples/step_10/1.png"])


def test_log_tail_folds_progress_bars(tmp_path):
    d = make_run(tmp_path, "r")
    (d / "train.log").write_text("start\n" + "".join(f"\r step {i}/50" for i in range(51)) + "\nValueError: bad\n")
    assert runs.log_tail(tmp_path, "r").splitlines() == ["start", " step 50/50", "ValueError: bad"]
    assert runs.log_tail(tmp_path, "r", lines=1) == "ValueError: bad"
    with pytest.raises(RunPathError):
        runs.log_tail(tmp_path, "../r")


def test_format_eta():
    assert [runs.format_eta(s) for s in (None, 5, 65, 3725)] == ["", "5s", "1m05s", "1h02m"]


def test_event_log_reads_eval_loss(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in (
        {"step": 10, "loss": 0.9}, {"step": 10, "eval_loss": 0.8},  # SD-style: a top-level field
        {"step": 20, "eval": {"eval_loss": 0.7, "eval_accuracy": 0.6}},  # the LLM trainers' evaluations
        {"step": 30, "eval": {"eval_accuracy": 0.7}}, {"step": 40, "eval_loss": None})))
    log = runs.EventLog(path).update()
    assert log.steps == [10] and log.eval_steps == [10, 20] and log.eval_losses == [0.8, 0.7]


def llm_run(root, name, config, status, results=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "status.json").write_text(json.dumps({"state": "done", "started_at": 1.0, "updated_at": 2.0, "error": None,
                                               "pid": os.getpid(), **status}))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    return d


def test_llm_run_folders_show_task_model_and_metric(tmp_path):
    """Folders of train/glue.py and train/commonsense.py (train and eval) are not SD runs "?" at step 0/0."""
    llm_run(tmp_path, "sst2", {"task_name": "sst2", "model_name_or_path": "microsoft/deberta-v3-base",
                               "method": "reflora", "lora_r": 8, "max_steps": -1},
            {"step": 300, "max_steps": 300},
            {"task": "sst2", "method": "reflora", "main_metric": "accuracy", "main_value": 0.93125,
             "evals": [{"step": 300, "eval_accuracy": 0.93125}], "final": {"eval_accuracy": 0.93125}})
    llm_run(tmp_path, "cs", {"model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "train_file": "train.json",
                             "method": "lora", "max_steps": -1}, {"step": 40, "max_steps": 40},
            {"method": "lora", "train": {"train_loss": 1.5}, "average": 0.55,
             "datasets": {"boolq": {"accuracy": 0.6, "correct": 6, "total": 10, "complete": True},
                          "piqa": {"accuracy": 0.5, "correct": 5, "total": 10, "complete": True}}})
    llm_run(tmp_path, "cs-eval", {"model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "dataset": "boolq,piqa",
                                  "output_dir": "x", "adapter": "some/where/cs"},
            {"state": "running", "step": 0, "max_steps": None},
            {"config": {}, "datasets": {"boolq": {"accuracy": 0.7, "correct": 7, "total": 10, "complete": True},
                                        "piqa": {"accuracy": 0.5, "correct": 2, "total": 4, "complete": False}}})
    llm_run(tmp_path, "base-eval", {"model_name_or_path": "m", "dataset": "boolq", "output_dir": "y"},
            {"state": "queued", "step": 0, "max_steps": 0})
    glue, cs, ev, base = (runs.read_run(tmp_path, n) for n in ("sst2", "cs", "cs-eval", "base-eval"))
    assert (glue.kind, glue.task, glue.model, glue.method) == ("glue", "GLUE sst2", "microsoft/deberta-v3-base",
                                                                "reflora")
    assert glue.result == "accuracy 0.9313" and glue.steps_text == "300/300"
    assert runs.llm_result("glue", {"main_metric": "matthews_correlation", "main_value": None, "evals": [],
                                    "final": {"eval_matthews_correlation": 0.61}}) == "matthews_correlation 0.6100"
    assert runs.llm_result("glue", {"main_metric": "accuracy", "main_value": 0.8,
                                    "evals": [{"step": 50, "eval_accuracy": 0.8}]}) == "accuracy 0.8000 (step 50)"
    assert (cs.kind, cs.task, cs.method, cs.result) == ("commonsense", "commonsense", "lora",
                                                        "accuracy 0.5500 (mean of 2 sets)")
    assert (ev.kind, ev.task, ev.method) == ("commonsense-eval", "commonsense eval", "lora")  # its adapter's method
    assert ev.result == "boolq accuracy 0.7000; piqa 2/4 so far" and ev.max_steps == 0 and ev.steps_text == ""
    assert (base.method, base.result, base.steps_text) == ("base model", "", "")
    rows = {r[0]: r for r in runs.summary_rows(runs.list_runs(tmp_path))}
    assert rows["sst2"] == ["sst2", "GLUE sst2", "deberta-v3-base", "reflora", "done", "300/300", "", "",
                            "accuracy 0.9313", ""]
    assert rows["cs-eval"][1:6] == ["commonsense eval", "SmolLM2-135M", "lora", "running", ""]
    assert len(runs.SUMMARY_COLUMNS) == len(rows["cs"])
