"""Compare runs: overlaid loss curves, steps-to-loss, saved samples at equal steps, and a generated
grid (same prompts and seeds, each run's adapter loaded into one base pipeline with load_lora_weights).
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from reflora_diffusion.rundir import read_json

from .runs import event_log, read_run, safe_path, sample_steps

MIN_DROP = 0.1  # steps to loss only when the slower run's smoothed loss fell by 10 % of its start: else it is noise
# One line style per method, so curves that coincide (two methods are the same during RefLoRA's warm-up) all show:
# the solid one is drawn first, the others over it. The run's colour tells two runs of one method apart.
METHOD_STYLES = {"reflora": "-", "lora": "--", "reflora-s": "-.", "lora+": (0, (6, 2)), "scaledgd": (0, (3, 1, 1, 1)),
                 "preclora": (0, (1, 1)), "nora+": (0, (3, 1, 1, 1, 1, 1)), "rac-lora": (0, (8, 2, 1, 2)),
                 "cola": (0, (10, 3))}
EVAL_STYLE = {"linestyle": ":", "marker": "o", "markersize": 4, "linewidth": 1.2}


class CompareError(ValueError):
    """Runs that cannot be compared; the message is shown to the user as is."""


# --------------------------------------------------------------------------- loss curves


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): diffusion losses
    are very noisy per step, so curves and steps-to-loss are read from this."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta**i))
    return out


def steps_to_loss(steps: list[int], losses: list[float], target: float) -> int | None:
    """First step at which the loss is <= target, None if never."""
    return next((s for s, v in zip(steps, losses) if v <= target), None)


def start_level(losses: list[float]) -> float:
    """Where a loss curve starts: the mean raw loss of its first tenth (at least one step)."""
    head = losses[:max(1, len(losses) // 10)]
    return sum(head) / len(head)


STEPS_TO_LOSS_HEADERS = ["run", "method", "steps", "final loss", "steps to target", "vs. slower run"]
EVAL_HEADERS = ["run", "method", "steps", "lowest eval loss (step)", "steps to target", "vs. slower run"]


def loss_table(runs_dir, names: list[str], beta: float = 0.9) -> tuple[str, list[str], list[list]]:
    """(note, headers, rows) of steps to loss. When every picked run logged an eval loss (fixed noise and
    timesteps: the same measurement for every run, ``--eval_loss_every``) at two or more steps, the table reads
    it: the target is the lowest eval loss of the worse run (the higher of the runs' lowest), since a held-out loss
    can rise again as a run memorises its images; each row says at which eval step a run first got there. Otherwise
    it reads the training loss, smoothed: the target is the final smoothed loss of the slower run. Each row gives the
    step relative to the slower run's. No table (a note saying why) for fewer than two runs with logged losses, or
    when a run did not start clearly above the target (by MIN_DROP of its start): a step at which a flat, noisy
    curve crosses a level measures nothing."""
    logs = {name: event_log(safe_path(runs_dir, name)) for name in names}
    on_eval = len(names) > 1 and all(len(log.eval_steps) > 1 for log in logs.values())
    if on_eval:
        curves = {n: (log.eval_steps, log.eval_losses, log.eval_losses) for n, log in logs.items()}
        lowest = {n: min(zip(c[1], c[0])) for n, c in curves.items()}  # (loss, step)
        slower = max(curves, key=lambda n: lowest[n][0])
        target, what = lowest[slower][0], f"the lowest eval loss of the worse run, {slower}"
        reads, headers = "eval loss (fixed noise and timesteps)", list(EVAL_HEADERS)
        last = {n: f"{lowest[n][0]:.5f} ({lowest[n][1]})" for n in curves}
    else:
        curves = {n: (log.steps, log.losses, smooth(log.losses, beta)) for n, log in logs.items() if log.steps}
        if len(curves) >= 2:
            slower = max(curves, key=lambda n: curves[n][2][-1])
            target, what = curves[slower][2][-1], f"the final smoothed loss of the slower run, {slower}"
        reads, headers = f"smoothed loss (moving average, {beta})", list(STEPS_TO_LOSS_HEADERS)
        last = {n: round(c[2][-1], 5) for n, c in curves.items()}
    missing = [n for n in names if n not in curves]
    skipped = f" ({', '.join(missing)}: no logged loss yet)" if missing else ""
    if len(curves) < 2:
        return (f"**Steps to loss**: pick two or more runs with logged losses{skipped}." if names else ""), [], []
    for name, (_, raw, _) in curves.items():  # every curve must start clearly above the target
        start = raw[0] if on_eval else start_level(raw)  # (an eval loss has no step noise to average)
        if start - target < MIN_DROP * abs(start):
            return (f"**Steps to loss**: none. The target, {target:.4g} ({what}), is not clearly below where {name} "
                    f"started ({start:.4g}): the loss did not fall clearly, so the step at which a run reaches it "
                    f"would measure noise. Compare the samples and the grid instead{skipped}."), [], []
    reach = {n: steps_to_loss(c[0], c[2], target) for n, c in curves.items()}
    rows = []
    for name, (steps, _, _) in curves.items():
        r = reach[name]
        rows.append([name, read_run(runs_dir, name).method, steps[-1], last[name],
                     r if r is not None else "not reached",
                     f"{r / reach[slower]:.2f}x" if r is not None and reach[slower] else ""])
    note = (f"**Steps to loss**: the first step at which each run's {reads} reaches {target:.4g}, {what}; fewer is "
            f"faster{skipped}.")
    return note, headers, rows


def loss_figure(runs_dir, names: list[str], beta: float = 0.9, title: str = "training loss"):
    """matplotlib figure: each run's raw loss (faint) and smoothed loss, in one line style per method (solid
    RefLoRA, dashed LoRA, ...) and one colour per run, and its evaluation loss (dotted, with markers) if its
    events carry one; labelled with the method and the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for i, name in enumerate(names):
        log = event_log(safe_path(runs_dir, name))
        if not log.steps and not log.eval_steps:
            continue
        color = f"C{i % 10}"
        method = str((read_json(safe_path(runs_dir, name, "config.json"), {}) or {}).get("method", "?"))
        style = METHOD_STYLES.get(method, "-")
        if log.steps:
            ax.plot(log.steps, log.losses, color=color, alpha=0.2, linewidth=0.7, zorder=1)
            ax.plot(log.steps, smooth(log.losses, beta), color=color, linestyle=style, linewidth=1.8,
                    zorder=2 if style == "-" else 3, label=f"{method}: {name}")
        if log.eval_steps:
            ax.plot(log.eval_steps, log.eval_losses, color=color, zorder=4, label=f"{method}: {name} (eval)",
                    **EVAL_STYLE)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no logged steps yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    plt.close(fig)  # gradio renders the figure object; keep pyplot's global state empty
    return fig


