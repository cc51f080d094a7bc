"""Comparisons: smoothing and steps-to-loss against the math, samples at equal steps, and a real
generated grid (tiny pipeline, adapters loaded with load_lora_weights)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reflora_diffusion.app import compare
from test_app_runs import make_run


def test_smooth_is_debiased_ema():
    assert compare.smooth([2.0, 2.0, 2.0], beta=0.9) == pytest.approx([2.0, 2.0, 2.0])
    # beta 0.5: avg1 = 0.5, /0.5 = 1; avg2 = 0.25, /0.75 = 1/3
    assert compare.smooth([1.0, 0.0], beta=0.5) == pytest.approx([1.0, 1 / 3])
    assert compare.smooth([3.0, 1.0], beta=0.0) == [3.0, 1.0]


def test_steps_to_loss():
    assert compare.steps_to_loss([10, 20, 30], [0.5, 0.3, 0.1], 0.3) == 20
    assert compare.steps_to_loss([10, 20, 30], [0.5, 0.3, 0.1], 0.05) is None


def linear_events(slope, steps=100):
    return [{"step": s, "loss": 1.0 - slope * s} for s in range(1, steps + 1)]


def test_steps_to_loss_targets_the_slower_runs_final_loss(tmp_path):
    # LoRA ends at 0.5 (step 100); RefLoRA, twice as fast, is at 0.5 by step 50; RefLoRA-S at step 67
    make_run(tmp_path, "lora-run", state="done", method="lora", events=linear_events(0.005))
    make_run(tmp_path, "reflora-run", state="done", method="reflora", events=linear_events(0.01))
    make_run(tmp_path, "s-run", state="done", method="reflora-s", events=linear_events(0.0075))
    make_run(tmp_path, "empty", state="running", method="lora")
    note, headers, rows = compare.loss_table(tmp_path, ["reflora-run", "lora-run", "s-run", "empty"], beta=0.0)
    assert headers == ["run", "method", "steps", "final loss", "steps to target", "vs. slower run"]
    assert "reaches 0.5, the final smoothed loss of the slower run, lora-run" in note and "empty: no logged" in note
    assert rows == [["reflora-run", "reflora", 100, pytest.approx(0.0), 50, "0.50x"],
                    ["lora-run", "lora", 100, pytest.approx(0.5), 100, "1.00x"],
                    ["s-run", "reflora-s", 100, pytest.approx(0.25), 67, "0.67x"]]


def test_steps_to_loss_reads_the_eval_loss_when_every_run_has_one(tmp_path):
    """A held-out eval loss (fixed noise) falls and then rises as a run memorises its photos: the target is the worse
    run's lowest, and the table reads the eval points, not the noisy training loss."""
    train = linear_events(0.004)  # equal training curves: the training-loss table would say 1.00x
    for name, method, evals in (("lora-run", "lora", [1.0, 0.7, 0.6, 0.65]),
                                ("reflora-run", "reflora", [1.0, 0.6, 0.5, 0.55])):
        make_run(tmp_path, name, state="done", method=method,
                 events=[*train, *({"step": 50 * i, "eval_loss": v} for i, v in enumerate(evals))])
    note, headers, rows = compare.loss_table(tmp_path, ["reflora-run", "lora-run"])
    assert headers == ["run", "method", "steps", "lowest eval loss (step)", "steps to target", "vs. slower run"]
    assert "eval loss (fixed noise and timesteps) reaches 0.6, the lowest eval loss of the worse run, lora-run" in note
    assert rows == [["reflora-run", "reflora", 150, "0.50000 (100)", 50, "0.50x"],
                    ["lora-run", "lora", 150, "0.60000 (100)", 100, "1.00x"]]
    # a run without eval points: back to the training loss for all
    make_run(tmp_path, "no-eval", state="done", method="lora", events=linear_events(0.008))
    note, headers, rows = compare.loss_table(tmp_path, ["reflora-run", "no-eval"], beta=0.0)
    assert headers[3] == "final loss" and "smoothed loss" in note and rows[1][4] == 50
    # an eval loss that never falls clearly: no table
    for name in ("flat-a", "flat-b"):
        make_run(tmp_path, name, state="done", method="lora",
                 events=[*train, {"step": 0, "eval_loss": 0.5}, {"step": 50, "eval_loss": 0.49}])
    note, headers, rows = compare.loss_table(tmp_path, ["flat-a", "flat-b"])
    assert note.startswith("**Steps to loss**: none.") and "lowest eval loss of the worse run" in note and rows == []


def test_no_steps_to_loss_for_a_loss_that_did_not_fall(tmp_path):
    """Diffusion losses are mostly timestep noise: two flat noisy curves once gave "step 1, 100 %" for both."""
    rng = np.random.default_rng(0)
    for name, method in (("a", "lora"), ("b", "reflora")):
        make_run(tmp_path, name, state="done", method=method,
                 events=[{"step": s, "loss": float(rng.uniform(0.05, 0.6))} for s in range(1, 101)])
    note, headers, rows = compare.loss_table(tmp_path, ["a", "b"])
    assert note.startswith("**Steps to loss**: none.") and "did not fall" in note and headers == rows == []
    note, headers, rows = compare.loss_table(tmp_path, ["a"])
    assert "pick two or more runs" in note and rows == []
    assert compare.loss_table(tmp_path, []) == ("", [], [])


