"""Does the README's quick start teach the base something you can see? Runs its command as written.

1. The `accelerate launch train/sd.py ...` command of the README's quick start is read from README.md and
   run unchanged except for --output_dir (a scratch folder); its wall time and training time are measured.
2. The base (`tiny-emoji`) and the base with the adapter draw the instance prompt for >= 6 seeds (the
   pipeline's defaults: DPM-Solver++ 25 steps, guidance 7.5, as the README's loading snippet); each image's
   distance to the nearest training photo is the RMS pixel difference (0..255) at 32x32 (centre-cropped
   photos). Target: the adapter's mean distance <= 0.6 of the base's.
3. A before/after grid: the training photos, the base's images, the adapter's images (same seeds).
The app's default job is this same job (tests/test_app_views.py keeps its form equal to the README command), so
the figures hold for it too.

    python benchmarks/quickstart.py                 # ~2-3 min on this 2-core CPU
    python benchmarks/quickstart.py --seeds 12      # more seeds

Writes benchmarks/results/quickstart.json, quickstart.png (distance per seed, base vs adapter) and
quickstart_grid.png (the picture the README and docs/sd.md show).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import common

REPO = common.REPO

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from reflora_diffusion.sd.sample import nearest_distance  # noqa: E402

RESULTS = common.RESULTS


def readme_command(readme: Path = REPO / "README.md") -> list[str]:
    """The quick start's `accelerate launch train/sd.py ...` command, as the README gives it."""
    line = next(x for x in readme.read_text().splitlines() if "accelerate launch train/sd.py" in x
                and "--instance_data_dir" in x)
    return shlex.split(line[line.index("accelerate launch"):])


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def draw(base: str, prompt: str, seeds: list[int], adapter: Path | None = None) -> list[Image.Image]:
    from diffusers import StableDiffusionPipeline

    from reflora_diffusion.presets import resolve_pretrained

    pipe = StableDiffusionPipeline.from_pretrained(resolve_pretrained(base), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    return [pipe(prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(s)).images[0] for s in seeds]


def grid(rows: list[list[Image.Image]], scale: int = 2) -> Image.Image:
    w = max(len(r) for r in rows)
    out = Image.new("RGB", (64 * w * scale, 64 * len(rows) * scale), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            im = im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC) if im.size != (64, 64) else im
            out.paste(im.resize((64 * scale, 64 * scale), Image.Resampling.NEAREST), (64 * x * scale, 64 * y * scale))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--work", default=str(REPO / "runs" / "bench-quickstart"), help="scratch run folder")
    p.add_argument("--out", default=str(RESULTS / "quickstart"))
    args = p.parse_args(argv)

    cmd = readme_command()
    work = Path(args.work)
    cmd[cmd.index("--output_dir") + 1] = str(work)
    cmd += ["--overwrite_output_dir"]  # the scratch folder of the last benchmark run
    data = (REPO / option(cmd, "--instance_data_dir")).resolve()  # relative to the repository, as in the README
    prompt, base = option(cmd, "--instance_prompt"), option(cmd, "--pretrained_model_name_or_path")
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    events = [json.loads(x) for x in (work / "events.jsonl").read_text().splitlines() if '"loss"' in x]
    steps = [0] + [e["step"] for e in events]
    train_s = sum(e["sec_per_step"] * (b - a) for e, a, b in zip(events, steps, steps[1:]))

    photos = sorted(q for q in data.iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    train = [Image.open(q) for q in photos]
    seeds = list(range(args.seeds))
    before = draw(base, prompt, seeds)
    after = draw(base, prompt, seeds, adapter=work)
    d_before = [nearest_distance(im, train) for im in before]
    d_after = [nearest_distance(im, train) for im in after]
    ratio = float(np.mean(d_after) / np.mean(d_before))
    report = {
        "command": shlex.join(readme_command()), "prompt": prompt, "seeds": seeds,
        "distance_metric": "RMS pixel difference (0..255) at 32x32 to the nearest training photo",
        "base_distance": d_before, "adapter_distance": d_after,
        "base_mean": float(np.mean(d_before)), "adapter_mean": float(np.mean(d_after)),
        "ratio_adapter_to_base": ratio, "target_ratio": 0.6, "met": ratio <= 0.6,
        "command_wall_s": round(wall, 1), "training_s": round(train_s, 1),
        "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "final_loss": events[-1]["loss"] if events else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(out.with_suffix(".json"), report)
    grid([[Image.open(q) for q in photos], before, after]).save(out.with_name(out.name + "_grid.png"))
    plt = common.pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(seeds))
    ax.bar(x - 0.2, d_before, 0.4, label=f"base (mean {np.mean(d_before):.1f})", color="#999999")
    ax.bar(x + 0.2, d_after, 0.4, label=f"with the adapter (mean {np.mean(d_after):.1f})", color="#1f77b4")
    ax.set_xticks(x, [str(s) for s in seeds])
    ax.set_xlabel("seed")
    ax.set_ylabel("RMS to nearest training photo (32x32)")
    ax.set_title(f"quick start: adapter / base = {ratio:.2f} (target <= 0.6)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=1))


if __name__ == "__main__":
    main()
