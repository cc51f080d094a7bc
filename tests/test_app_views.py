"""What the page shows, without a browser: messages for bad input, progress, A/B grid hand-off, CLI flags."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app.py lives at the repo root

import app  # noqa: E402
from reflora_diffusion.app import runs, serve, views  # noqa: E402
from reflora_diffusion.app.jobs import JobRunner  # noqa: E402
from test_app_compare import adapter_runs  # noqa: E402,F401  (module fixture: real tiny adapters)
from test_app_jobs import FORM, fake, images  # noqa: E402,F401
from test_app_runs import make_run  # noqa: E402


@pytest.fixture
def v(tmp_path, fake):  # noqa: F811
    return views.AppViews(tmp_path / "runs", JobRunner(tmp_path / "runs", command=fake(), max_concurrent=1))


def test_start_reports_user_errors_as_messages(v, images):  # noqa: F811
    msg, names = v.start({**FORM, "rank": -1}, images)
    assert msg == "**Not started:** --rank must be in 1..256 (got -1)" and names == []
    msg, names = v.start(FORM, None)
    assert "no training images" in msg and names == []
    msg, names = v.start(FORM, images, name="../../x", ab=True, method_b="reflora")
    assert "two or more different methods" in msg  # FORM's method is reflora too
    msg, names = v.start(FORM, images, name="pair", ab=True, method_b="lora")
    assert names == ["pair-lora", "pair-reflora"] and "one after the other" in msg
    v.runner.wait(v.runs_dir / "pair-reflora", timeout=60)
    assert [s["state"] for s in v.runs_status()] == ["done", "done"]


def test_start_says_whether_the_job_started_or_waits(v, images):  # noqa: F811
    assert v.start(FORM, images, name="first") == ("Started first. Watch it in the Runs tab.", ["first"])
    msg, names = v.start(FORM, images, name="second")
    assert names == ["second"] and msg.startswith("Queued second. At most 1 job run at once")
    msg, names = v.start(FORM, images, name="sbs", ab=True, method_b="lora", side_by_side=True)
    assert msg.startswith("Started A/B (side by side): sbs-lora, sbs-reflora. At most 1 job run at once")
    assert v.runner.wait(v.runs_dir / "sbs-reflora", timeout=60) == "done"
    assert {s["state"] for s in v.runs_status()} == {"done"}


def test_progress_and_details(v, tmp_path):
    events = [{"step": s, "loss": 1.0, "sec_per_step": 1.0, "refactor": {"balance_mean": 2.0}} for s in (1, 2)]
    make_run(v.runs_dir, "r", step=2, max_steps=8, events=events)
    html = views.progress_html(runs.read_run(v.runs_dir, "r"))
    assert "step 2/8" in html and "width:25.0%" in html and "ETA 6s" in html
    d = v.run_details("r")
    assert d["stats"] == {"balance_mean": 2.0} and d["figure"].axes[0].lines
    assert v.status("r") == {"name": "r", "method": "reflora", "state": "running", "step": 2, "max_steps": 8,
                             "progress": 0.25, "eta_seconds": 6.0, "error": None}
    assert "outside the runs directory" in v.run_details("../r")["progress"]
    assert v.cancel(None) == "Pick a run to cancel." and "Not cancelled" in v.cancel("missing")
    assert "<script>" not in views.progress_html(runs.Run("<script>", Path("."), "failed", 0, 0, "x", {}, {},
                                                          error="<b>"))


def test_ab_poll_makes_the_grid_when_both_are_done(adapter_runs):  # noqa: F811
    v = views.AppViews(adapter_runs, JobRunner(adapter_runs, command=None, adopt=False))
    make_run(adapter_runs, "still-running", state="running")
    assert v.ab_poll(["trained", "still-running"], "x", "0", 2) == (["trained", "still-running"], None, None)
    make_run(adapter_runs, "crashed", state="failed")
    assert v.ab_poll(["trained", "crashed"], "x", "0", 2) == ([], None, "A/B did not finish: crashed failed")
    pending, grid, msg = v.ab_poll(["trained", "zero"], "a photo of sks dog", "0, 1", 2)
    assert pending == [] and Path(grid).name == "grid.png" and msg.startswith("Generated")
    assert v.generate(["trained"], "x", "zero", 2) == (None, "**No grid:** seeds 'zero' must be whole numbers "
                                                             "separated by commas, e.g. '0, 1'")
    assert "has no pytorch_lora_weights.safetensors yet" in v.generate(["still-running"], "x", "0", 2)[1]
    assert v.generate([], "x", "0", 2)[1] == "**No grid:** pick at least one run to compare"


def test_export_messages(v):
    make_run(v.runs_dir, "r", state="running")
    assert v.export(None, None, "diffusers") == (None, None, "Pick a run to export.")
    assert "has no final to export yet" in v.export("r", "final", "diffusers")[2]
    assert "unknown export format 'zip'" in v.export("r", "final", "zip")[2]
    assert "unknown export source" in v.export("r", "../../etc", "kohya")[2]
    assert v.export_sources("r") == [] and v.export_sources("../x") == []


def test_cli_defaults_are_private(monkeypatch):
    for var in ("REFLORA_APP_HOST", "REFLORA_APP_AUTH", "REFLORA_APP_PORT", "REFLORA_RUNS_DIR",
                "REFLORA_MAX_CONCURRENT_JOBS"):
        monkeypatch.delenv(var, raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.auth, args.runs_dir) == ("127.0.0.1", 7860, False, None, "runs")
    assert args.max_concurrent_jobs is None and app.parse_args(["--max_concurrent_jobs", "2"]).max_concurrent_jobs == 2
    monkeypatch.setenv("REFLORA_MAX_CONCURRENT_JOBS", "3")
    assert app.parse_args([]).max_concurrent_jobs == 3
    monkeypatch.setenv("REFLORA_APP_AUTH", "me:pw")
    assert app.parse_auth(app.parse_args([]).auth) == ("me", "pw")
    with pytest.raises(SystemExit, match="--auth must look like user:password"):
        app.parse_auth("nocolon")
    assert views.default_resolution("tiny") == 64 and views.default_resolution("stabilityai/sdxl-base") == 1024
    assert views.default_resolution("tiny-flux") == 256  # its own config (FluxPipeline's default latent size)


def test_build_demo_endpoints(tmp_path):
    make_run(tmp_path / "runs", "zebra-run-name")
    demo = app.build_demo(str(tmp_path / "runs"))
    info = demo.get_api_info()
    endpoints = info["named_endpoints"]
    assert set(endpoints) == {"/start", "/start_ab", "/cancel", "/generate", "/export", "/runs", "/status"}
    assert [p["parameter_name"] for p in endpoints["/export"]["parameters"]] == ["name", "source", "fmt"]
    assert "enable_bucket" in [p["parameter_name"] for p in endpoints["/start"]["parameters"]]
    # no run names in the page or its API description (both reach a browser before the login)
    assert "zebra" not in json.dumps(demo.config, default=str) and "zebra" not in json.dumps(info, default=str)
    assert any(event == "load" for dep in demo.config["dependencies"] for _, event in dep["targets"])  # filled then


def handler(demo, label: str, event: str):
    """The function the page runs when the component labelled `label` fires `event`, and its outputs' labels."""
    ids = {b._id for b in demo.blocks.values() if getattr(b, "label", None) == label}
    fn = next(f for f in demo.fns.values() if any(t[0] in ids and t[1] == event for t in f.targets))
    return fn.fn, [getattr(o, "label", None) for o in fn.outputs]


