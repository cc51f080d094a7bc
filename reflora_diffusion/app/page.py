"""The app's page: one function per tab builds its components; build_demo lays the tabs out and wires the events.

The logic behind the events is in views.py (AppViews: starting jobs, live run state, comparisons, exports), and the
form's fields map to train/sd.py's options in views.form_options.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import gradio as gr

from reflora_diffusion.core import METHODS
from reflora_diffusion.presets import PRESETS

from .jobs import JobRunner
from .views import (RUN_COLUMNS, AppViews, blank_if_none, bucket_summary, default_job, default_resolution, form_options,
                    method_choices)

POLL_SECONDS = 2.0
# Scrolls the run's log to its last line (autoscroll follows new lines only from there): run in the browser when
# the Runs tab is shown or another run is picked, since a log filled while the tab was hidden opens at its top.
SCROLL_LOG_TO_END = """() => { setTimeout(() => { const log = document.querySelector('#run-log textarea');
  if (log) log.scrollTop = log.scrollHeight; }, 100); }"""


def train_tab(job: dict, methods: list) -> SimpleNamespace:
    """The Train tab: base, data, prompts, method and its options, Start and Start A/B."""
    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column():
                base = gr.Dropdown([*sorted(PRESETS, key=lambda p: p != "tiny-emoji"),  # the pretrained one first
                                    "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                    "stabilityai/stable-diffusion-xl-base-1.0"],
                                   value=job["pretrained_model_name_or_path"],
                                   allow_custom_value=True, label="Base model (hub id, local folder, or a preset: "
                                   "tiny-emoji is pretrained on emoji, the other tiny ones are random)")
                images = gr.File(file_count="multiple", file_types=["image"], label="Training images")
                with gr.Row():
                    data_dir = gr.Textbox("", label="…or a folder of images on this machine", scale=3)
                    captions = gr.Checkbox(False, label="folder has captions (metadata.jsonl or .txt)",
                                           scale=1)
                instance_prompt = gr.Textbox(job["instance_prompt"], label="Instance prompt")
                validation_prompt = gr.Textbox("\n".join(job["validation_prompt"]), lines=2,
                                               label="Sample prompts (one per line)")
            with gr.Column():
                with gr.Row():
                    method = gr.Dropdown(methods, value=job["method"], label="Method")
                    method_b = gr.Dropdown(methods, value="lora", label="A/B: compare with")
                with gr.Row():
                    rank = gr.Number(job["rank"], precision=0, label="Rank")
                    alpha = gr.Textbox(blank_if_none(job["lora_alpha"]), label="Alpha", placeholder="= rank")
                    steps = gr.Number(job["max_train_steps"], precision=0, label="Steps")
                with gr.Row():
                    lr = gr.Number(job["learning_rate"], label="Learning rate")
                    resolution = gr.Number(default_resolution(job["pretrained_model_name_or_path"]),
                                           precision=0, label="Resolution")
                    seed = gr.Textbox(blank_if_none(job["seed"]), label="Seed", placeholder="drawn")
                with gr.Row():
                    precision = gr.Dropdown([("accelerate's setting", "default"), "no", "fp16", "bf16"],
                                            value=job["mixed_precision"] or "default", label="Precision")
                    train_te = gr.Checkbox(False, label="Text-encoder LoRA")
                    lora_conv = gr.Checkbox(job["lora_conv"], label="Conv LoRA (LoCon)",
                                            info="the UNet's convolutions too: tiny-emoji needs it to learn photos")
                    enable_bucket = gr.Checkbox(False, label="Aspect-ratio buckets",
                                                info="train non-square photos at their own shape")
                buckets_msg = gr.Markdown()
                with gr.Accordion("More options", open=False):
                    with gr.Row():
                        warmup = gr.Textbox(blank_if_none(job["refactor_warmup_steps"]), label="RefLoRA warm-up steps",
                                            placeholder="min(100, 10 % of the run)")
                        snr_gamma = gr.Number(job["snr_gamma"] or 0, label="Min-SNR gamma (0: off)")
                        val_steps = gr.Number(job["validation_steps"], precision=0,
                                              label="Sample every N steps")
                        ckpt_steps = gr.Number(job["checkpointing_steps"], precision=0,
                                               label="Checkpoint every N steps")
                    with gr.Row():
                        eval_every = gr.Number(job["eval_loss_every"], precision=0,
                                               label="Eval loss every N steps (0: off)",
                                               info="denoising loss at fixed noise and timesteps, the same for every "
                                                    "run: Runs and Compare plot it")
                        eval_dir = gr.Textbox("", label="Eval loss on the images of this folder",
                                              placeholder="held-out images; blank: the training images (a fit "
                                                          "measure)", scale=2)
                    with gr.Row():
                        prior = gr.Checkbox(False, label="Prior preservation (class images)")
                        class_prompt = gr.Textbox("", label="Class prompt, e.g. 'a photo of dog'")
                    run_name = gr.Textbox("", label="Run name (optional)")
                    side_by_side = gr.Checkbox(False, label="A/B side by side (default: one after the other)",
                                               info="at once if the app's job limit allows")
        with gr.Row():
            start_btn = gr.Button("Start", variant="primary")
            ab_btn = gr.Button("Start A/B (both methods, same data and seed)", variant="secondary")
        train_msg = gr.Markdown()
    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, gr.blocks.Block)})


def runs_tab() -> SimpleNamespace:
    """The Runs tab: the live table, one run's progress, loss, statistics, samples and log."""
    with gr.Tab("Runs", id="runs") as tab:
        runs_table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False,
                                  label="Runs (refreshed live)")
        with gr.Row():
            run_pick = gr.Dropdown([], label="Run", scale=3, allow_custom_value=True)
            cancel_btn = gr.Button("Cancel run", variant="stop", scale=1)
        cancel_msg = gr.Markdown()
        progress = gr.HTML()
        with gr.Row():
            loss_plot = gr.Plot(label="Loss")
            stats = gr.JSON(label="RefLoRA balance statistics (latest step)")
        samples = gr.Gallery(label="Latest validation samples", columns=6, height=220, fit_columns=False,
                             object_fit="contain")
        log = gr.Textbox(label="train.log (tail)", lines=12, max_lines=12, autoscroll=True, elem_id="run-log")
    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, gr.blocks.Block)})


