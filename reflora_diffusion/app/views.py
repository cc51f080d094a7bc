"""The app's callbacks: turn form values into jobs and run folders into what the components show.

app.py only lays out components and wires them to these methods, so everything the page does is
testable without a browser. Errors a user can cause come back as messages, never as tracebacks.
"""

from __future__ import annotations

import dataclasses
import html
import os
import threading
from pathlib import Path

from . import compare, downloads, runs
from .jobs import JobError, JobRunner

RUN_COLUMNS = runs.SUMMARY_COLUMNS
# The method dropdowns say in a word what each method does; the value sent is the bare name (as on the CLI).
METHOD_SUMMARIES = {
    "reflora": "refactored LoRA: balanced, preconditioned factors",
    "lora": "plain LoRA, the baseline",
    "reflora-s": "RefLoRA-S: cheap scalar rebalancing of A and B",
    "lora+": "B learns faster (lr of B = ratio x lr of A)",
    "scaledgd": "preconditioned by (BᵀB)⁻¹ and (AAᵀ)⁻¹",
    "preclora": "Riemannian preconditioned LoRA (damped ScaledGD)",
    "nora+": "normalised ScaledGD preconditioners",
    "rac-lora": "chain of links, one factor random and frozen",
    "cola": "chain of LoRA: merge into the base, restart",
}
# The Train form's starting values are the README's main job (its quick-start command) and, for what that
# command leaves out, the trainer's own defaults (SDTrainConfig): a job started with the form untouched is the
# job a user runs in a terminal. None is "the trainer's default": alpha = rank, a drawn seed (recorded in
# config.json), accelerate's mixed precision.
MAIN_JOB = {"pretrained_model_name_or_path": "tiny-emoji", "instance_prompt": "a photo of sks dog",
            "validation_prompt": ["a photo of sks dog"], "method": "reflora", "rank": 16, "lora_conv": True,
            "learning_rate": 3e-3, "snr_gamma": 5.0, "max_train_steps": 600, "checkpointing_steps": 300,
            "validation_steps": 200, "seed": 0}
USER_ERRORS = (JobError, compare.CompareError, downloads.ExportError, runs.RunPathError, FileNotFoundError,
               ValueError)


def method_choices(methods) -> list[tuple[str, str]]:
    """(label, value) pairs for a method dropdown: 'reflora — refactored LoRA: ...', sending 'reflora'."""
    return [(f"{m} — {METHOD_SUMMARIES[m]}" if m in METHOD_SUMMARIES else m, m) for m in methods]


def blank_if_none(value) -> str:
    """A form text box's starting text for an optional number: blank for None (the trainer's default). Optional
    numbers are text boxes because gradio 6 shows and sends a blank gr.Number as 0 (alpha 0 would train nothing)."""
    return "" if value is None else str(value)


def default_job() -> dict:
    """Every train/sd.py option as the Train form starts: the trainer's defaults, then MAIN_JOB."""
    from reflora_diffusion.sd.config import SDTrainConfig

    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(SDTrainConfig)}
    return {**defaults, **MAIN_JOB}


def default_resolution(base: str) -> int:
    """The size a base model is made for, from its own config (presets.native_resolution: a preset is built on
    first use; tiny presets 64, tiny-flux 256); a hub id that cannot be read now: its family's (SD 512, else 1024)."""
    from reflora_diffusion.families import family_of
    from reflora_diffusion.presets import native_resolution

    try:
        return native_resolution(base)
    except Exception:  # noqa: BLE001 - offline hub id, folder being written: fall back to the family's size
        return family_of(base or "").resolution


def bucket_summary(images, resolution, enable_bucket: bool) -> str:
    """The uploaded images per aspect-ratio bucket, as the trainer will form them (empty when buckets are off)."""
    from reflora_diffusion.sd.buckets import default_bucket_options
    from reflora_diffusion.sd.data import bucket_counts

    if not enable_bucket or not images or not resolution:
        return ""
    paths = [getattr(f, "name", f) for f in images]  # gradio gives paths (or file objects in older versions)
    counts = bucket_counts(paths, int(resolution), **default_bucket_options(int(resolution)))
    return "Aspect-ratio buckets (width x height: images): " + ", ".join(f"{w}x{h}: {n}"
                                                                        for (w, h), n in counts.items())


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).replace(",", " ").split()]
    except ValueError:
        raise JobError(f"seeds {text!r} must be whole numbers separated by commas, e.g. '0, 1'") from None
    if not seeds:
        raise JobError("give at least one seed, e.g. '0'")
    return seeds


