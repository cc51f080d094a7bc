"""Job runner: uploads, run folders, launching, queueing, crashes, cancel, app restart.

A small stand-in trainer (same run-folder contract as train/sd.py: status.json, events.jsonl,
samples) makes these fast; test_app_train.py runs the real trainer through the same runner.
"""

import html
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from reflora_diffusion import cpu, rundir
from reflora_diffusion.app import jobs, runs
from reflora_diffusion.app.jobs import JobError, JobRunner
from reflora_diffusion.app.views import AppViews

FAKE_TRAINER = r'''
import json, os, sys, time
from pathlib import Path
cfg_path, mode = sys.argv[2], sys.argv[3]
cfg = json.loads(Path(cfg_path).read_text())
out = Path(cfg["output_dir"]); steps = cfg["max_train_steps"]
if mode == "die_early":
    print("Traceback (most recent call last):\nValueError: --rank 999 is larger than layer to_q allows", flush=True)
    sys.exit(1)
if mode == "user_error":  # the SD trainer's contract for an error the user can fix: one line on stderr, exit 2
    print("error: --instance_data_dir '/data/x' holds no images (.jpg, .png); add some or fix the path",
          file=sys.stderr, flush=True)
    sys.exit(2)
def status(**kw):
    st = {"state": "running", "step": 0, "max_steps": steps, "started_at": t0, "updated_at": time.time(),
          "error": None, "pid": os.getpid()}; st.update(kw)
    tmp = out / ".status.tmp"; tmp.write_text(json.dumps(st)); os.replace(tmp, out / "status.json")
t0 = time.time(); status()
print("training", cfg["method"], "OMP_NUM_THREADS=%s" % os.environ.get("OMP_NUM_THREADS"),
      "CUDA_VISIBLE_DEVICES=%s" % os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
for step in range(1, steps + 1):
    time.sleep(0.02)
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-4, "sec_per_step": 0.02, "time": time.time(),
                            "refactor": {"step": step, "balance_mean": 1.0}}) + "\n")
    status(step=step)
    if mode == "crash" and step == 3:
        raise RuntimeError("boom at step 3")
    if mode == "hang" and step == 2:
        while True:
            time.sleep(0.1)
if mode == "silent_exit":
    sys.exit(0)
status(step=steps, state="done")
'''


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)

    def command(mode="ok"):
        return lambda cfg: [sys.executable, str(script), "--config", str(cfg), mode]
    return command


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, fmt in enumerate(["PNG", "JPEG"]):
        p = tmp_path / f"img{i}.{fmt.lower()}"
        Image.new("RGB", (16, 16), (i * 100, 50, 50)).save(p, format=fmt)
        paths.append(p)
    return paths


FORM = {"pretrained_model_name_or_path": "tiny", "instance_prompt": "a photo of sks dog", "method": "reflora",
        "rank": 4, "max_train_steps": 5, "resolution": 64, "seed": 3}


def runner(tmp_path, command, **kw):
    return JobRunner(tmp_path / "runs", command=command, **kw)


# ---------------------------------------------------------------------------- uploads and config


def test_check_image_rejects_bad_uploads(tmp_path, images):
    assert jobs.check_image(images[0]) == "PNG" and jobs.check_image(images[1]) == "JPEG"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(JobError, match="'notes.png' is not a readable image"):
        jobs.check_image(text)
    truncated = tmp_path / "cut.jpg"
    big = tmp_path / "big.jpg"
    Image.effect_noise((256, 256), 64).convert("RGB").save(big, quality=95)
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(JobError, match="'cut.jpg' is not a readable image"):
        jobs.check_image(truncated)
    with pytest.raises(JobError, match="'big.jpg' is .* MB; the limit is"):
        jobs.check_image(big, max_bytes=1000)
    gif = tmp_path / "anim.gif"
    Image.new("P", (8, 8)).save(gif)
    with pytest.raises(JobError, match="GIF image; use JPEG, PNG"):
        jobs.check_image(gif)