def compare_tab() -> SimpleNamespace:
    """The Compare tab: runs' adapters on the same prompts and seeds, overlaid losses, saved samples."""
    with gr.Tab("Compare", id="compare"):
        cmp_runs = gr.Dropdown([], multiselect=True, label="Runs to compare",
                               allow_custom_value=True)
        with gr.Row():
            cmp_prompts = gr.Textbox("a photo of sks dog\na sks dog on the beach", lines=2,
                                     label="Prompts (one per line)")
            cmp_seeds = gr.Textbox("0, 1", label="Seeds")
            cmp_steps = gr.Slider(1, 100, value=20, step=1, label="Denoising steps")
        gen_btn = gr.Button("Generate comparison grid", variant="primary")
        cmp_msg = gr.Markdown()
        gr.Markdown("**Comparison grid**: the same prompts and seeds, each adapter loaded into one base "
                    "pipeline (`load_lora_weights`).")
        grid = gr.Image(show_label=False, type="filepath", elem_id="comparison-grid")
        cmp_plot = gr.Plot(label="Loss, overlaid (one line style per method, one colour per run)")
        cmp_note = gr.Markdown()
        # hidden until there is something to show: an empty Dataframe shows "1 2 3" as its headers
        cmp_table = gr.Dataframe(interactive=False, visible=False, label="Steps to loss", show_label=False,
                                 wrap=True)
        with gr.Row():
            sample_step = gr.Dropdown([], label="Saved samples at step", allow_custom_value=True)
        saved = gr.Gallery(label="Saved validation samples at equal steps", columns=6, height=240,
                           fit_columns=False, object_fit="contain")
    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, gr.blocks.Block)})


def export_tab() -> SimpleNamespace:
    """The Export tab: a run's final adapter or a checkpoint as diffusers or kohya files."""
    with gr.Tab("Export", id="export"):
        with gr.Row():
            exp_run = gr.Dropdown([], label="Run to export", allow_custom_value=True)
            exp_source = gr.Dropdown([], label="Final adapter or checkpoint", allow_custom_value=True)
            exp_format = gr.Radio(["diffusers", "kohya"], value="diffusers",
                                  label="Format (kohya = A1111 / ComfyUI)")
        exp_btn = gr.Button("Export", variant="primary")
        exp_info = gr.Markdown()
        with gr.Row():
            exp_file = gr.File(label="Adapter (.safetensors)")
            exp_card = gr.File(label="Model card (.md)")
    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, gr.blocks.Block)})