def progress_html(run: runs.Run | None) -> str:
    """A progress bar with step, state and ETA (plain HTML: no extra component needed)."""
    if run is None:
        return "<div class='rd-progress'>no run selected</div>"
    pct = 100 * run.progress
    color = {"done": "#2e7d32", "failed": "#c62828", "cancelled": "#757575"}.get(run.state, "#1565c0")
    what = run.method if run.kind == "sd" else f"{run.task} · {run.model} · {run.method}"
    steps = f", step {run.step}/{run.max_steps}" if run.max_steps else ""  # an evaluation counts no steps
    eta = f" · ETA {runs.format_eta(run.eta_seconds)}" if run.eta_seconds is not None else ""
    result = f" · {html.escape(run.result)}" if run.result else ""
    bar = (f"<div style='background:#e0e0e0;border-radius:4px;height:14px;margin-top:4px'>"
           f"<div style='background:{color};width:{pct:.1f}%;height:14px;border-radius:4px'></div></div>"
           if run.max_steps else "")
    error = f"<div style='color:#c62828'>{html.escape(run.error)}</div>" if run.error else ""
    return (f"<div class='rd-progress'><b>{html.escape(run.name)}</b> ({html.escape(what)}): {run.state}"
            f"{steps}{eta}{result}{bar}{error}</div>")


