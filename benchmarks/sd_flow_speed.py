"""Speed and memory of LoRA / RefLoRA / RefLoRA-S on the SD3 and FLUX presets (tiny-sd3, tiny-flux).

Every (preset, method) gets a trainer set up in the same process; then the trainer's own step (flow-matching
loss, backward, optimizer step with the core's hooks) is timed round-robin over all of them, so load drift on
a shared machine hits every configuration alike. it/s is the median over rounds; peak memory is the median
per-step peak above the memory held before the step: CUDA's max_memory_allocated on a GPU, the process RSS
(sampled every millisecond, after glibc's malloc_trim so freed pages do not hide the step's use) on a CPU.
Ratios are to LoRA on the same preset.

    python benchmarks/sd_flow_speed.py                      # CPU, tiny presets, ~1 min
    python benchmarks/sd_flow_speed.py --rounds 10 --steps 5 --resolution 128

Writes benchmarks/results/sd_flow_speed.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import common

import torch  # noqa: E402

from reflora_diffusion.sd.train import SDTrainer  # noqa: E402

PRESETS = ["tiny-sd3", "tiny-flux"]
METHODS = ["lora", "reflora", "reflora-s"]
DATA = common.DREAMBOOTH


def make_trainer(out: Path, preset: str, method: str, args) -> SDTrainer:
    return common.sd_trainer(
        method, out, pretrained_model_name_or_path=preset, instance_data_dir=str((DATA / "dog").resolve()),
        instance_prompt="a photo of sks dog", resolution=args.resolution, rank=args.rank,
        refactor_warmup_steps=1, max_train_steps=1000, train_batch_size=args.batch_size, cache_latents=True,
        max_sequence_length=args.max_sequence_length, seed=0, checkpointing_steps=10**9,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        gradient_checkpointing=args.gradient_checkpointing)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator on a GPU, process RSS (polled) on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if not self.cuda:
            import psutil

            self.process = psutil.Process()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:  # hand freed heap pages back first, or a step re-using them shows no growth at all
            _malloc_trim()
            self.start = self.peak = self.process.memory_info().rss
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.delta = torch.cuda.max_memory_allocated() - self.start
        else:
            self.done.set()
            self.thread.join()
            self.delta = max(self.peak, self.process.memory_info().rss) - self.start
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS deltas are then a lower bound
        pass


def step(trainer: SDTrainer, batch) -> None:
    trainer.step(batch)  # the trainer's own step: loss, backward, clipping, the optimizer (the method's hooks), scheduler


def measure(trainers: dict, rounds: int, steps: int) -> dict:
    batches = {}
    for key, t in trainers.items():
        t.dataloader.set_epoch(0)
        batches[key] = next(iter(t.dataloader))
        for _ in range(2):  # past the 1-step warm-up: the timed steps refactor
            step(t, batches[key])
    its = {k: [] for k in trainers}
    mem = {k: [] for k in trainers}
    for _ in range(rounds):
        for key, t in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(t, batches[key])
            its[key].append(steps / (time.perf_counter() - start))
            with PeakMemory(t.accelerator.device) as peak:  # one more step, probed (not timed)
                step(t, batches[key])
            mem[key].append(peak.delta)
    return {k: {"it_per_s": statistics.median(its[k]), "peak_mib": statistics.median(mem[k]) / 2**20}
            for k in trainers}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_sequence_length", type=int, default=32)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--out", default=str(common.RESULTS / "sd_flow_speed"))
    args = p.parse_args(argv)
    if "lora" not in args.methods:
        args.methods = ["lora", *args.methods]
    torch.set_num_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {f"{pr}/{m}": make_trainer(Path(tmp) / pr / m, pr, m, args)
                    for pr in args.presets for m in args.methods}
        device = str(next(iter(trainers.values())).accelerator.device)
        measured = measure(trainers, args.rounds, args.steps)
    results = {}
    for pr in args.presets:
        base = measured[f"{pr}/lora"]
        results[pr] = {m: {**measured[f"{pr}/{m}"],
                           "it_per_s_ratio_vs_lora": measured[f"{pr}/{m}"]["it_per_s"] / base["it_per_s"],
                           "peak_ratio_vs_lora": (measured[f"{pr}/{m}"]["peak_mib"] / base["peak_mib"]
                                                  if base["peak_mib"] > 0 else None)}
                       for m in args.methods}
    report = {"setup": {**vars(args), "device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda")
                        else None, "memory": "cuda max_memory_allocated" if device.startswith("cuda") else "RSS delta",
                        "threads": torch.get_num_threads(), "wall_seconds": round(time.time() - started, 1)},
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = out.with_suffix(".json.tmp")
    common.write_json(tmp_json, report)
    os.replace(tmp_json, out.with_suffix(".json"))
    plot(results, report["setup"], out.with_suffix(".png"))
    print(f"{'preset':10s} {'method':10s} {'it/s':>7s} {'ratio':>6s} {'peak MiB':>9s} {'ratio':>6s}")
    for pr, rows in results.items():
        for m, r in rows.items():
            ratio = "-" if r["peak_ratio_vs_lora"] is None else f"{r['peak_ratio_vs_lora']:.2f}"
            print(f"{pr:10s} {m:10s} {r['it_per_s']:7.2f} {r['it_per_s_ratio_vs_lora']:6.3f} {r['peak_mib']:9.1f} "
                  f"{ratio:>6s}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return report


def plot(results: dict, setup: dict, path: Path) -> None:
    plt = common.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    presets = list(results)
    methods = list(next(iter(results.values())))
    width = 0.8 / len(methods)
    for ax, key, label in [(axes[0], "it_per_s", "it/s"), (axes[1], "peak_mib", f"peak MiB ({setup['memory']})")]:
        for i, m in enumerate(methods):
            xs = [j + i * width for j in range(len(presets))]
            ax.bar(xs, [results[pr][m][key] for pr in presets], width, label=m)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(presets))], presets)
        ax.set(ylabel=label, title=f"{label}, median of {setup['rounds']} rounds")
        ax.legend(fontsize=8)
    fig.suptitle(f"SD3 / FLUX presets on {setup['device']}, r={setup['rank']}, {setup['resolution']} px, "
                 f"batch {setup['batch_size']}")
    fig.tight_layout()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