def parts(ns: SimpleNamespace, names: str) -> tuple:
    """Components of a tab by name, in the order given."""
    return tuple(getattr(ns, n) for n in names.split())


def build_demo(runs_dir: str, max_concurrent_jobs: int | None = None) -> gr.Blocks:
    """The page. No run names are baked into it (a login page would show them): the run lists and
    tables are filled on load, i.e. after the login, and by the timer."""
    views = AppViews(runs_dir, JobRunner(runs_dir, max_concurrent=max_concurrent_jobs))
    methods = method_choices(METHODS)  # (label, name): the label says what the method does, the name is sent
    job = default_job()  # the README's main job: what the CLI runs

    with gr.Blocks(title="reflora-diffusion") as demo:
        gr.Markdown("## reflora-diffusion · LoRA vs RefLoRA for Stable Diffusion")
        timer = gr.Timer(POLL_SECONDS)
        ab_pending = gr.State([])
        with gr.Tabs():
            t, r, c, e = train_tab(job, methods), runs_tab(), compare_tab(), export_tab()
        # the components the events below connect, by name
        (base, images, data_dir, captions, instance_prompt, validation_prompt, method, method_b, rank, alpha,
         steps, lr, resolution, seed, precision, train_te, lora_conv, enable_bucket, buckets_msg, warmup,
         snr_gamma, val_steps, ckpt_steps, eval_every, eval_dir, prior, class_prompt, run_name, side_by_side,
         start_btn, ab_btn, train_msg) = parts(
            t, "base images data_dir captions instance_prompt validation_prompt method method_b rank alpha steps lr "
            "resolution seed precision train_te lora_conv enable_bucket buckets_msg warmup snr_gamma val_steps "
            "ckpt_steps eval_every eval_dir prior class_prompt run_name side_by_side start_btn ab_btn train_msg")
        (runs_table, run_pick, cancel_btn, cancel_msg, progress, loss_plot, stats, samples, log, tab_runs) = parts(
            r, "runs_table run_pick cancel_btn cancel_msg progress loss_plot stats samples log tab")
        (cmp_runs, cmp_prompts, cmp_seeds, cmp_steps, gen_btn, cmp_msg, grid, cmp_plot, cmp_note, cmp_table,
         sample_step, saved) = parts(
            c, "cmp_runs cmp_prompts cmp_seeds cmp_steps gen_btn cmp_msg grid cmp_plot cmp_note cmp_table "
            "sample_step saved")
        (exp_run, exp_source, exp_format, exp_btn, exp_info, exp_file, exp_card) = parts(
            e, "exp_run exp_source exp_format exp_btn exp_info exp_file exp_card")

        # run dropdowns allow any value: their choices change as runs appear; names are checked in the package
        # ---------------------------------------------------------------- wiring
        form_inputs = [images, run_name, base, data_dir, captions, instance_prompt, class_prompt, prior,
                       validation_prompt, method, rank, alpha, steps, lr, resolution, seed, precision, train_te, warmup,
                       val_steps, ckpt_steps, enable_bucket, lora_conv, snr_gamma, eval_every, eval_dir]

        form_fields = set(inspect.signature(form_options).parameters)

        # explicit parameters (not *args): they are the names scripts use with gradio_client. From alpha on they
        # default to None: a field that starts blank (alpha, seed: the trainer's default) is then optional there too.
        def start(images, run_name, base, data_dir, captions, instance_prompt, class_prompt, with_prior_preservation,
                  validation_prompt, method, rank, alpha=None, steps=None, lr=None, resolution=None, seed=None,
                  precision=None, train_text_encoder=None, warmup_steps=None, validation_steps=None,
                  checkpointing_steps=None, enable_bucket=None, lora_conv=None, snr_gamma=None, eval_loss_every=None,
                  eval_data_dir=None):
            fields = {k: v for k, v in locals().items() if k in form_fields}
            msg, _ = views.start(form_options(**fields), images, run_name)
            return msg

        def start_ab(method_b, side_by_side, images, run_name, base, data_dir, captions, instance_prompt,
                     class_prompt, with_prior_preservation, validation_prompt, method, rank, alpha=None, steps=None,
                     lr=None, resolution=None, seed=None, precision=None, train_text_encoder=None, warmup_steps=None,
                     validation_steps=None, checkpointing_steps=None, enable_bucket=None, lora_conv=None,
                     snr_gamma=None, eval_loss_every=None, eval_data_dir=None):
            fields = {k: v for k, v in locals().items() if k in form_fields}
            msg, names = views.start(form_options(**fields), images, run_name, ab=True, method_b=method_b,
                                     side_by_side=side_by_side)
            if not names:
                return msg, [], gr.update()
            return msg, names, gr.Dropdown(choices=views.run_names(), value=names)

        private = {"api_visibility": "private"}
        base.change(default_resolution, base, resolution, **private)
        for trigger in (images.change, resolution.change, enable_bucket.change):
            trigger(bucket_summary, [images, resolution, enable_bucket], buckets_msg, **private)
        start_btn.click(start, form_inputs, train_msg, api_name="start")
        ab_btn.click(start_ab, [method_b, side_by_side, *form_inputs], [train_msg, ab_pending, cmp_runs],
                     api_name="start_ab")

        live = [runs_table, run_pick, cmp_runs, exp_run, progress, loss_plot, stats, samples, log]

        seen = gr.State(None)  # what this page was last sent: a tick sends only what changed since

        def refresh(selected, seen):
            out, seen = views.live(selected, seen)
            names, d = out["names"], out["details"]
            pick = {**({"choices": names} if names is not None else {}),
                    **({"value": out["select"]} if out["select"] is not None else {})}
            choices = gr.skip() if names is None else gr.update(choices=names)
            details = (gr.skip(),) * 5 if d is None else (d["progress"], d["figure"], d["stats"], d["samples"],
                                                          d["log"])
            return (gr.skip() if out["table"] is None else out["table"], gr.update(**pick) if pick else gr.skip(),
                    choices, choices, *details, seen)

        timer.tick(refresh, [run_pick, seen], [*live, seen], show_progress="hidden", **private)
        demo.load(refresh, [run_pick, seen], [*live, seen], show_progress="hidden", **private)
        run_pick.input(refresh, [run_pick, seen], [*live, seen], show_progress="hidden", **private).then(
            None, js=SCROLL_LOG_TO_END, **private)
        tab_runs.select(None, js=SCROLL_LOG_TO_END, **private)
        cancel_btn.click(views.cancel, run_pick, cancel_msg, api_name="cancel")

        compared = [cmp_plot, cmp_note, cmp_table, sample_step, saved]

        def comparison(names):
            # the samples come with the step: picking one more run can leave the step as it was
            c = views.comparison(names)
            table = (gr.Dataframe(value={"headers": c["headers"], "data": c["rows"]}, visible=True) if c["rows"]
                     else gr.Dataframe(value=None, visible=False))
            return (c["figure"], c["note"], table, gr.Dropdown(choices=c["steps"], value=c["step"]), c["samples"])

        def ab_tick(pending, prompts, seeds, steps):
            names = list(pending or [])
            pending, grid_path, msg = views.ab_poll(pending, prompts, seeds, steps)
            curves = comparison(names) if grid_path else (gr.skip(),) * len(compared)
            return (pending, grid_path or gr.skip(), msg or gr.skip(), *curves)

        timer.tick(ab_tick, [ab_pending, cmp_prompts, cmp_seeds, cmp_steps],
                   [ab_pending, grid, cmp_msg, *compared], show_progress="hidden", **private)
        cmp_runs.input(comparison, cmp_runs, compared, **private)
        sample_step.input(views.saved_samples, [cmp_runs, sample_step], saved, **private)
        gen_btn.click(views.generate, [cmp_runs, cmp_prompts, cmp_seeds, cmp_steps], [grid, cmp_msg],
                      api_name="generate")

        def sources(name):
            choices = views.export_sources(name)
            return gr.Dropdown(choices=choices, value=choices[0] if choices else None)

        exp_run.input(sources, exp_run, exp_source, **private)
        exp_btn.click(views.export, [exp_run, exp_source, exp_format], [exp_file, exp_card, exp_info],
                      api_name="export")

        # plain endpoints for scripts (gradio_client): the run list and one run's status
        gr.api(views.runs_status, api_name="runs")
        gr.api(views.status, api_name="status")
    return demo
