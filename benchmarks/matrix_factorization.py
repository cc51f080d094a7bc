"""The paper's Figure 2: low-rank matrix factorization with plain gradient descent.

Fit s * B @ A (peft LoRA on a zero linear layer; init A ~ N(0, 1), B = 0) to a rank-r target Y
by full-batch gradient descent, through the real core (Refactorer attached to torch.optim.SGD), for
every method at learning rates 0.01 and 0.03.

    python benchmarks/matrix_factorization.py [--iters 100] [--out benchmarks/results]
    python benchmarks/matrix_factorization.py --grid [--seeds 5] [--iters 300]

Writes matrix_factorization.json (loss curves, iterations to loss < 1e-3) and .png. `--grid` runs the
study around Figure 2 (issue 9): GD and Adam, several learning rates, ranks and condition numbers of the
target, each a mean over seeds (target and init drawn per seed), for lora / reflora / reflora-s / scaledgd,
and writes matrix_factorization_grid.json and .png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import common
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from reflora_diffusion.core import Refactorer, find_lora_pairs

METHODS = {  # method -> options; chains restart every 25 iterations
    "lora": {}, "lora+": {"ratio": 4.0}, "scaledgd": {}, "preclora": {"delta": 1e-2}, "nora+": {},
    "reflora": {}, "reflora-s": {}, "cola": {"chain_every": 25}, "rac-lora": {"chain_every": 25, "p": 0.5},
}
THRESHOLD = 1e-3


def target(d: int, rank: int, seed: int, sigma_min: float = 8.0, sigma_max: float = 12.0) -> torch.Tensor:
    """Y = U diag(sigma) V^T with singular values spread over [sigma_min, sigma_max]."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    sigma = torch.linspace(sigma_max, sigma_min, rank, dtype=torch.float64)
    return U @ torch.diag(sigma) @ V.T


OPTIMIZERS = {"gd": lambda params, lr: torch.optim.SGD(params, lr=lr),
              "sgdm": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
              "adam": lambda params, lr: torch.optim.Adam(params, lr=lr)}