def test_loss_figure_one_style_per_method_and_eval_loss(tmp_path):
    same = linear_events(0.005)  # identical curves (RefLoRA's warm-up is plain LoRA): both must stay visible
    make_run(tmp_path, "lora-run", state="done", method="lora",
             events=[*same, {"step": 50, "eval_loss": 0.8}, {"step": 100, "eval_loss": 0.6}])
    make_run(tmp_path, "reflora-run", state="done", method="reflora",
             events=[*same, {"step": 100, "eval": {"eval_loss": 0.55, "eval_accuracy": 0.9}}])  # the LLM trainers'
    fig = compare.loss_figure(tmp_path, ["reflora-run", "lora-run"])
    lines = {line.get_label(): line for line in fig.axes[0].lines if not line.get_label().startswith("_")}
    assert list(lines) == ["reflora: reflora-run", "reflora: reflora-run (eval)", "lora: lora-run",
                           "lora: lora-run (eval)"]
    solid, dashed = lines["reflora: reflora-run"], lines["lora: lora-run"]
    assert solid.get_linestyle() == "-" and dashed.get_linestyle() == "--"
    assert dashed.get_zorder() > solid.get_zorder()  # drawn over the solid line, so one never hides the other
    assert solid.get_color() != dashed.get_color()
    ev = lines["lora: lora-run (eval)"]
    assert ev.get_linestyle() == ":" and ev.get_marker() == "o" and list(ev.get_xdata()) == [50, 100]
    assert list(lines["reflora: reflora-run (eval)"].get_ydata()) == [0.55]
    assert ev.get_color() == dashed.get_color()  # a run's eval loss in the run's colour


def test_samples_at_equal_steps(tmp_path):
    for name, steps in (("a", (5, 10, 15)), ("b", (10, 15, 20))):
        d = make_run(tmp_path, name, state="done", events=[{"step": s, "samples": [f"samples/step_{s}/0.png"]}
                                                           for s in steps])
        for s in steps:
            (d / f"samples/step_{s}").mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(d / f"samples/step_{s}/0.png")
    assert compare.common_sample_steps(tmp_path, ["a", "b"]) == [10, 15]
    step, items = compare.samples_at_step(tmp_path, ["a", "b"])
    assert step == 15 and [p for p, _ in items] == [tmp_path / "a/samples/step_15/0.png",
                                                    tmp_path / "b/samples/step_15/0.png"]
    step, items = compare.samples_at_step(tmp_path, ["a", "b"], 10)
    assert step == 10 and "step 10" in items[0][1]


def lora_run(runs_dir, name, method, random_b: bool):
    """A run folder holding a real diffusers-format adapter for the tiny preset."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from reflora_diffusion.presets import resolve_pretrained

    d = make_run(runs_dir, name, state="done", method=method)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "resolution": 64}))
    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained("tiny"))
    torch.manual_seed(len(name))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=not random_b))
    if random_b:  # a visibly trained adapter
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=layers)
    return d


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory):
    # one thread: on a shared 2-core machine torch's thread pool is many times slower for tiny layers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    lora_run(root, "trained", "reflora", random_b=True)
    lora_run(root, "zero", "lora", random_b=False)
    yield root
    torch.set_num_threads(threads)


def test_generate_grid_loads_each_adapter_into_one_pipeline(adapter_runs):
    kw = dict(prompts=["a photo of sks dog", "", "a dog"], seeds=[0, 1], num_inference_steps=3)
    grid, items = compare.generate_grid(adapter_runs, ["trained", "zero"], **kw)
    assert grid.is_file() and grid.parent.parent == adapter_runs / "_compare"
    pixels = {cap: np.asarray(Image.open(p)) for p, cap in items}
    rows = {}
    for cap, arr in pixels.items():
        rows.setdefault(" · ".join(cap.split(" · ")[:2]), []).append(arr)
    assert list(rows) == ["base model · base", "reflora · trained", "lora · zero"]
    assert all(len(v) == 4 for v in rows.values())
    # a zero adapter (B = 0) changes nothing: the pipeline was clean after the trained adapter's unload
    assert all(np.array_equal(a, b) for a, b in zip(rows["base model · base"], rows["lora · zero"]))
    assert not any(np.array_equal(a, b) for a, b in zip(rows["base model · base"], rows["reflora · trained"]))
    assert not np.array_equal(rows["base model · base"][0], rows["base model · base"][1])  # seeds differ
    assert Image.open(grid).size == (200 + 4 * 196, 64 + 3 * 196)
    # same prompts and seeds again: the same images
    _, again = compare.generate_grid(adapter_runs, ["trained"], include_base=False, **kw)
    assert all(np.array_equal(np.asarray(Image.open(p)), b) for (p, _), b in zip(again, rows["reflora · trained"]))


def test_generate_grid_errors(adapter_runs, tmp_path):
    with pytest.raises(compare.CompareError, match="no prompt given"):
        compare.generate_grid(adapter_runs, ["trained"], ["  "], [0])
    make_run(adapter_runs, "unfinished", state="running")
    with pytest.raises(compare.CompareError, match="'unfinished' has no pytorch_lora_weights.safetensors yet"):
        compare.generate_grid(adapter_runs, ["trained", "unfinished"], ["x"], [0])
    other = make_run(adapter_runs, "other-base", state="done")
    (other / "config.json").write_text(json.dumps({"method": "lora", "pretrained_model_name_or_path": "tiny-sdxl"}))
    with pytest.raises(compare.CompareError, match="different base models"):
        compare.base_model(adapter_runs, ["trained", "other-base"])
