"""The paper's Figure 2: low-rank matrix factorization with plain gradient descent.

Fit s * B @ A (peft LoRA on a zero linear layer; init A ~ N(0, 1), B = 0) to a rank-r target Y
by full-batch gradient descent, through the real core (Refactorer attached to torch.optim.SGD), for
every method at learning rates 0.01 and 0.03.

    python benchmarks/matrix_factorization.py [--iters 100] [--out benchmarks/results]

Writes matrix_factorization.json (loss curves, iterations to loss < 1e-3) and .png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

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


def run(method: str, lr: float, Y: torch.Tensor, rank: int, iters: int, seed: int, init_std: float = 1.0) -> list[float]:
    d = Y.shape[0]
    torch.manual_seed(seed)
    layer = nn.Linear(d, d, bias=False, dtype=torch.float64)
    nn.init.zeros_(layer.weight)
    model = get_peft_model(nn.Sequential(layer), LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    (pair,) = find_lora_pairs(model)
    with torch.no_grad():  # the usual matrix-factorization init: Gaussian A, zero B (LoRA's B = 0)
        pair.A.normal_(0.0, init_std)
    ref = Refactorer(model, method=method, **METHODS[method])
    opt = ref.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr))
    eye = torch.eye(d, dtype=torch.float64)
    losses = []
    for _ in range(iters):
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    (out / "matrix_factorization.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    plot(results, args.lrs, out / "matrix_factorization.png")
    print(f"wrote {out / 'matrix_factorization.json'} and .png")
    return results


def plot(results: dict, lrs: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