# --------------------------------------------------------------------------- saved samples


def common_sample_steps(runs_dir, names: list[str]) -> list[int]:
    """Steps at which every one of the runs saved validation samples."""
    sets = [set(sample_steps(runs_dir, n)) for n in names]
    return sorted(set.intersection(*sets)) if sets else []


def samples_at_step(runs_dir, names: list[str], step: int | None = None) -> tuple[int | None, list[tuple[Path, str]]]:
    """(step, [(image, caption)]) of saved samples at one step common to all runs (latest by default):
    compares methods at equal steps without generating anything."""
    steps = common_sample_steps(runs_dir, names)
    if not steps:
        return None, []
    step = step if step in steps else steps[-1]
    items = []
    for name in names:
        method = read_run(runs_dir, name).method
        for i, path in enumerate(sample_steps(runs_dir, name)[step]):
            items.append((path, f"{method} · {name} · step {step} · #{i}"))
    return step, items


# --------------------------------------------------------------------------- generated grid


def base_model(runs_dir, names: list[str]) -> str:
    """The one base model the runs share (an adapter only makes sense on its own base)."""
    bases = {(read_run(runs_dir, n).config.get("pretrained_model_name_or_path") or "tiny") for n in names}
    if len(bases) != 1:
        raise CompareError(f"the runs use different base models ({', '.join(sorted(bases))}); pick runs of one base")
    return bases.pop()