def run(method: str, lr: float, Y: torch.Tensor, rank: int, iters: int, seed: int, init_std: float = 1.0,
        optimizer: str = "gd", options: dict | None = None, warmup: int = 0, trace: list | None = None,
        trace_every: int = 5) -> list[float]:
    """Loss per iteration; ``options`` replace the method's defaults; ``trace`` collects the core's stats
    (S* spread and scale, ||B|| / ||A||) every ``trace_every`` iterations."""
    d = Y.shape[0]
    torch.manual_seed(seed)
    layer = nn.Linear(d, d, bias=False, dtype=torch.float64)
    nn.init.zeros_(layer.weight)
    model = get_peft_model(nn.Sequential(layer), LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    (pair,) = find_lora_pairs(model)
    with torch.no_grad():  # the usual matrix-factorization init: Gaussian A, zero B (LoRA's B = 0)
        pair.A.normal_(0.0, init_std)
    ref = Refactorer(model, method=method, warmup_steps=warmup, **(METHODS[method] if options is None else options))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ref.attach(OPTIMIZERS[optimizer](params, lr))
    eye = torch.eye(d, dtype=torch.float64)
    losses = []
    for it in range(iters):
        if trace is not None and it % trace_every == 0:
            trace.append({"iter": it, **{k: v for k, v in ref.stats().items() if k.startswith(("sstar", "balance"))}})
        W = model(eye).T  # the adapted weight s * B @ A (base is zero)
        loss = 0.5 * (W - Y).pow(2).sum()
        value = loss.item()
        losses.append(value if math.isfinite(value) else float("inf"))
        if not math.isfinite(value) or value > 1e12:
            losses += [float("inf")] * (iters - len(losses))  # diverged
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def first_below(losses: list[float], threshold: float = THRESHOLD) -> int | None:
    return next((i for i, v in enumerate(losses) if v < threshold), None)


GRID = {"optimizers": {"gd": [0.003, 0.01, 0.03, 0.1], "adam": [0.001, 0.003, 0.01, 0.03, 0.1]},
        "ranks": [2, 4, 8], "kappas": [1.5, 10.0, 100.0], "methods": ["lora", "reflora", "reflora-s", "scaledgd"]}


def grid(seeds: int, iters: int, d: int, out: Path) -> dict:
    """Every (optimizer, lr, rank, condition number, method) over `seeds` seeds; sigma_max = 10."""
    cells = {}
    for opt_name, lrs in GRID["optimizers"].items():
        for rank in GRID["ranks"]:
            for kappa in GRID["kappas"]:
                for lr in lrs:
                    curves = {m: [] for m in GRID["methods"]}
                    for seed in range(seeds):
                        Y = target(d, rank, seed, 10.0 / kappa, 10.0)
                        for method in GRID["methods"]:
                            curves[method].append(run(method, lr, Y, rank, iters, seed, optimizer=opt_name))
                    for method, cs in curves.items():
                        finals = [c[-1] for c in cs]
                        hits = [first_below(c) for c in cs]
                        log_curves = torch.tensor([[math.log10(max(min(v, 1e12), 1e-16)) for v in c] for c in cs])
                        cells[f"{opt_name}|lr{lr:g}|r{rank}|k{kappa:g}|{method}"] = {
                            "optimizer": opt_name, "lr": lr, "rank": rank, "kappa": kappa, "method": method,
                            "diverged": sum(not math.isfinite(v) or v > 1e6 for v in finals),
                            "median_iters_to_threshold": median([h for h in hits if h is not None]),
                            "reached_threshold": sum(h is not None for h in hits),
                            "mean_log10_final": float(log_curves[:, -1].mean()),
                            "mean_log10_curve": [round(float(v), 3) for v in log_curves.mean(0)[::max(1, iters // 60)]],
                        }
                    row = {m: cells[f"{opt_name}|lr{lr:g}|r{rank}|k{kappa:g}|{m}"] for m in GRID["methods"]}
                    print(f"{opt_name:4s} lr={lr:<6g} r={rank} kappa={kappa:<5g} " + "  ".join(
                        f"{m}: {c['mean_log10_final']:6.2f} ({c['reached_threshold']}/{seeds})" for m, c in row.items()),
                        flush=True)
    results = {"setup": {"d": d, "iters": iters, "seeds": seeds, "threshold": THRESHOLD, "sigma_max": 10.0,
                         "init": "A ~ N(0, 1), B = 0", **GRID}, "cells": cells}
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "matrix_factorization_grid.json", results, allow_nan=False)
    plot_grid(results, out / "matrix_factorization_grid.png")
    return results


def median(xs):
    xs = sorted(xs)
    return None if not xs else xs[len(xs) // 2]


def plot_grid(results: dict, path: Path) -> None:
    """Final mean log10 loss vs lr, one panel per (optimizer, condition number), rank 4."""
    plt = common.pyplot()

    opts, kappas = list(GRID["optimizers"]), GRID["kappas"]
    fig, axes = plt.subplots(len(opts), len(kappas), figsize=(4.5 * len(kappas), 3.6 * len(opts)), squeeze=False)
    for i, o in enumerate(opts):
        for j, k in enumerate(kappas):
            ax = axes[i][j]
            for m in GRID["methods"]:
                cs = [c for c in results["cells"].values() if c["optimizer"] == o and c["kappa"] == k
                      and c["rank"] == 4 and c["method"] == m]
                cs.sort(key=lambda c: c["lr"])
                ax.plot([c["lr"] for c in cs], [min(c["mean_log10_final"], 6) for c in cs], "o-", label=m,
                        lw=2.5 if m.startswith("reflora") else 1.2)
            ax.set(xscale="log", title=f"{o}, rank 4, condition number {k:g}", xlabel="lr",
                   ylabel=f"mean log10 loss after {results['setup']['iters']} it")
            ax.axhline(math.log10(THRESHOLD), color="grey", ls=":", lw=1)
            ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", action="store_true", help="the full study (see the module doc)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per grid cell")
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--init_std", type=float, default=1.0, help="std of the Gaussian init of A")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03])
    ap.add_argument("--sigma", type=float, nargs=2, default=[8.0, 12.0], metavar=("MIN", "MAX"),
                    help="range of the target's singular values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.grid:
        return grid(args.seeds, args.iters, args.d, Path(args.out))

    Y = target(args.d, args.rank, args.seed, *args.sigma)
    results = {"setup": vars(args) | {"threshold": THRESHOLD}, "runs": {}}
    for lr in args.lrs:
        for method in METHODS:
            losses = run(method, lr, Y, args.rank, args.iters, args.seed, args.init_std)
            hit = first_below(losses)
            finite = [v if math.isfinite(v) else None for v in losses]  # None = diverged (strict JSON)
            results["runs"][f"{method}@{lr}"] = {"method": method, "lr": lr, "losses": finite,
                                                 "final_loss": finite[-1], "iters_to_threshold": hit}
            print(f"lr={lr:<5} {method:<10} final loss {losses[-1]:<12.4g} iterations to < {THRESHOLD:g}: {hit}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "matrix_factorization.json", results, allow_nan=False)
    plot(results, args.lrs, out / "matrix_factorization.png")
    print(f"wrote {out / 'matrix_factorization.json'} and .png")
    return results


def plot(results: dict, lrs: list[float], path: Path) -> None:
    plt = common.pyplot()

    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.5), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for run_ in results["runs"].values():
            if run_["lr"] == lr:
                ys = [1e6 if v is None else min(v, 1e6) for v in run_["losses"]]
                ax.semilogy(ys, label=run_["method"], lw=2.5 if run_["method"].startswith("reflora") else 1.2)
        ax.axhline(THRESHOLD, color="grey", ls=":", lw=1)
        ax.set(title=f"matrix factorization, GD lr={lr}", xlabel="iteration", ylabel="loss", ylim=(1e-8, 1e6))
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