class AppViews:
    def __init__(self, runs_dir, runner: JobRunner | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.runner = runner or JobRunner(self.runs_dir)
        self._pipes: dict[str, object] = {}
        self._generate_lock = threading.Lock()

    # ---- Train

    def start(self, form: dict, images=None, name: str = "", ab: bool = False, method_b: str = "lora",
              side_by_side: bool = False) -> tuple[str, list[str]]:
        """Start one run, or an A/B pair differing only in method. Returns (message, run names)."""
        try:
            if ab:
                dirs = self.runner.start_ab(form, methods=(method_b, form.get("method")), name=name or None,
                                            images=images or (), side_by_side=side_by_side)
                how = "side by side" if side_by_side else "one after the other"
                return (f"Started A/B ({how}): {', '.join(d.name for d in dirs)}. {self._limit_note()}The "
                        "comparison grid appears in the Compare tab when both are done.", [d.name for d in dirs])
            run_dir = self.runner.start(form, name=name or None, images=images or ())
        except USER_ERRORS as e:
            return f"**Not started:** {e}", []
        run = runs.read_run(self.runs_dir, run_dir.name)
        if run.state == "failed":  # the trainer could not even be launched
            return f"**Not started:** {run.error}", []
        if run.state == "queued":
            return f"Queued {run_dir.name}. {self._limit_note()}Watch it in the Runs tab.", [run_dir.name]
        return f"Started {run_dir.name}. Watch it in the Runs tab.", [run_dir.name]

    def _limit_note(self) -> str:
        n = self.runner.max_concurrent
        return f"At most {n} job{'s' if n > 1 else ''} run at once; the others wait in the queue. "

    # ---- Runs

    def run_names(self) -> list[str]:
        return [r.name for r in runs.list_runs(self.runs_dir)]

    def status(self, name: str) -> dict:
        """One run's status for scripts: state, step, max_steps, progress, eta_seconds, error, method."""
        run = runs.read_run(self.runs_dir, name)
        return {"name": run.name, "method": run.method, "state": run.state, "step": run.step,
                "max_steps": run.max_steps, "progress": run.progress, "eta_seconds": run.eta_seconds,
                "error": run.error}

    def runs_status(self) -> list[dict]:
        """Every run's status, newest first."""
        return [self.status(r.name) for r in runs.list_runs(self.runs_dir)]

    def run_details(self, name: str | None) -> dict:
        """Everything the Runs tab shows for one run (progress, curve, stats, samples, log)."""
        if not name:
            return {"progress": progress_html(None), "figure": None, "stats": {}, "samples": [], "log": ""}
        try:
            run = runs.read_run(self.runs_dir, name)
        except USER_ERRORS as e:
            return {"progress": f"<div>{html.escape(str(e))}</div>", "figure": None, "stats": {}, "samples": [],
                    "log": ""}
        step, files = runs.latest_samples(self.runs_dir, name)
        return {
            "progress": progress_html(run),
            "figure": compare.loss_figure(self.runs_dir, [name], title=f"loss: {name}"),
            "stats": runs.balance_stats(self.runs_dir, name),
            "samples": [(str(p), f"step {step} #{i}") for i, p in enumerate(files)],
            "log": runs.log_tail(self.runs_dir, name),
        }

    def live(self, selected: str | None, seen: dict | None = None) -> tuple[dict, dict]:
        """The Runs tab for one page on a timer tick: ({"names", "select", "table", "details"}, seen). A part
        unchanged since `seen` (the second value of the previous call for this page) is None, so the page is
        sent nothing: a tick with nothing new reads a few small files and draws no figure. "select" is the run
        to show when `selected` is not a run (the newest), else None: a value sent back could undo a pick made
        meanwhile."""
        seen = seen or {}
        listed = runs.list_runs(self.runs_dir)
        names = [r.name for r in listed]
        select = None
        if selected not in names:
            selected = select = names[0] if names else None
        table = runs.summary_rows(listed)
        signature = self._signature(selected)
        out = {"names": names if names != seen.get("names") else None, "select": select,
               "table": table if table != seen.get("table") else None,
               "details": self.run_details(selected) if signature != seen.get("details") else None}
        return out, {"names": names, "table": table, "details": signature}

    def _signature(self, name: str | None) -> tuple:
        """What a run's details are drawn from: its progress line (state, step, ETA, result, error) and the
        size and time of the files read for the rest. Equal signatures, equal details."""
        if not name:
            return (None,)
        try:
            run = runs.read_run(self.runs_dir, name)
        except USER_ERRORS as e:
            return (name, str(e))
        files = []
        for f in ("events.jsonl", "train.log", "config.json", "results.json"):
            try:
                st = os.stat(run.path / f)
                files.append((st.st_mtime_ns, st.st_size))
            except OSError:
                files.append(None)
        return (name, progress_html(run), *files)

    def cancel(self, name: str | None) -> str:
        if not name:
            return "Pick a run to cancel."
        try:
            return self.runner.cancel(name)
        except USER_ERRORS as e:
            return f"**Not cancelled:** {e}"

    # ---- Compare

    def comparison(self, names: list[str], step=None) -> dict:
        """Everything the Compare tab shows for the picked runs: the overlaid loss figure, the steps-to-loss note,
        headers and rows, the sample steps all runs share, the step shown (the latest by default) and its samples."""
        names = [n for n in names or [] if n]
        out = {"figure": None, "note": "", "headers": [], "rows": [], "steps": [], "step": None, "samples": []}
        if not names:
            return out
        try:
            note, headers, rows = compare.loss_table(self.runs_dir, names)
            shown, items = compare.samples_at_step(self.runs_dir, names, int(step) if step not in (None, "") else None)
            out.update(figure=compare.loss_figure(self.runs_dir, names, title="loss, overlaid"), note=note,
                       headers=headers, rows=rows, steps=compare.common_sample_steps(self.runs_dir, names),
                       step=shown, samples=[(str(p), cap) for p, cap in items])
        except USER_ERRORS as e:
            out["note"] = f"**Cannot compare:** {e}"
        return out

    def saved_samples(self, names: list[str], step) -> list[tuple[str, str]]:
        names = [n for n in names or [] if n]
        if not names:
            return []
        _, items = compare.samples_at_step(self.runs_dir, names, int(step) if step not in (None, "") else None)
        return [(str(p), cap) for p, cap in items]

    def generate(self, names: list[str], prompts: str, seeds: str, steps: int) -> tuple[str | None, str]:
        """(grid image path, message). The base pipeline stays loaded between requests; one generation at a
        time, since adapters are loaded into it in turn."""
        names = [n for n in names or [] if n]
        try:
            compare.ready_runs(self.runs_dir, names)  # fail fast, before loading a pipeline
            seed_list = parse_seeds(seeds)
            with self._generate_lock:
                base = compare.base_model(self.runs_dir, names)
                if base not in self._pipes:
                    self._pipes.clear()  # keep one base model in memory
                    self._pipes[base] = compare.load_pipeline(base)
                grid, _ = compare.generate_grid(self.runs_dir, names, (prompts or "").splitlines(), seed_list,
                                                int(steps), pipe=self._pipes[base])
            return str(grid), f"Generated {grid.parent.name}: same prompts and seeds, one base pipeline."
        except USER_ERRORS as e:
            return None, f"**No grid:** {e}"

    def ab_poll(self, pending: list[str], prompts: str, seeds: str, steps: int):
        """Called on every tick while an A/B pair is pending: when all its runs ended, make the grid.
        Returns (still pending, grid path or None, message or None)."""
        if not pending:
            return pending, None, None
        try:
            states = {n: runs.read_run(self.runs_dir, n).state for n in pending}
        except USER_ERRORS as e:
            return [], None, f"A/B stopped: {e}"
        if any(s in runs.ACTIVE_STATES for s in states.values()):
            return pending, None, None
        bad = {n: s for n, s in states.items() if s != "done"}
        if bad:
            return [], None, "A/B did not finish: " + ", ".join(f"{n} {s}" for n, s in bad.items())
        grid, msg = self.generate(pending, prompts, seeds, steps)
        return [], grid, msg

    # ---- Export

    def export_sources(self, name: str | None) -> list[str]:
        if not name:
            return []
        try:
            return downloads.export_sources(self.runs_dir, name)
        except USER_ERRORS:
            return []

    def export(self, name: str | None, source: str | None, fmt: str) -> tuple[str | None, str | None, str]:
        """(adapter file, model card file, description)."""
        if not name:
            return None, None, "Pick a run to export."
        try:
            result = downloads.export_for_download(self.runs_dir, name, source or downloads.FINAL, fmt)
        except USER_ERRORS as e:
            return None, None, f"**Not exported:** {e}"
        card = str(result["card"]) if result["card"] else None
        return str(result["file"]), card, downloads.info_markdown(result["info"])


def form_options(base, data_dir, captions, instance_prompt, class_prompt, with_prior_preservation,
         validation_prompt, method, rank, alpha, steps, lr, resolution, seed, precision, train_text_encoder,
         warmup_steps, validation_steps, checkpointing_steps, enable_bucket=False, lora_conv=False,
         snr_gamma=None, eval_loss_every=None, eval_data_dir=None) -> dict:
    """The form as train/sd.py options (same names as its CLI flags)."""
    from reflora_diffusion.sd.buckets import default_bucket_options

    data = ({"train_data_dir": data_dir} if captions and data_dir else
            {"instance_data_dir": data_dir, "instance_prompt": instance_prompt})
    return {"pretrained_model_name_or_path": base, **data, "class_prompt": class_prompt,
            "with_prior_preservation": with_prior_preservation, "validation_prompt": validation_prompt,
            "method": method, "rank": rank, "lora_alpha": alpha, "max_train_steps": steps,
            "learning_rate": lr, "resolution": resolution, "seed": seed,
            "mixed_precision": None if precision == "default" else precision,
            "train_text_encoder": train_text_encoder, "refactor_warmup_steps": warmup_steps,
            "validation_steps": validation_steps, "checkpointing_steps": checkpointing_steps,
            "lora_conv": bool(lora_conv), "snr_gamma": snr_gamma or None,  # the form's 0: off
            "eval_loss_every": eval_loss_every,
            "eval_data_dir": eval_data_dir,
            **({"enable_bucket": True, **default_bucket_options(int(resolution))} if enable_bucket else {})}