def sampled_run(root, name, method, steps):
    d = make_run(root, name, state="done", method=method,
                 events=[{"step": s, "samples": [f"samples/step_{s}/0.png"]} for s in steps])
    for s in steps:
        (d / f"samples/step_{s}").mkdir(parents=True)
        (d / f"samples/step_{s}/0.png").write_bytes(b"png")
    return d


def test_compare_gallery_follows_the_picked_runs(tmp_path):
    """Picking a second run whose latest common sample step is the same (60) used to leave the first run's images."""
    runs_dir = tmp_path / "runs"
    sampled_run(runs_dir, "a", "lora", (30, 60))
    sampled_run(runs_dir, "b", "reflora", (30, 60))
    demo = app.build_demo(str(runs_dir))
    fn, outputs = handler(demo, "Runs to compare", "input")
    gallery = outputs.index("Saved validation samples at equal steps")
    steps = outputs.index("Saved samples at step")
    first, second = fn(["a"]), fn(["a", "b"])
    assert first[steps].value == second[steps].value == 60
    assert [cap.split(" · ")[1] for _, cap in first[gallery]] == ["a"]
    assert [cap.split(" · ")[1] for _, cap in second[gallery]] == ["a", "b"]
    assert all("step 60" in cap for _, cap in second[gallery])
    # the steps-to-loss table stays hidden (no "1 2 3" headers) when there is nothing to put in it
    table = second[outputs.index("Steps to loss")]
    assert table.visible is False and "pick two or more runs with logged losses" in second[1]


