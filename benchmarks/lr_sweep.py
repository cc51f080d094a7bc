"""Which method wins once each one's learning rate is tuned? LoRA vs RefLoRA vs RefLoRA-S over a grid of rates.

Issue 26's study, part 1 (tiny-emoji: a DreamBooth subject, and with --data style the Twemoji style): every cell is one
(method, lr, seed) run of the SD trainer with equal steps, paired data order and LoRA init (the seed), and the
held-out loss at fixed noise and timesteps (`--eval_loss_every`) as the primary metric: the same noise for every
method and run, on images the run never trains on (subject: the first N-1 photos train, the last is held out;
style: 120 Twemoji train, 40 other emoji are held out, each captioned '<name> in sks style').

    python benchmarks/lr_sweep.py --steps 600 --seeds 0 1 2 3 4       # 3 methods x 4 rates x 5 seeds, hours
    python benchmarks/lr_sweep.py --steps 8 --methods lora --lrs 1e-3 --seeds 0 --out /tmp/sweep   # smoke test
    python benchmarks/lr_sweep.py --data style --steps 600     # the Twemoji style: 120 emoji train, 40 held out

Cells are resumable: each finished cell is a JSON file under `<out>/cells/` and is skipped on the next start,
so the sweep can run in the background across sessions (give it OMP_NUM_THREADS / --threads its share).
Per method the report gives: its best mean held-out loss and the rate there, the width of its good band (the
rates within --tolerance of its best, as a ratio max/min rate), the step at which it first reaches LoRA's final
held-out loss (at the eval points), and the paired difference to LoRA at each method's best rate with a 95 %
confidence interval over seeds. Writes `<out>.json` and `<out>.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
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


def summarize(cells: list[dict], tolerance: float) -> dict:
    """Per method: best rate, band width, steps to LoRA's final held-out loss, paired differences to LoRA."""
    final = lambda c: c["eval_loss"][str(c["steps"])]  # noqa: E731
    by = {}
    for c in cells:
        by.setdefault(c["method"], {}).setdefault(c["lr"], {})[c["seed"]] = c
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
                 "good_band": [min(good), max(good)], "band_width": max(good) / min(good), "seeds": len(rates[best_lr])}
        # the held-out loss at 25 / 50 / 100 % of the run at the best rate, the lowest it reached at any eval point
        # (early stopping), and the training loss at the end: on a few photos the held-out loss rises as a run
        # memorises its training images, so the end alone rewards what learns least
        cs = list(rates[best_lr].values())
        steps = sorted(int(k) for k in cs[0]["eval_loss"])
        entry["eval_loss_at"] = {str(k): statistics.fmean(c["eval_loss"][str(k)] for c in cs) for k in steps if k}
        entry["lowest_eval_loss_by_lr"] = {lr: statistics.fmean(min(v for k, v in c["eval_loss"].items() if k != "0")
                                                                for c in seeds.values())
                                           for lr, seeds in rates.items()}
        entry["final_train_loss_by_lr"] = {lr: statistics.fmean(c["final_train_loss"] for c in seeds.values())
                                           for lr, seeds in rates.items()}
        if lora_best is not None:
            target = statistics.fmean(final(c) for c in lora_best.values())
            reached = []
            for c in rates[best_lr].values():
                steps = sorted(int(s) for s in c["eval_loss"])
                reached.append(next((s for s in steps if s > 0 and c["eval_loss"][str(s)] <= target), None))
            entry["steps_to_lora_final"] = reached
            paired = [final(rates[best_lr][s]) - final(lora_best[s]) for s in rates[best_lr] if s in lora_best]
            if len(paired) > 1:
                mean, sd = statistics.fmean(paired), statistics.stdev(paired)
                half = T95.get(len(paired) - 1, 1.96) * sd / math.sqrt(len(paired))
                entry["paired_diff_to_lora"] = {"mean": mean, "ci95": [mean - half, mean + half], "n": len(paired)}
            elif paired:
                entry["paired_diff_to_lora"] = {"mean": paired[0], "ci95": None, "n": 1}
        report[method] = entry
    return report


TITLES = {"dog": "tiny-emoji DreamBooth (dog photos, one held out): learning-rate sweep",
          "style": "tiny-emoji Twemoji style (120 emoji train, 40 other emoji held out): learning-rate sweep"}


def plot(report: dict, path: Path, data: str = "dog") -> None:
    fig, axes = common.pyplot().subplots(1, 3, figsize=(14, 3.8))
    panels = (("mean_eval_loss_by_lr", "held-out loss at the end"), ("lowest_eval_loss_by_lr", "lowest held-out loss"),
              ("final_train_loss_by_lr", "training loss at the end"))
    for ax, (key, title) in zip(axes, panels):
        for method, entry in report.items():
            rates = sorted(entry[key])
            ax.plot(rates, [entry[key][r] for r in rates], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{title} (mean over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(TITLES[data], fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lora", "reflora", "reflora-s"])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt", default="a photo of sks dog")
    p.add_argument("--data", choices=["dog", "style"], default="dog",
                   help="dog: DreamBooth subject (4 photos train, 1 held out); style: Twemoji (120 train, 40 held out)")
    p.add_argument("--tolerance", type=float, default=0.05, help="good band: within this fraction of the best")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default: benchmarks/results/lr_sweep (dog) or lr_sweep_style")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or common.RESULTS / ("lr_sweep_style" if args.data == "style" else "lr_sweep"))
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        train, held = split_style(Path(work)) if args.data == "style" else split_subject(DOG, Path(work))
        for seed in args.seeds:  # seed-major: a partial sweep already pairs every method and rate
            for lr in args.lrs:
                for method in args.methods:
                    result, new = common.cell(cells_dir / f"{method}-lr{lr:g}-s{seed}-n{args.steps}.json",
                                              lambda: run_cell(method, lr, seed, args, train, held))
                    if new:
                        print(json.dumps(result), flush=True)
    cells = [json.loads(c.read_text()) for c in sorted(cells_dir.glob(f"*-n{args.steps}.json"))]
    report = summarize(cells, args.tolerance)
    common.write_json(out.with_suffix(".json"), {"data": args.data, "steps": args.steps, "tolerance": args.tolerance,
                                                 "cells": len(cells), "methods": report})
    plot(report, out.with_suffix(".png"), args.data)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
