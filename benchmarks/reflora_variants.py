"""Why RefLoRA is (or is not) faster under Adam, and which variant is (issue 9, part 2).

The theory (Theorems 3-6) is for plain gradient steps; the paper trains with AdamW, whose per-coordinate scaling
partly undoes a preconditioner. On the low-rank matrix-factorization problem of Figure 2 (fit s B A to a rank-r
target, A ~ N(0, 1), B = 0, a plain-LoRA warm-up before refactoring starts, the real core on torch optimizers):

- optimizers: plain GD and SGD with momentum 0.9 (where the theory holds), Adam;
- methods: LoRA, RefLoRA with S* on the gradient (the paper's default), the same with `normalize` (det S* = 1),
  S* on Adam's update (`apply_to="update"`, also normalized), stepping in the balanced factorization with the moments
  carried (`apply_to="factors"`), RefLoRA-S;
- each curve a mean of log10 loss over seeds, at several learning rates (the same grid for every method);
- instrumentation from the core's stats: S* eigenvalue spread (1 = S* is a multiple of I: then full RefLoRA can do
  no more than RefLoRA-S) and scale det(S*)^(1/r) (1 = ||A|| and ||B|| balanced) over training, for LoRA's own
  factors (how far from balanced plain LoRA drifts) and for RefLoRA's.

    python benchmarks/reflora_variants.py [--seeds 5] [--iters 300] [--out benchmarks/results]

Writes reflora_variants.json (every curve, final losses, iterations to 1e-3, the traces) and reflora_variants.png.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import common

ROOT = common.REPO

import torch  # noqa: E402

from matrix_factorization import THRESHOLD, median, first_below, run, target  # noqa: E402

VARIANTS = {  # name -> (core method, options)
    "lora": ("lora", {}),
    "reflora (gradient)": ("reflora", {}),
    "reflora (gradient, normalize)": ("reflora", {"normalize": True}),
    "reflora (update)": ("reflora", {"apply_to": "update"}),
    "reflora (update, normalize)": ("reflora", {"apply_to": "update", "normalize": True}),
    "reflora (factors)": ("reflora", {"apply_to": "factors"}),
    "reflora-s": ("reflora-s", {}),
}
LRS = {"gd": [0.01, 0.03], "sgdm": [0.001, 0.003, 0.01], "adam": [0.003, 0.01, 0.03, 0.1]}
TRACED = ("lora", "reflora (gradient)", "reflora (factors)")


def log10(v: float) -> float:
    return math.log10(max(min(v, 1e12), 1e-16)) if math.isfinite(v) else 12.0


def study(seeds: int, iters: int, d: int, rank: int, kappa: float, warmup: int) -> dict:
    cells, traces = {}, {}
    for opt_name, lrs in LRS.items():
        for lr in lrs:
            for name, (method, options) in VARIANTS.items():
                curves, t0 = [], time.time()
                for seed in range(seeds):
                    Y = target(d, rank, seed, 10.0 / kappa, 10.0)
                    trace = [] if name in TRACED and seed == 0 else None
                    curves.append(run(method, lr, Y, rank, iters, seed, optimizer=opt_name, options=options,
                                      warmup=warmup, trace=trace))
                    if trace is not None:
                        traces[f"{opt_name}|lr{lr:g}|{name}"] = trace
                logs = torch.tensor([[log10(v) for v in c] for c in curves])
                hits = [first_below(c) for c in curves]
                cells[f"{opt_name}|lr{lr:g}|{name}"] = {
                    "optimizer": opt_name, "lr": lr, "variant": name,
                    "mean_log10_final": round(float(logs[:, -1].mean()), 3),
                    "std_log10_final": round(float(logs[:, -1].std()), 3) if seeds > 1 else 0.0,
                    "mean_log10_at": {f"{q}%": round(float(logs[:, max(0, iters * q // 100 - 1)].mean()), 3)
                                      for q in (10, 25, 50, 100)},
                    "reached_threshold": sum(h is not None for h in hits),
                    "median_iters_to_threshold": median([h for h in hits if h is not None]),
                    "diverged": sum(not math.isfinite(c[-1]) or c[-1] > 1e6 for c in curves),
                    "mean_log10_curve": [round(float(v), 3) for v in logs.mean(0)],
                    "seconds": round(time.time() - t0, 2),
                }
            print(f"{opt_name:4s} lr={lr:<6g} " + "  ".join(
                f"{n}: {cells[f'{opt_name}|lr{lr:g}|{n}']['mean_log10_final']:6.2f}" for n in VARIANTS), flush=True)
    return {"cells": cells, "traces": traces}


def best_per_optimizer(cells: dict) -> dict:
    """Each variant's best lr per optimizer (lowest mean final log10 loss) and that loss."""
    out: dict = {}
    for c in cells.values():
        cur = out.setdefault(c["optimizer"], {}).get(c["variant"])
        if cur is None or c["mean_log10_final"] < cur["mean_log10_final"]:
            out[c["optimizer"]][c["variant"]] = {"lr": c["lr"], "mean_log10_final": c["mean_log10_final"],
                                                 "reached_threshold": c["reached_threshold"]}
    return out