def test_runs_tab_sends_only_what_changed(v):
    events = [{"step": s, "loss": 1.0 / s} for s in (1, 2)]
    d = make_run(v.runs_dir, "r", step=2, max_steps=8, events=events)
    out, seen = v.live(None)
    assert out["names"] == ["r"] and out["select"] == "r" and out["table"] and out["details"]["figure"]
    out, seen = v.live("r", seen)  # a tick with nothing new: nothing is drawn or sent
    assert out == {"names": None, "select": None, "table": None, "details": None}
    with open(d / "events.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.3}) + "\n")
    out, seen = v.live("r", seen)
    assert out["details"]["figure"] and out["names"] is None
    (d / "train.log").write_text("step 3\n")
    out, seen = v.live("r", seen)
    assert out["details"]["log"] == "step 3"
    make_run(v.runs_dir, "other")
    out, _ = v.live("r", seen)
    assert set(out["names"]) == {"r", "other"} and out["select"] is None and out["details"] is None


def test_runs_tab_log_opens_at_its_end(tmp_path):
    demo = app.build_demo(str(tmp_path / "runs"))
    log = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "train.log (tail)")
    assert log.elem_id == "run-log" and log.autoscroll
    tab = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Runs")
    scrolls = [f for f in demo.fns.values() if f.js and "#run-log" in f.js and "scrollHeight" in f.js]
    assert any((tab._id, "select") in [tuple(t) for t in f.targets] for f in scrolls)  # opening the tab
    assert any(f.fn is None and f.targets and f.targets[0][1] == "then" for f in scrolls)  # picking a run


def test_llm_runs_progress_without_steps(v):
    from test_app_runs import llm_run

    llm_run(v.runs_dir, "ev", {"model_name_or_path": "m", "dataset": "boolq", "output_dir": "x"},
            {"step": 0, "max_steps": 0}, {"datasets": {"boolq": {"accuracy": 0.7, "complete": True}}})
    html = views.progress_html(runs.read_run(v.runs_dir, "ev"))
    assert "(commonsense eval · m · base model): done · boolq accuracy 0.7000" in html
    assert "step" not in html and "width:" not in html


def test_default_job_is_the_readme_main_job(tmp_path):
    """The Train form untouched starts the README's main job (as the CLI runs it), else the trainer's defaults."""
    from test_readme import quick_start_args

    from reflora_diffusion.sd.config import parse_args

    cli = parse_args(quick_start_args())
    params = app.build_demo(str(tmp_path / "runs")).get_api_info()["named_endpoints"]["/start"]["parameters"]
    page = {p["parameter_name"]: p["parameter_default"] for p in params}
    assert [p["parameter_name"] for p in params if not p["parameter_has_default"]] == ["images"]  # blank = optional
    as_options = {"base": "pretrained_model_name_or_path", "instance_prompt": "instance_prompt", "method": "method",
                  "rank": "rank", "alpha": "lora_alpha", "steps": "max_train_steps", "lr": "learning_rate",
                  "seed": "seed", "train_text_encoder": "train_text_encoder", "warmup_steps": "refactor_warmup_steps",
                  "validation_steps": "validation_steps", "checkpointing_steps": "checkpointing_steps",
                  "with_prior_preservation": "with_prior_preservation", "enable_bucket": "enable_bucket",
                  "lora_conv": "lora_conv", "snr_gamma": "snr_gamma"}
    as_text = {"alpha", "seed", "warmup_steps"}  # optional numbers are text boxes: blank = the trainer's default
    assert all(isinstance(page[p], str) for p in as_text)
    for param, option in as_options.items():
        value = (float(page[param]) if page[param] else None) if param in as_text else page[param]
        assert value == getattr(cli, option), (param, page[param], getattr(cli, option))
    assert page["validation_prompt"].splitlines() == cli.validation_prompt
    assert page["precision"] == "default" and cli.mixed_precision is None  # both: accelerate's setting
    assert page["eval_loss_every"] == 0 == cli.eval_loss_every  # 0: off, the trainer's default
    assert page["eval_data_dir"] == "" and cli.eval_data_dir is None  # blank: the training images
    assert page["resolution"] == 64 and cli.resolution is None  # the base model's own size, 64 for tiny-emoji
    assert views.default_job()["rank"] == cli.rank == 16


def test_method_dropdown_says_what_each_method_is(tmp_path):
    from reflora_diffusion.core import METHODS

    assert set(views.METHOD_SUMMARIES) == set(METHODS)
    choices = dict(views.method_choices(METHODS))
    assert choices["reflora — refactored LoRA: balanced, preconditioned factors"] == "reflora"
    assert choices["lora+ — B learns faster (lr of B = ratio x lr of A)"] == "lora+"
    method = next(p for p in app.build_demo(str(tmp_path / "runs")).get_api_info()["named_endpoints"]["/start"]
                  ["parameters"] if p["parameter_name"] == "method")
    assert method["python_type"]["type"] == "Literal[" + ", ".join(f"'{m}'" for m in METHODS) + "]"  # bare names sent


def test_idle_queue_polls_slowly(tmp_path):
    demo = app.build_demo(str(tmp_path / "runs")).queue()
    assert demo._queue.sleep_when_free < 0.01  # gradio's own: a check every 1 ms
    serve.quiet_idle_queue(demo)
    assert demo._queue.sleep_when_free == 0.05 and demo._queue.progress_update_sleep_when_free == 0.1