def test_save_uploads_all_or_nothing(tmp_path, images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(JobError, match="bad.png"):
        jobs.save_uploads([*images, bad], tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    dest = jobs.save_uploads([str(images[0]), str(images[1])], tmp_path / "ok")
    assert sorted(p.name for p in dest.iterdir()) == ["0000-img0.png", "0001-img1.jpg"]
    with pytest.raises(JobError, match="limit is 1"):
        jobs.save_uploads(images, tmp_path / "x", max_files=1)


def test_build_config_uses_trainer_names_and_checks(tmp_path, images):
    data = tmp_path / "data"
    data.mkdir()
    cfg = jobs.build_config({**FORM, "instance_data_dir": str(data), "validation_prompt": "a\n\n b \n",
                             "lora_alpha": None, "class_prompt": ""}, tmp_path / "run")
    assert cfg["output_dir"] == str(tmp_path / "run") and cfg["instance_data_dir"] == str(data.resolve())
    assert cfg["validation_prompt"] == ["a", "b"] and cfg["rank"] == 4 and cfg["seed"] == 3
    assert cfg["lora_alpha"] is None and cfg["class_prompt"] is None  # empty fields take the trainer default
    with pytest.raises(JobError, match="no training images"):
        jobs.build_config(FORM, tmp_path / "run")
    with pytest.raises(JobError, match="'/nope' does not exist"):
        jobs.build_config({**FORM, "instance_data_dir": "/nope"}, tmp_path / "run")
    with pytest.raises(JobError, match="--method 'nope' is unknown"):
        jobs.build_config({**FORM, "method": "nope", "instance_data_dir": str(data)}, tmp_path / "run")
    with pytest.raises(JobError, match="--rank must be in 1..256"):
        jobs.build_config({**FORM, "rank": 0, "instance_data_dir": str(data)}, tmp_path / "run")
    held = tmp_path / "held"
    held.mkdir()
    cfg = jobs.build_config({**FORM, "instance_data_dir": str(data), "eval_loss_every": 50,
                             "eval_data_dir": str(tmp_path / "." / "held")}, tmp_path / "run")
    assert cfg["eval_loss_every"] == 50 and cfg["eval_data_dir"] == str(held.resolve())
    with pytest.raises(JobError, match=r"^eval images folder '/nope' does not exist; give a folder of held-out "
                                       r"images, or leave it blank to take the training images$"):
        jobs.build_config({**FORM, "instance_data_dir": str(data), "eval_loss_every": 50, "eval_data_dir": "/nope"},
                          tmp_path / "run")
    with pytest.raises(JobError, match="is given but the eval loss is off"):
        jobs.build_config({**FORM, "instance_data_dir": str(data), "eval_data_dir": str(held)}, tmp_path / "run")
    edge = {"max_train_steps": 100_000, "rank": 256, "resolution": 2048, "learning_rate": 1.0,
            "num_validation_images": 16, "num_train_epochs": 1000}  # the limits themselves are allowed
    cfg = jobs.build_config({**FORM, **edge, "instance_data_dir": str(data)}, tmp_path / "run")
    assert {k: cfg[k] for k in edge} == edge


@pytest.mark.parametrize("field,value,allowed", [
    ("max_train_steps", 10**9, "1..100000"), ("max_train_steps", 0, "1..100000"),
    ("rank", 257, "1..256"), ("resolution", 4096, "64..2048, a multiple of 8"),
    ("resolution", 100, "64..2048, a multiple of 8"), ("resolution", 32, "64..2048, a multiple of 8"),
    ("learning_rate", float("nan"), r"\(0, 1\]"), ("learning_rate", float("inf"), r"\(0, 1\]"),
    ("learning_rate", 0, r"\(0, 1\]"), ("learning_rate", 2.0, r"\(0, 1\]"),
    ("num_validation_images", 17, "1..16"), ("num_train_epochs", 1001, "1..1000")])
def test_build_config_refuses_values_outside_the_app_limits(tmp_path, field, value, allowed):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(JobError, match=rf"^--{field} must be in {allowed} \(got {value}\)$"):
        jobs.build_config({**FORM, field: value, "instance_data_dir": str(data)}, tmp_path / "run")


def test_unique_run_names_under_concurrency(tmp_path, fake):
    r = runner(tmp_path, fake())
    made = []
    threads = [threading.Thread(target=lambda: made.append(r.new_run_dir("same name"))) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len({p.name for p in made}) == 8 and {p.name for p in made} >= {"same-name", "same-name-8"}
    with pytest.raises(ValueError):
        r.new_run_dir("../")


def test_bad_form_leaves_no_run_folder(tmp_path, fake, images):
    r = runner(tmp_path, fake())
    with pytest.raises(JobError, match="instance_prompt is required"):
        r.start({**FORM, "instance_prompt": ""}, name="bad", images=images)
    assert list((tmp_path / "runs").iterdir()) == []


def test_train_command_is_accelerate_launch(tmp_path):
    cmd = jobs.train_command(tmp_path / "config.json")
    assert cmd[-3:] == ["train/sd.py", "--config", str(tmp_path / "config.json")]
    assert cmd[:2] == [str(Path(sys.executable).with_name("accelerate")), "launch"]


# ---------------------------------------------------------------------------- processes


def test_job_runs_to_done(tmp_path, fake, images, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the app's own setting wins over the share of the cores
    r = runner(tmp_path, fake())
    run_dir = r.start(FORM, name="ok", images=images)
    assert r.wait(run_dir, timeout=60) == "done"
    run = runs.read_run(r.runs_dir, "ok")
    assert run.step == 5 and run.progress == 1.0 and run.error is None
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["0000-img0.png", "0001-img1.jpg"]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["instance_data_dir"] == str(run_dir / "data") and cfg["output_dir"] == str(run_dir)
    log = (run_dir / "train.log").read_text()
    assert log.startswith("$ ") and "fake_trainer.py --config" in log and "training reflora OMP_NUM_THREADS=3" in log
    assert json.loads((run_dir / "job.json").read_text())["command"][-2] == str(run_dir / "config.json")


def test_a_run_that_ends_before_launch_returns_stays_done(tmp_path, fake, images, monkeypatch):
    """The app marks the run 'running' before the trainer exists, never after: a trainer that finishes while
    launch() is still busy (a loaded machine) must not get its 'done' overwritten and the run called failed."""
    seen = []
    real_popen = jobs.subprocess.Popen

    def popen_then_finish(cmd, **kw):
        seen.append(json.loads((tmp_path / "runs" / "fast" / "status.json").read_text())["state"])
        proc = real_popen(cmd, **kw)
        proc.wait()  # the whole run happens before launch() goes on
        return proc
    monkeypatch.setattr(jobs.subprocess, "Popen", popen_then_finish)
    r = runner(tmp_path, fake())
    run_dir = r.start(FORM, name="fast", images=images)
    assert seen == ["running"]
    assert r.wait(run_dir, timeout=60) == "done" and runs.read_run(r.runs_dir, "fast").error is None


def test_app_restart_right_after_launch_marks_a_job_that_never_started(tmp_path, images, fake):
    r = runner(tmp_path, fake())
    run_dir = r.create_run(FORM, name="orphan", images=images)
    status = json.loads((run_dir / "status.json").read_text())  # what launch() writes before starting the trainer
    (run_dir / "status.json").write_text(json.dumps({**status, "state": "running", "pid": None}))
    runner(tmp_path, fake())  # the app restarted before the trainer (or job.json) existed
    run = runs.read_run(tmp_path / "runs", "orphan")
    assert run.state == "failed" and run.error == "the app stopped while starting this run's trainer; start it again"


# like `accelerate launch` (simple_launcher): runs the trainer and raises CalledProcessError when it fails
FAKE_LAUNCHER = "import subprocess, sys\nsubprocess.run([sys.executable, *sys.argv[1:]], check=True)\n"


def test_a_trainer_error_before_its_log_starts_is_shown_not_the_launchers(tmp_path, fake, images):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    r = runner(tmp_path, lambda cfg: [sys.executable, str(launcher), *fake("user_error")(cfg)[1:]])
    run_dir = r.start(FORM, name="nodata", images=images)
    assert r.wait(run_dir, timeout=60) == "failed"
    line = "error: --instance_data_dir '/data/x' holds no images (.jpg, .png); add some or fix the path"
    run = runs.read_run(r.runs_dir, "nodata")
    assert run.error == f"{line} (exit code 2); see train.log"  # the trainer's line and its exit code
    assert "CalledProcessError" in (run_dir / "train.log").read_text()  # (the launcher's report stays in the log)
    assert html.escape(line) in AppViews(r.runs_dir, r).run_details("nodata")["progress"]  # the Runs tab


def test_last_error_reads_the_last_launch_and_sees_through_the_launcher():
    cmd_fail = "subprocess.CalledProcessError: Command '['python', 'train/sd.py']' returned non-zero exit status 2."
    killed = "subprocess.CalledProcessError: Command '['python', 'train/sd.py']' died with <Signals.SIGKILL: 9>."
    assert jobs.last_error(f"$ a\nerror: old run\n$ b\nerror: bad flag\nTraceback:\n{cmd_fail}\n") == ("error: bad flag", 2)
    assert jobs.last_error(f"$ b\nstep 5\nTraceback:\n{killed}\n") == ("the trainer was killed by SIGKILL", -9)
    assert jobs.last_error("$ b\nValueError: x\nlast words\n") == ("ValueError: x", None)
    assert jobs.last_error("") == (None, None)


@pytest.mark.parametrize("mode,error", [("crash", "RuntimeError: boom at step 3"),
                                        ("die_early", "ValueError: --rank 999 is larger"),
                                        ("silent_exit", "the trainer exited without finishing")])
def test_dead_job_is_marked_failed_with_its_error(tmp_path, fake, images, mode, error):
    r = runner(tmp_path, fake(mode))
    run_dir = r.start(FORM, name=mode, images=images)
    assert r.wait(run_dir, timeout=60) == "failed"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and error in status["error"] and "train.log" in status["error"]
    assert runs.read_run(r.runs_dir, mode).error == status["error"]


def test_cancel_running_job_kills_process_group(tmp_path, fake, images):
    r = runner(tmp_path, fake("hang"))
    run_dir = r.start(FORM, name="hang", images=images)
    deadline = time.time() + 30
    while runs.read_run(r.runs_dir, "hang").step < 2 and time.time() < deadline:
        time.sleep(0.05)
    pid = json.loads((run_dir / "status.json").read_text())["pid"]
    assert runs.pid_alive(pid)
    assert r.cancel("hang", grace=5).startswith("cancelled hang at step 2")
    assert not runs.pid_alive(pid)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled" and status["step"] == 2 and "cancelled by the user" in status["error"]
    assert r.cancel("hang") == "hang is already cancelled"
    with pytest.raises(runs.RunPathError):
        r.cancel("../hang")


def test_ab_runs_one_after_the_other_with_same_settings(tmp_path, fake, images):
    r = runner(tmp_path, fake(), max_concurrent=2)  # even where two jobs could run at once
    first, second = r.start_ab({**FORM, "seed": None}, methods=("lora", "reflora"), name="ab", images=images)
    assert [first.name, second.name] == ["ab-lora", "ab-reflora"]
    assert r.wait(second, timeout=60) == "done" and r.wait(first, timeout=1) == "done"
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (first, second))
    differing = {k for k in c1 if c1[k] != c2[k]}
    assert differing == {"method", "output_dir", "instance_data_dir"}  # same seed although none was given
    assert sorted(os.listdir(c1["instance_data_dir"])) == sorted(os.listdir(c2["instance_data_dir"]))
    s1, s2 = (json.loads((d / "status.json").read_text()) for d in (first, second))
    assert s2["started_at"] >= s1["updated_at"]  # the second started after the first ended
    with pytest.raises(JobError, match="two or more different methods"):
        r.start_ab(FORM, methods=("lora", "lora"), images=images)


def test_ab_side_by_side(tmp_path, fake, images):
    r = runner(tmp_path, fake("hang"), max_concurrent=3)
    dirs = r.start_ab(FORM, methods=("lora", "reflora", "reflora-s"), name="sbs", images=images, side_by_side=True)
    deadline = time.time() + 30
    while not all(runs.read_run(r.runs_dir, d.name).step >= 2 for d in dirs) and time.time() < deadline:
        time.sleep(0.05)
    assert [runs.read_run(r.runs_dir, d.name).state for d in dirs] == ["running"] * 3  # all at once
    for d in dirs:
        r.cancel(d.name, grace=5)
    assert [runs.read_run(r.runs_dir, d.name).state for d in dirs] == ["cancelled"] * 3


def wait_for(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_runs_at_most_max_concurrent_jobs_with_their_share_of_threads(tmp_path, fake, images, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
    monkeypatch.setattr(jobs, "cuda_devices", lambda: 0)
    assert runner(tmp_path, fake()).max_concurrent == 1  # the default on a CPU
    r = runner(tmp_path, fake("hang"), max_concurrent=2)
    a, b, c = (r.start(FORM, name=n, images=images) for n in "abc")
    d, e = r.start_ab(FORM, methods=("lora", "reflora"), name="ab", images=images, side_by_side=True)
    state = lambda run_dir: runs.read_run(r.runs_dir, run_dir.name).state  # noqa: E731
    wait_for(lambda: runs.read_run(r.runs_dir, "b").step >= 2)
    time.sleep(0.5)
    assert [state(x) for x in (a, b, c, d, e)] == ["running", "running", "queued", "queued", "queued"]
    assert not (c / "job.json").exists()
    r.cancel("a", grace=5)  # a place frees up: the next in line starts, only that one
    wait_for(lambda: runs.read_run(r.runs_dir, "c").step >= 2)
    assert [state(x) for x in (a, b, c, d, e)] == ["cancelled", "running", "running", "queued", "queued"]
    assert r.cancel(d.name).endswith("(it had not started)")  # it leaves the line without ever starting
    r.cancel("b", grace=5)
    wait_for(lambda: runs.read_run(r.runs_dir, e.name).step >= 2)  # d's turn went to e
    assert [state(x) for x in (c, d, e)] == ["running", "cancelled", "running"] and not (d / "job.json").exists()
    for x in (c, e):
        r.cancel(x.name, grace=5)
    for x in (a, b, c, e):  # each job got cores // max_concurrent threads
        assert "OMP_NUM_THREADS=4" in (x / "train.log").read_text()


def test_the_queue_length_is_capped_and_a_refused_start_copies_nothing(tmp_path, fake, images):
    r = runner(tmp_path, fake("hang"), max_concurrent=1, max_queued=2)
    for name in "abc":  # a runs, b and c wait
        r.start(FORM, name=name, images=images)
    full = "the job queue is full (2 waiting, the limit is 2); start again when some have started, or cancel a queued run"
    with pytest.raises(JobError) as refused:
        r.start(FORM, name="d", images=images)
    assert str(refused.value) == full
    assert AppViews(r.runs_dir, r).start(FORM, images, "d") == (f"**Not started:** {full}", [])  # the Train tab
    r.cancel("c")  # one place in the line frees up: one run fits, an A/B pair does not
    with pytest.raises(JobError, match=r"^the job queue has room for 1 more run, not 2 \(1 waiting, the limit is 2\)"):
        r.start_ab(FORM, name="ab", images=images)
    assert sorted(p.name for p in r.runs_dir.iterdir()) == ["a", "b", "c"]  # nothing was created for the refused ones
    d = r.start(FORM, name="d", images=images)
    assert runs.read_run(r.runs_dir, d.name).state == "queued"
    for name in "dba":
        r.cancel(name, grace=5)


def test_the_uploads_held_by_queued_runs_are_bounded(tmp_path, fake, images):
    size = sum(p.stat().st_size for p in images)
    r = runner(tmp_path, fake("hang"), max_concurrent=1, max_queued_upload_bytes=int(2.5 * size))
    r.start(FORM, name="a", images=images)  # running: its uploads are not waiting in the queue
    r.start(FORM, name="b", images=images)  # waiting with one copy
    with pytest.raises(JobError, match=r"^the queued runs' uploads would add up to \d+ MB \(the limit is \d+ MB\); start "
                                       r"again when some have started, cancel a queued run, or give a folder on this "
                                       r"machine instead of uploading$"):
        r.start_ab(FORM, name="ab", images=images)  # two more copies
    c = r.start(FORM, name="c", images=images)  # one more fits
    with pytest.raises(JobError, match="uploads would add up to"):
        r.start(FORM, name="d", images=images)
    folder = c / "data"  # a folder on the machine copies nothing: only the queue length counts
    e = r.start({**FORM, "instance_data_dir": str(folder)}, name="e")
    assert sorted(p.name for p in r.runs_dir.iterdir()) == ["a", "b", "c", "e"]
    for run_dir in (e, c):
        r.cancel(run_dir.name)
    r.start(FORM, name="d", images=images)  # the cancelled runs no longer hold their place
    for name in "dba":
        r.cancel(name, grace=5)


def test_each_job_gets_the_least_busy_gpu(tmp_path, fake, images, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(jobs, "cuda_devices", lambda: 2)
    assert runner(tmp_path, fake()).max_concurrent == 2  # the default: one job per GPU
    r = runner(tmp_path, fake("hang"), max_concurrent=3)
    dirs = [r.start(FORM, name=n, images=images) for n in "abc"]
    wait_for(lambda: all(runs.read_run(r.runs_dir, d.name).step >= 2 for d in dirs))
    assert [runs.read_json(d / "job.json")["gpu"] for d in dirs] == [0, 1, 0]
    assert [f"CUDA_VISIBLE_DEVICES={g}" in (d / "train.log").read_text() for d, g in zip(dirs, "010")] == [True] * 3
    r.cancel("a", grace=5)
    d = r.start(FORM, name="d", images=images)  # one job on each GPU again: the first
    wait_for(lambda: runs.read_run(r.runs_dir, "d").step >= 2)
    assert runs.read_json(d / "job.json")["gpu"] == 0
    for x in dirs[1:] + [d]:
        r.cancel(x.name, grace=5)


@pytest.mark.parametrize("attempt", range(3))  # cancelling while the queue launches it is a race: try it
def test_cancel_queued_jobs_never_start_or_leak(tmp_path, fake, images, attempt):
    r = runner(tmp_path, fake("hang"))
    first, second = r.start_ab(FORM, name="q", images=images)
    assert r.cancel(second.name).endswith("(it had not started)")
    r.cancel(first.name, grace=5)  # right away: the queue may be launching it at this very moment
    time.sleep(1.5)  # the queue worker would have launched something by now
    assert not (second / "job.json").exists() and runs.read_run(r.runs_dir, second.name).state == "cancelled"
    assert runs.read_run(r.runs_dir, first.name).state == "cancelled"
    job = runs.read_json(first / "job.json")
    if job is not None:  # it had been launched: nothing of it may be left running
        assert not runs.pid_alive(job["pgid"])
        assert not runs.pid_alive(json.loads((first / "status.json").read_text())["pid"])


def test_restart_requeues_waiting_and_marks_dead_jobs(tmp_path, fake, images):
    r1 = runner(tmp_path, fake())
    queued = r1.create_run(FORM, name="waiting", images=images)  # queued, app stopped before launching it
    dead = r1.create_run(FORM, name="dead", images=images)
    status = json.loads((dead / "status.json").read_text())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (dead / "status.json").write_text(json.dumps({**status, "state": "running", "pid": proc.pid}))
    (dead / "job.json").write_text(json.dumps({"pgid": proc.pid}))
    r2 = runner(tmp_path, fake())  # a new app on the same runs dir
    assert r2.wait(queued, timeout=60) == "done"
    status = json.loads((dead / "status.json").read_text())
    assert status["state"] == "failed" and "exit code None" in status["error"]


def test_adopted_job_can_be_cancelled_after_restart(tmp_path, fake, images):
    r1 = runner(tmp_path, fake("hang"))
    r1._finalize = lambda *a: None  # this app "dies": it will not write the end state itself
    run_dir = r1.start(FORM, name="long", images=images)
    deadline = time.time() + 30
    while runs.read_run(r1.runs_dir, "long").step < 2 and time.time() < deadline:
        time.sleep(0.05)
    waiting = r1.create_run(FORM, name="waiting", images=images)  # queued when the app stopped
    r2 = runner(tmp_path, fake())  # the app restarted; the job kept running in its own session
    assert runs.read_run(r2.runs_dir, "long").state == "running"
    time.sleep(0.5)
    assert runs.read_run(r2.runs_dir, "waiting").state == "queued"  # the adopted job holds the only place
    pid = json.loads((run_dir / "status.json").read_text())["pid"]
    r2.cancel("long", grace=5)
    assert not runs.pid_alive(pid) and runs.read_run(r2.runs_dir, "long").state == "cancelled"
    assert r2.wait(waiting, timeout=30) == "done"  # its place freed: the waiting run started


def test_trainer_that_cannot_start_is_marked_failed(tmp_path, images):
    r = runner(tmp_path, lambda cfg: [str(tmp_path / "no-such-launcher"), "--config", str(cfg)])
    r.start(FORM, name="nolauncher", images=images)
    r.start(FORM, name="next", images=images)  # the queue goes on after a job that could not start
    for name in ("nolauncher", "next"):
        run = runs.read_run(r.runs_dir, name)
        assert run.state == "failed" and "could not start" in run.error and "no-such-launcher" in run.error


# ---------------------------------------------------------------------------- status.json: one writer


def test_a_finished_state_is_never_overwritten_by_a_later_non_finished_write(tmp_path):
    run = tmp_path / "run"
    rundir.start_status(run, rundir.new_status("queued", 5))  # what the app's create_run writes
    assert rundir.update_status(run, only_from=("queued",), state="running", pid=None)["state"] == "running"
    log = rundir.RunLog(run, 5)  # the trainer starts, runs and finishes before the app's next write
    log.set_status(state="running")
    log.set_status(state="done", step=5)
    # the race 4db75fb fixed: the app's 'running' write that used to come after Popen, late
    assert rundir.update_status(run, state="running", pid=12345, started_at=time.time()) is None
    assert rundir.update_status(run, only_from=("queued",), state="running") is None
    status = rundir.read_json(run / "status.json")
    assert (status["state"], status["step"], status["pid"]) == ("done", 5, os.getpid())

    hung = rundir.RunLog(run, 5)  # a new attempt (a restart, a resume) starts over from any state
    hung.set_status(state="running")
    assert rundir.read_json(run / "status.json")["state"] == "running"
    rundir.update_status(run, state="cancelled", error="cancelled by the user")  # the app gave up on it
    hung.set_status(step=6)  # the hung trainer's late step
    assert rundir.read_json(run / "status.json")["state"] == "cancelled"


TRAINER_WRITES = """
import sys, time
from reflora_diffusion.rundir import RunLog, read_json
for attempt in range(20):  # each a run that starts, steps and finishes, then checks its 'done' is still there
    log = RunLog(sys.argv[1], 50)
    log.set_status(state="running")
    for step in range(1, 51):
        log.set_status(step=step)
    log.set_status(state="done", step=50)
    time.sleep(0.01)
    if read_json(sys.argv[1] + "/status.json")["state"] != "done":
        sys.exit(f"attempt {attempt}: 'done' was undone")
"""


def test_a_finished_state_survives_a_concurrent_writer(tmp_path):
    """The app writing a non-finished state while the trainer (another process) finishes: the read-then-write of
    each write is one step (a lock on the run folder), so the trainer's 'done' is never undone."""
    run = tmp_path / "run"
    rundir.start_status(run, rundir.new_status("queued", 50))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER_WRITES, str(run)], env=env, stderr=subprocess.PIPE,
                               text=True)
    while trainer.poll() is None:
        rundir.update_status(run, state="running", error=None)
    assert trainer.returncode == 0, trainer.stderr.read()
    assert rundir.read_json(run / "status.json")["state"] == "done"


def test_the_runner_writes_status_json_only_through_the_run_folder_module(tmp_path, fake, images, monkeypatch):
    written = []
    real = jobs.write_json_atomic
    monkeypatch.setattr(jobs, "write_json_atomic", lambda path, data: (written.append(Path(path).name), real(path, data)))
    r = runner(tmp_path, fake("die_early"))
    run_dir = r.start(FORM, name="dies", images=images)  # queued, running, then failed by the runner
    assert r.wait(run_dir, timeout=60) == "failed"
    queued = r.create_run(FORM, name="waits", images=images)
    r.enqueue(queued)
    r.cancel("waits")
    assert runs.read_run(r.runs_dir, "waits").state in ("cancelled", "failed")
    assert "job.json" in written and "status.json" not in written
