"""CPU threads under contention: s/step of a tiny SD LoRA run with the machine idle and with one other busy
process: torch's default threads, OMP_NUM_THREADS=1 and OMP_WAIT_POLICY=PASSIVE (see reflora_diffusion/cpu.py).
Measured side by side in one run.

    python benchmarks/cpu_threads.py [--steps 20] [--out benchmarks/results]

Each setting is a real `python train/sd.py` process (20 steps of the `tiny` preset at its native 64 px on
the DreamBooth dog photos); s/step is the median of the events.jsonl timings after two warm-up steps. The
busy neighbour is another process doing single-thread float32 matmuls (as a second training job would).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = common.REPO
DOG = common.DREAMBOOTH / "dog"
SETTINGS = {  # name -> environment
    "torch default": {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}
NEIGHBOUR = ("import torch\ntorch.set_num_threads(1)\nx = torch.randn(512, 512)\n"
             "while True:\n    x = torch.tanh(x @ x / 512)\n")


def seconds_per_step(env: dict, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        subprocess.run([sys.executable, "train/sd.py", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir",
                        str(DOG), "--instance_prompt", "a photo of sks dog", "--max_train_steps", str(steps),
                        "--seed", "0", "--output_dir", str(out)],
                       cwd=ROOT, env={**clean, "HF_HUB_OFFLINE": "1", **env}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        return statistics.median(e["sec_per_step"] for e in events if "loss" in e and e["step"] > 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    results = {"cores": os.cpu_count(), "steps": args.steps, "s_per_step": {}}
    for load in ("idle", "one busy neighbour"):
        neighbour = None
        if load != "idle":
            neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={**os.environ, "OMP_NUM_THREADS": "1"})
            time.sleep(2)
        try:
            for name, env in SETTINGS.items():
                s = seconds_per_step(env, args.steps)
                results["s_per_step"].setdefault(load, {})[name] = s
                print(f"{load:20s} {name:28s} {s:.3f} s/step", flush=True)
        finally:
            if neighbour is not None:
                neighbour.kill()
    base = results["s_per_step"]
    results["slowdown_vs_idle_default"] = {load: {n: v / base["idle"]["torch default"] for n, v in row.items()}
                                           for load, row in base.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "cpu_threads.json", results, indent=2)
    plt = common.pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(SETTINGS)
    for i, load in enumerate(base):
        ax.bar([j + 0.4 * i for j in range(len(names))], [base[load][n] for n in names], width=0.4, label=load)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel("s / step (median)")
    ax.set_yscale("log")
    ax.set_title(f"tiny SD LoRA step on {results['cores']} cores")
    ax.legend()
    fig.tight_layout()
    common.save_figure(fig, out / "cpu_threads.png", dpi=120)
    return results


if __name__ == "__main__":
    main()