def ready_runs(runs_dir, names: list[str]):
    """The runs, if each has its final adapter; CompareError naming the first that has not."""
    if not names:
        raise CompareError("pick at least one run to compare")
    runs = [read_run(runs_dir, n) for n in names]
    for r in runs:
        if r.kind != "sd":
            raise CompareError(f"run {r.name!r} is a {r.task} run; the comparison grid is for Stable Diffusion runs "
                               "(compare its loss curve instead)")
        if not (r.path / "pytorch_lora_weights.safetensors").is_file():
            raise CompareError(f"run {r.name!r} has no pytorch_lora_weights.safetensors yet ({r.state}); "
                               "wait until it is done or pick another run")
    return runs


def load_pipeline(base: str):
    import torch
    from diffusers import DiffusionPipeline

    from reflora_diffusion.families import family_of
    from reflora_diffusion.presets import resolve_pretrained

    cuda = torch.cuda.is_available()
    # SD3 and FLUX overflow in fp16 (the trainer refuses fp16 for them too): bf16 on a GPU
    half = torch.float16 if family_of(base).fp16 else torch.bfloat16
    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(base), dtype=half if cuda else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if cuda else "cpu")


def generate_grid(runs_dir, names: list[str], prompts: list[str], seeds: list[int], num_inference_steps: int = 20,
                  include_base: bool = True, pipe=None, out_dir: Path | None = None) -> tuple[Path, list[tuple[Path, str]]]:
    """Images for every (prompt, seed) from the base model and from each run's final adapter, all in
    one pipeline; saved under <runs_dir>/_compare/<time>/ with a labelled grid.png."""
    import torch

    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise CompareError("no prompt given; enter one prompt per line")
    runs = ready_runs(runs_dir, names)
    pipe = pipe or load_pipeline(base_model(runs_dir, names))
    size = runs[0].config.get("resolution")
    size_kw = {"height": int(size), "width": int(size)} if size else {}
    out_dir = out_dir or safe_path(runs_dir, "_compare", f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}")
    out_dir.mkdir(parents=True, exist_ok=True)

    rows: list[tuple[str, str, list]] = []  # (method, run name, images)

    def render():
        images = []
        for prompt in prompts:
            for seed in seeds:
                g = torch.Generator("cpu").manual_seed(int(seed))
                images.append(pipe(prompt=prompt, num_inference_steps=num_inference_steps, generator=g, **size_kw).images[0])
        return images

    with torch.inference_mode():
        if include_base:
            rows.append(("base model", "base", render()))
        for r in runs:
            pipe.load_lora_weights(str(r.path), weight_name="pytorch_lora_weights.safetensors")
            try:
                rows.append((r.method, r.name, render()))
            finally:
                pipe.unload_lora_weights()  # the next run starts from the same clean base

    captions = [f"{p[:60]} · seed {s}" for p in prompts for s in seeds]
    items = []
    for i, (method, name, images) in enumerate(rows):
        for j, (img, cap) in enumerate(zip(images, captions)):
            path = out_dir / f"{i}-{name}-{j}.png"
            img.save(path)
            items.append((path, f"{method} · {name} · {cap}"))
    grid = make_grid(rows, captions)
    grid.save(out_dir / ".grid.png.tmp", format="PNG")
    (out_dir / ".grid.png.tmp").replace(out_dir / "grid.png")
    return out_dir / "grid.png", items


def make_grid(rows: list[tuple[str, str, list]], captions: list[str], cell: int = 192):
    """One labelled image: a row per model (method and run name on the left), a column per (prompt, seed)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    label_w, head_h, pad = 200, 64, 4
    ncols = max(len(images) for *_, images in rows)
    grid = Image.new("RGB", (label_w + ncols * (cell + pad), head_h + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, cap in enumerate(captions):
        draw.multiline_text((label_w + j * (cell + pad) + 4, 6), textwrap.fill(cap, 22), fill="black", font=font)
    for i, (method, name, images) in enumerate(rows):
        y = head_h + i * (cell + pad)
        label = method if method == name or name == "base" else f"{method}\n" + textwrap.fill(name, 22)
        draw.multiline_text((8, y + cell // 2 - 20), label, fill="black", font=font)
        for j, img in enumerate(images):
            # nearest-neighbour: small sample images stay sharp instead of blurred
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + j * (cell + pad), y))
    return grid