def plot(results: dict, path: Path) -> None:
    plt = common.pyplot()

    cells, traces = results["cells"], results["traces"]
    cols = max(len(v) for v in LRS.values())
    fig, axes = plt.subplots(len(LRS) + 1, cols, figsize=(4.2 * cols, 3.3 * (len(LRS) + 1)), squeeze=False)
    for i, (opt_name, lrs) in enumerate(LRS.items()):
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(lrs):
                ax.axis("off")
                continue
            for name in VARIANTS:
                c = cells[f"{opt_name}|lr{lrs[j]:g}|{name}"]
                ax.plot(c["mean_log10_curve"], label=name, lw=2.2 if name.startswith("reflora (") else 1.1)
            ax.axhline(math.log10(THRESHOLD), color="grey", ls=":", lw=1)
            ax.set(title=f"{opt_name}, lr {lrs[j]:g}", xlabel="iteration", ylabel="mean log10 loss", ylim=(-16, 6))
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    for j, opt_name in enumerate(LRS):  # S* spread / scale over training at each optimizer's middle lr
        ax = axes[len(LRS)][j]
        lr = LRS[opt_name][len(LRS[opt_name]) // 2]
        for name in TRACED:
            tr = [t for t in traces.get(f"{opt_name}|lr{lr:g}|{name}", []) if "sstar_spread_median" in t]
            if tr:
                ax.plot([t["iter"] for t in tr], [t["sstar_spread_median"] for t in tr], label=f"{name}: spread")
                ax.plot([t["iter"] for t in tr], [t["sstar_scale_median"] for t in tr], ls="--", label=f"{name}: scale")
        ax.set(yscale="log", title=f"S* of the factors, {opt_name} lr {lr:g} (seed 0)", xlabel="iteration")
        ax.legend(fontsize=6)
    for j in range(len(LRS), cols):
        axes[len(LRS)][j].axis("off")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--kappa", type=float, default=10.0, help="condition number of the target")
    ap.add_argument("--warmup", type=int, default=10, help="plain LoRA steps before refactoring (B starts at 0)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    results = study(args.seeds, args.iters, args.d, args.rank, args.kappa, args.warmup)
    results = {"setup": {**vars(args), "threshold": THRESHOLD, "init": "A ~ N(0, 1), B = 0", "lrs": LRS,
                         "variants": {k: {"method": m, **o} for k, (m, o) in VARIANTS.items()},
                         "seconds": round(time.time() - t0, 1)},
               "best": best_per_optimizer(results["cells"]), **results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "reflora_variants.json", results, allow_nan=False)
    plot(results, out / "reflora_variants.png")
    for opt_name, best in results["best"].items():
        print(f"best lr per variant, {opt_name}: " + ", ".join(
            f"{n} {b['mean_log10_final']:.2f} (lr {b['lr']:g})" for n, b in best.items()))
    return results


if __name__ == "__main__":
    main()
