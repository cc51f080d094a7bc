"""Cost of each method's optimizer hook on real layer shapes, as ratios to AdamW and to a training step.

Shapes:
- SD 1.5 UNet (UNet2DConditionModel from the SD 1.5 config, random weights) with LoRA on
  to_q/to_k/to_v/to_out.0 at ranks 4, 16, 64;
- LLaMA-7B-shaped factor pairs (q, k, v, o: 4096x4096; up: 4096->11008; down: 11008->4096; 32 layers)
  at r = 32, factors only (the base layers stay on the meta device).

For every method: time of one AdamW step with the method attached, minus the plain AdamW step, i.e. the
hook's own cost; reported as a ratio to the AdamW step and to one full SD 1.5 UNet LoRA training step
(batch 1, 64x64 latents, forward + backward + step) measured in the same run. Extra persistent memory is
the size of every tensor the Refactorer keeps between steps.

    python benchmarks/overhead.py [--reps 5] [--ranks 4 16 64] [--skip_llama] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from reflora_diffusion.core import Refactorer, find_lora_pairs

METHOD_OPTIONS = {"lora": {}, "reflora": {}, "reflora-s": {}, "lora+": {}, "scaledgd": {}, "preclora": {},
                  "nora+": {}, "rac-lora": {"chain_every": 10**9}, "cola": {"chain_every": 10**9}}

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def persistent_bytes(ref: Refactorer) -> int:
    """Bytes of tensors the Refactorer holds between steps (its own state, not the model's). Its plan and context
    hold references to the model's and the optimizer's tensors only (no copies) and are left out; chain links are
    copies and count."""
    seen, total = set(), 0
    stack = [v for k, v in vars(ref).items() if k not in ("model", "pairs", "_plan", "context", "optimizer", "links")]
    stack += [vars(ref.method), ref.links.links]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor) and id(obj) not in seen:
            seen.add(id(obj))
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack += list(obj)
    return total


def hook_costs(model: nn.Module, reps: int) -> dict:
    """Per method: AdamW step with the method attached vs plain AdamW, on synthetic gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pair in find_lora_pairs(model):  # full-rank factors, as after the warm-up
            pair.B.copy_(torch.randn(pair.B.shape, generator=g) * 0.01)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    snapshot = [p.detach().clone() for p in params]
    out = {}
    for method, opts in METHOD_OPTIONS.items():
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        opt = torch.optim.AdamW(params, lr=1e-6)
        ref = Refactorer(model, method=method, **opts)
        ref.attach(opt)

        def step():
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()

        t = median_time(step, reps, warmup=2)
        grads_clone = median_time(lambda: [gr.clone() for gr in grads], reps)
        out[method] = {"step_s": t - grads_clone, "persistent_bytes": persistent_bytes(ref),
                       "layers": len(ref.pairs), "refactored": ref.stats()["refactored"]}
        ref.detach()
    base = out["lora"]["step_s"]
    for method, row in out.items():
        row["hook_s"] = max(row["step_s"] - base, 0.0)
        row["step_ratio_to_adamw"] = row["step_s"] / base
    return out


def sd15_unet(rank: int):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=ATTN_TARGETS, init_lora_weights="gaussian"))
    return unet


def unet_train_step_time(unet, reps: int) -> float:
    """One LoRA training step of the SD 1.5 UNet: batch 1, 64x64 latents, 77 text tokens."""
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    latents = torch.randn(1, 4, 64, 64)
    text = torch.randn(1, 77, 768)
    t = torch.tensor([500])

    def step():
        loss = unet(latents, t, encoder_hidden_states=text).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    return median_time(step, reps, warmup=1)


class LlamaShaped(nn.Module):
    """32 decoder layers' q, k, v, o, up, down projections on the meta device: only LoRA factors are real."""

    def __init__(self, layers: int = 32, hidden: int = 4096, inter: int = 11008):
        super().__init__()
        with torch.device("meta"):
            self.layers = nn.ModuleList(nn.ModuleDict({
                "q_proj": nn.Linear(hidden, hidden, bias=False), "k_proj": nn.Linear(hidden, hidden, bias=False),
                "v_proj": nn.Linear(hidden, hidden, bias=False), "o_proj": nn.Linear(hidden, hidden, bias=False),
                "up_proj": nn.Linear(hidden, inter, bias=False), "down_proj": nn.Linear(inter, hidden, bias=False),
            }) for _ in range(layers))


def llama_factors(rank: int, layers: int):
    model = get_peft_model(LlamaShaped(layers), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    for pair in find_lora_pairs(model):  # materialise the factors only
        for sub in (pair.module.lora_A[pair.adapter], pair.module.lora_B[pair.adapter]):
            sub.to_empty(device="cpu")
            nn.init.normal_(sub.weight, std=0.02)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train_reps", type=int, default=1)
    ap.add_argument("--train_step_per_rank", action="store_true", help="time the UNet step at every rank")
    ap.add_argument("--llama_layers", type=int, default=32)
    ap.add_argument("--skip_llama", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
               "setup": vars(args), "sd15": {}, "llama7b": None}

    train_s = None
    for rank in args.ranks:
        unet = sd15_unet(rank)
        if train_s is None or args.train_step_per_rank:  # the LoRA rank barely changes a UNet step
            train_s = unet_train_step_time(unet, args.train_reps)
        costs = hook_costs(unet, args.reps)
        for row in costs.values():
            row["ratio_to_train_step"] = row["hook_s"] / train_s
        results["sd15"][rank] = {"train_step_s": train_s, "methods": costs}
        print(f"SD1.5 UNet r={rank}: train step {train_s:.2f}s, AdamW step {costs['lora']['step_s'] * 1e3:.1f} ms")
        for m, row in costs.items():
            print(f"  {m:<10} hook {row['hook_s'] * 1e3:7.2f} ms  x{row['step_ratio_to_adamw']:.2f} AdamW  "
                  f"{100 * row['ratio_to_train_step']:.3f}% of a train step  +{row['persistent_bytes']} B kept")
        del unet

    if not args.skip_llama:
        model = llama_factors(32, args.llama_layers)
        costs = hook_costs(model, args.reps)
        results["llama7b"] = {"rank": 32, "layers": args.llama_layers, "methods": costs}
        print(f"LLaMA-7B-shaped factors r=32: AdamW step {costs['lora']['step_s'] * 1e3:.1f} ms")
        for m, row in costs.items():
            print(f"  {m:<10} hook {row['hook_s'] * 1e3:7.2f} ms  x{row['step_ratio_to_adamw']:.2f} AdamW  "
                  f"+{row['persistent_bytes']} B kept")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "overhead.json", results)
    plot(results, out / "overhead.png")
    print(f"wrote {out / 'overhead.json'} and .png")


def plot(results: dict, path: Path) -> None:
    plt = common.pyplot()

    methods = [m for m in METHOD_OPTIONS if m != "lora"]
    panels = [(f"SD1.5 UNet r={r}", v["methods"], v["train_step_s"]) for r, v in results["sd15"].items()]
    if results["llama7b"]:
        panels.append(("LLaMA-7B factors r=32", results["llama7b"]["methods"], None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, costs, train_s) in zip(axes[0], panels):
        if train_s:
            vals = [100 * costs[m]["ratio_to_train_step"] for m in methods]
            ax.set_ylabel("hook time, % of one UNet training step")
        else:
            vals = [100 * (costs[m]["step_ratio_to_adamw"] - 1) for m in methods]
            ax.set_ylabel("hook time, % of the AdamW step")
        ax.bar(methods, vals, color=["C3" if m.startswith("reflora") else "C0" for m in methods])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
