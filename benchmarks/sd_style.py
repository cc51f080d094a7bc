"""Style learning on `tiny-emoji`: LoRA vs RefLoRA vs RefLoRA-S, judged on emoji the adapter never saw.

The `tiny-emoji` base draws Noto (Google) emoji. The adapter learns the Twemoji (Twitter) style from a seeded
subset of Twemoji captioned "<name> in sks style"; a validation split picks each method's learning rate and
a held-out test split (never trained on, never used to pick anything) measures generalisation:

- distance: pixel L2 at 32x32 (2x2 average pooled, [0, 1] RGB, as benchmarks/emoji_base_quality.py) between
  the image generated for "<name> in sks style" and the true Twemoji image of that emoji (lower = learned
  the style and still draws the right emoji), and to the Noto image (distance from the base style);
- the base model without LoRA, with the same prompts and seeds, is the reference.

Every method gets the same lr grid, seeds, data, steps, batch and sampling seeds (DPM-Solver++, guidance 5
as the quality benchmark). Runs are cached per (method, lr, seed) under $REFLORA_CACHE/bench/sd_style, so
an interrupted benchmark resumes where it stopped.

    python benchmarks/sd_style.py --steps 150 --methods lora reflora reflora-s lora+ reflora@factors \
        --seeds 0 1 2 --threads 2                           # the committed run (45 runs, ~21 min on 2 cores)
    python benchmarks/sd_style.py --steps 150 --methods lora reflora reflora-s reflora@factors --lrs 3e-3 \
        --seeds 0 1 2 --threads 2 --eval_every 30 --out benchmarks/results/sd_style_curve
                                                            # held-out distance vs step, at the best lr
    python benchmarks/sd_style.py --methods lora reflora --lrs 1e-3 --seeds 0 --steps 60   # quick look

Writes benchmarks/results/sd_style.json, sd_style.md (the docs' table), sd_style.png (loss curves, held-out
distance per method/lr and, with --eval_every, held-out distance vs step) and sd_style_grid.png (held-out
emoji: Twemoji target, Noto, base, then each method at its best lr, seed 0).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import common
import numpy as np  # noqa: E402
import torch  # noqa: E402

from reflora_diffusion.rundir import read_events  # noqa: E402
from reflora_diffusion.emoji import data as emoji_data  # noqa: E402

from emoji_base_quality import save_grid, to32  # noqa: E402  (the same 32x32 pixel space as the base quality figures)

RESULTS = common.RESULTS
LABELS = {"lora": "LoRA", "reflora": "RefLoRA", "reflora-s": "RefLoRA-S", "lora+": "LoRA+",
          "reflora@factors": "RefLoRA (factors)", "reflora@update": "RefLoRA (update)",
          "reflora@normalize": "RefLoRA (normalize)"}


def l2(gen: np.ndarray, ref: np.ndarray) -> list[float]:
    return np.linalg.norm(to32(gen) - to32(ref), axis=1).tolist()


def splits(args) -> dict:
    """Captions present in both styles, shuffled with a fixed seed: train / val / test, disjoint."""
    tw_caps, tw_px = emoji_data.load("twitter")
    go_caps, go_px = emoji_data.load("google")
    go_index = {c: i for i, c in enumerate(go_caps)}
    common = [c for c in tw_caps if c in go_index]
    rng = random.Random(args.split_seed)
    rng.shuffle(common)
    n1, n2 = args.n_train, args.n_train + args.n_val
    tw_index = {c: i for i, c in enumerate(tw_caps)}
    out = {"train": common[:n1], "val": common[n1:n2], "test": common[n2:n2 + args.n_test]}
    out["twitter"] = {k: tw_px[[tw_index[c] for c in out[k]]] for k in ("train", "val", "test")}
    out["google"] = {k: go_px[[go_index[c] for c in out[k]]] for k in ("val", "test")}
    out["folder"] = emoji_data.prepare("twitter")
    out["tw_rows"] = {k: [tw_index[c] for c in out[k]] for k in ("train", "val", "test")}
    return out


def make_train_folder(data: dict, root: Path, token: str, split: str = "train", name: str = "data") -> Path:
    """<root>/<name>: the Twemoji of ``split`` with metadata.jsonl captions '<name> in <token> style'."""
    folder = root / name
    rows = [json.loads(x) for x in (data["folder"] / "metadata.jsonl").read_text().splitlines() if x]
    lines = []
    for i in data["tw_rows"][split]:
        lines.append(json.dumps({"file_name": Path(rows[i]["file_name"]).name,
                                 "text": f"{rows[i]['text']} in {token} style"}))
    text = "\n".join(lines) + "\n"
    if (folder / "metadata.jsonl").is_file() and (folder / "metadata.jsonl").read_text() == text:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in data["tw_rows"][split]:  # flat: the trainer looks for images in the folder itself
        shutil.copy(data["folder"] / rows[i]["file_name"], folder / Path(rows[i]["file_name"]).name)
    (folder / "metadata.jsonl").write_text(text)
    return folder


def sample(pipe, prompts: list[str], args, batch: int = 20) -> np.ndarray:
    """One image per prompt; prompt i always uses seed 1000 + i (the same noise for every model)."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(1000 + j) for j in range(i, min(i + batch, len(prompts)))]
        with torch.no_grad():
            out.append(pipe(prompts[i:i + batch], num_inference_steps=args.sample_steps, guidance_scale=args.guidance,
                            generator=gens, height=64, width=64, output_type="np").images)
    return np.concatenate(out)


def with_dpm(pipe):
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def evaluate(pipe, data, args, splits_=("val", "test")) -> tuple[dict, dict]:
    metrics, images = {}, {}
    for s in splits_:
        prompts = [f"{c} in {args.token} style" for c in data[s]]
        imgs = sample(pipe, prompts, args)
        images[s] = imgs
        d_tw, d_go = l2(imgs, data["twitter"][s]), l2(imgs, data["google"][s])
        metrics[s] = {"to_twemoji": statistics.fmean(d_tw), "to_noto": statistics.fmean(d_go),
                      "to_twemoji_per_emoji": d_tw}
    return metrics, images


def run_one(method: str, lr: float, seed: int, train_dir: Path, data: dict, args, root: Path) -> dict:
    """Train one adapter (in process) and evaluate it every `eval_every` steps (test split) and at the end (both)."""
    from reflora_diffusion.sd.sample import build_pipeline

    run_dir = root / "runs" / f"{method}_lr{lr:g}_s{seed}"
    trainer = common.sd_trainer(  # method e.g. reflora@factors
        method, run_dir, pretrained_model_name_or_path="tiny-emoji", train_data_dir=str(train_dir), resolution=64,
        rank=args.rank, lora_alpha=args.rank, learning_rate=lr,
        refactor_warmup_steps=max(1, round(args.warmup_frac * args.steps)), max_train_steps=args.steps,
        train_batch_size=args.batch_size, cache_latents=True, seed=seed, checkpointing_steps=10**9,
        validation_prompt=["(evaluation hook)"], validation_steps=args.eval_every or 10**9,
        overwrite_output_dir=True)
    evals, timing = {}, {"eval_s": 0.0}
    keep_images = {}

    def hook():  # replaces the trainer's validation sampling: called every `eval_every` steps and at the end
        t0 = time.time()
        acc = trainer.accelerator
        unet = acc.unwrap_model(trainer.components.denoiser)
        models = {k: acc.unwrap_model(m) for k, m in trainer.components.models.items()}
        unet.eval()
        with torch.random.fork_rng(devices=[]):
            pipe = with_dpm(build_pipeline(trainer.components.path, trainer.components.family, {**models, "vae": trainer.components.vae}))
            final = trainer.global_step >= trainer.max_steps
            m, imgs = evaluate(pipe, data, args, ("val", "test") if final else ("test",))
        unet.train()
        evals[str(trainer.global_step)] = m
        if final:
            keep_images.update(imgs)
        timing["eval_s"] += time.time() - t0

    trainer.validate = hook
    t0 = time.time()
    trainer.train()
    total = time.time() - t0
    events = read_events(trainer.run_dir)
    losses = [e["loss"] for e in events if "loss" in e]
    sec = [e["sec_per_step"] for e in events if "sec_per_step" in e]
    final = evals[str(args.steps)]
    result = {"method": method, "lr": lr, "seed": seed, "losses": losses,
              "train_s": round(total - timing["eval_s"], 1), "eval_s": round(timing["eval_s"], 1),
              "median_sec_per_step": statistics.median(sec),
              "val_to_twemoji": final["val"]["to_twemoji"], "val_to_noto": final["val"]["to_noto"],
              "test_to_twemoji": final["test"]["to_twemoji"], "test_to_noto": final["test"]["to_noto"],
              "test_to_twemoji_per_emoji": final["test"]["to_twemoji_per_emoji"]}
    if args.eval_every:  # held-out distance vs step (the final step included)
        steps = sorted(evals, key=int)
        result["test_curve"] = {step: evals[step]["test"]["to_twemoji"] for step in steps}
    np.savez_compressed(root / "runs" / f"{method}_lr{lr:g}_s{seed}.npz",
                        test=(keep_images["test"] * 255).round().astype(np.uint8))
    shutil.rmtree(run_dir, ignore_errors=True)  # the adapter is not needed again: keep the cache small
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["lora", "reflora", "reflora-s"])
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup_frac", type=float, default=0.1, help="refactor warm-up, fraction of the steps")
    p.add_argument("--n_train", type=int, default=120)
    p.add_argument("--n_val", type=int, default=20)
    p.add_argument("--n_test", type=int, default=40)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--token", default="sks")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eval_every", type=int, default=0,
                   help="also measure the held-out distance every N steps (0: only at the end)")
    p.add_argument("--grid_emoji", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: 1 (2 threads ran sampling 10x slower on 2 shared cores)")
    p.add_argument("--fresh", action="store_true", help="ignore cached runs")
    p.add_argument("--out", default=str(RESULTS / "sd_style"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    data = splits(args)
    setting = {k: v for k, v in vars(args).items() if k not in ("fresh", "out")}
    import hashlib

    from reflora_diffusion.presets import resolve_pretrained

    # the base's weights are part of the key: a retrained tiny-emoji must not reuse runs made on the old one
    weights = hashlib.sha1()
    for f in sorted(Path(resolve_pretrained("tiny-emoji")).rglob("*.safetensors")):
        weights.update(f.read_bytes())
    key = json.dumps({**{k: setting[k] for k in ("steps", "batch_size", "rank", "warmup_frac", "n_train", "n_val",
                                                 "n_test", "split_seed", "token", "sample_steps", "guidance",
                                                 "eval_every")}, "base_weights": weights.hexdigest()}, sort_keys=True)

    root = emoji_data.cache_root() / "bench" / "sd_style" / hashlib.sha1(key.encode()).hexdigest()[:10]
    (root / "runs").mkdir(parents=True, exist_ok=True)
    train_dir = make_train_folder(data, root, args.token)

    # the base model, no LoRA: same prompts, same seeds
    base_file = root / "base.json"
    if base_file.is_file() and not args.fresh:
        base = json.loads(base_file.read_text())
        base_test = np.load(root / "base.npz")["test"]
    else:
        from reflora_diffusion.presets import model_family
        from reflora_diffusion.sd.sample import build_pipeline

        t0 = time.time()
        path = resolve_pretrained("tiny-emoji")
        metrics, imgs = evaluate(with_dpm(build_pipeline(path, model_family(path))), data, args)
        base = {"val_to_twemoji": metrics["val"]["to_twemoji"], "val_to_noto": metrics["val"]["to_noto"],
                "test_to_twemoji": metrics["test"]["to_twemoji"], "test_to_noto": metrics["test"]["to_noto"],
                "test_to_twemoji_per_emoji": metrics["test"]["to_twemoji_per_emoji"],
                "eval_s": round(time.time() - t0, 1)}
        base_test = (imgs["test"] * 255).round().astype(np.uint8)
        np.savez_compressed(root / "base.npz", test=base_test)
        base_file.write_text(json.dumps(base))
    print(f"base: held-out to Twemoji {base['test_to_twemoji']:.3f}, to Noto {base['test_to_noto']:.3f} "
          f"(eval {base['eval_s']} s)", flush=True)
    # identical images (Twemoji vs Noto) as a floor/ceiling reference
    ref_tw_noto = statistics.fmean(l2(data["google"]["test"], data["twitter"]["test"]))

    runs = []
    for seed in args.seeds:  # seed-major: an interrupted run still has every method at the first seed
        for lr in args.lrs:
            for method in args.methods:
                f = root / "runs" / f"{method}_lr{lr:g}_s{seed}.json"
                if f.is_file() and not args.fresh:
                    r = json.loads(f.read_text())
                else:
                    r = run_one(method, lr, seed, train_dir, data, args, root)
                    common.write_json(f, r, indent=None)
                runs.append(r)
                print(f"{method:10s} lr {lr:g} seed {seed}: final loss {statistics.fmean(r['losses'][-15:]):.4f}  "
                      f"val {r['val_to_twemoji']:.3f}  test {r['test_to_twemoji']:.3f} (to Noto "
                      f"{r['test_to_noto']:.3f})  train {r['train_s']} s eval {r['eval_s']} s", flush=True)

    def agg(rs, k):
        vals = [r[k] for r in rs]
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals}

    per_lr, best = {}, {}
    for m in args.methods:
        per_lr[m] = {}
        for lr in args.lrs:
            rs = [r for r in runs if r["method"] == m and r["lr"] == lr]
            per_lr[m][f"{lr:g}"] = {k: agg(rs, k) for k in ("val_to_twemoji", "test_to_twemoji", "test_to_noto",
                                                            "val_to_noto", "train_s", "eval_s")}
            if args.eval_every:
                per_lr[m][f"{lr:g}"]["test_curve"] = {
                    step: agg([{"x": r["test_curve"][step]} for r in rs], "x") for step in rs[0]["test_curve"]}
            per_lr[m][f"{lr:g}"]["final_loss_last15"] = agg(
                [{"x": statistics.fmean(r["losses"][-15:])} for r in rs], "x")
        lr_best = min(args.lrs, key=lambda lr: per_lr[m][f"{lr:g}"]["val_to_twemoji"]["mean"])
        rs = [r for r in runs if r["method"] == m and r["lr"] == lr_best]
        best[m] = {"lr": lr_best, **{k: per_lr[m][f"{lr_best:g}"][k] for k in per_lr[m][f"{lr_best:g}"]},
                   "wall_s_all_lrs_and_seeds": round(sum(r["train_s"] + r["eval_s"] for r in runs if r["method"] == m), 1),
                   "median_sec_per_step": statistics.median(r["median_sec_per_step"] for r in rs)}
    # paired comparison on the held-out emoji (same seeds): per-seed difference vs LoRA at the best lrs
    paired = {}
    if "lora" in best:
        for m in args.methods:
            if m == "lora":
                continue
            a = best[m]["test_to_twemoji"]["values"]
            b = best["lora"]["test_to_twemoji"]["values"]
            diff = [x - y for x, y in zip(a, b)]
            paired[m] = {"mean_diff_vs_lora": statistics.fmean(diff), "per_seed": diff}

    report = {
        "setting": {**setting, "base": "tiny-emoji", "resolution": 64, "optimizer": "AdamW (wd 1e-2)",
                    "lr_scheduler": "constant", "targets": "UNet to_q to_k to_v to_out.0", "cache_latents": True,
                    "refactor_warmup_steps": max(1, round(args.warmup_frac * args.steps)),
                    "train_emoji": data["train"], "val_emoji": data["val"], "test_emoji": data["test"],
                    "sampler": "DPMSolverMultistepScheduler", "sample_seed": "1000 + prompt index",
                    "metric": "mean pixel L2 at 32x32 (2x2 avg-pooled, RGB in [0,1], 3072 dims) to the true image",
                    "lr_selection": "lowest mean validation distance to Twemoji over seeds",
                    "wall_seconds": round(time.time() - started, 1),
                    "wall_seconds_all_runs": round(sum(r["train_s"] + r["eval_s"] for r in runs) + base["eval_s"], 1)},
        "reference": {"noto_vs_twemoji_test": ref_tw_noto},
        "base": base, "best": best, "paired_vs_lora": paired, "per_lr": per_lr, "runs": runs,
    }
    out = Path(args.out)
    common.write_json(out.with_suffix(".json"), report)
    common.write_text(out.with_suffix(".md"), table_md(report))
    plot(report, args, out.with_suffix(".png"))
    grid(report, data, base_test, root, args, out.with_name(out.name + "_grid.png"))

    print(f"\nheld-out distance to Twemoji (base {base['test_to_twemoji']:.3f}, Noto image itself {ref_tw_noto:.3f})")
    print(f"{'method':10s} {'best lr':>8s} {'val':>7s} {'test mean':>10s} {'std':>6s} {'to Noto':>8s} {'s/step':>7s}")
    for m, b in best.items():
        print(f"{m:10s} {b['lr']:8g} {b['val_to_twemoji']['mean']:7.3f} {b['test_to_twemoji']['mean']:10.3f} "
              f"{b['test_to_twemoji']['std']:6.3f} {b['test_to_noto']['mean']:8.3f} {b['median_sec_per_step']:7.3f}")
    print(f"paired vs LoRA: {json.dumps(paired)}")
    print(f"wrote {out.with_suffix('.json')}, .png and _grid.png ({report['setting']['wall_seconds']} s)")
    return report


def table_md(report: dict) -> str:
    """The docs' results table (each method at its validation-picked lr) and every lr's test distance."""
    base, best, paired = report["base"], report["best"], report["paired_vs_lora"]
    pm = lambda a: f"{a['mean']:.2f} ± {a['std']:.2f}"  # noqa: E731
    lr_s = lambda lr: f"{float(lr):.0e}".replace("e-0", "e-")  # noqa: E731  (0.003 -> 3e-3)
    lines = ["| | best lr (val) | val → Twemoji | **test → Twemoji** | test → Noto | final loss (last 15 steps) "
             "| paired vs LoRA (test, per seed) |", "|---|---|---|---|---|---|---|",
             f"| base, no LoRA | | {base['val_to_twemoji']:.2f} | **{base['test_to_twemoji']:.2f}** "
             f"| {base['test_to_noto']:.2f} | | |"]
    for m, b in best.items():
        pair = ""
        if m in paired:
            per_seed = ", ".join(f"{d:+.2f}" for d in paired[m]["per_seed"])
            pair = f"{paired[m]['mean_diff_vs_lora']:+.2f} ({per_seed})"
        lines.append(f"| {LABELS.get(m, m)} | {lr_s(b['lr'])} | {b['val_to_twemoji']['mean']:.2f} "
                     f"| **{pm(b['test_to_twemoji'])}** | {b['test_to_noto']['mean']:.2f} "
                     f"| {b['final_loss_last15']['mean']:.3f} |" + (f" {pair} |" if pair else " |"))
    lrs = list(next(iter(report["per_lr"].values())))
    every = ", ".join(f"{LABELS.get(m, m)} " + " / ".join(pm(per[lr]["test_to_twemoji"]) for lr in lrs)
                      for m, per in report["per_lr"].items())
    at = " / ".join(map(lr_s, lrs))
    return "\n".join(lines) + f"\n\nEvery lr (test → Twemoji, mean ± std at {at}): {every}.\n"


def smooth(values, window=15):
    half = window // 2
    return [statistics.fmean(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def plot(report, args, path: Path) -> None:
    plt = common.pyplot()

    colours = {"lora": "tab:blue", "reflora": "tab:red", "reflora-s": "tab:green", "lora+": "tab:purple",
               "reflora@factors": "tab:orange", "reflora@update": "tab:brown", "reflora@normalize": "tab:pink"}
    curves = bool(args.eval_every)
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(19 if curves else 13, 5.4))
    ax, bx = axes[0], axes[1]
    styles = dict(zip(args.lrs, [":", "--", "-", "-."]))
    for m in args.methods:
        for lr in args.lrs:
            rs = [r for r in report["runs"] if r["method"] == m and r["lr"] == lr]
            curve = np.mean([smooth(r["losses"]) for r in rs], axis=0)
            best = report["best"][m]["lr"] == lr
            ax.plot(range(1, len(curve) + 1), curve, color=colours.get(m), ls=styles.get(lr, "-"),
                    lw=2.0 if best else 0.9, alpha=1 if best else 0.6, label=f"{LABELS.get(m, m)} lr {lr:g}")
    ax.set(xlabel="optimizer step", ylabel="training loss (15-step moving average, mean over seeds)",
           title=f"Twemoji style on tiny-emoji, r={args.rank}, batch {args.batch_size}, {len(args.seeds)} seeds "
                 "(bold: best lr on val)")
    ax.legend(ncol=3, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    x = np.arange(len(args.lrs))
    width = 0.8 / len(args.methods)
    for k, m in enumerate(args.methods):
        mean = [report["per_lr"][m][f"{lr:g}"]["test_to_twemoji"]["mean"] for lr in args.lrs]
        std = [report["per_lr"][m][f"{lr:g}"]["test_to_twemoji"]["std"] for lr in args.lrs]
        bx.bar(x + (k - (len(args.methods) - 1) / 2) * width, mean, width, yerr=std, capsize=3,
               color=colours.get(m), label=f"{LABELS.get(m, m)} (step {args.steps})")
    bx.axhline(report["base"]["test_to_twemoji"], color="gray", ls="--", lw=1, label="base (no LoRA)")
    lo = min(v["test_to_twemoji"]["mean"] for m in report["per_lr"].values() for v in m.values())
    bx.set_ylim(lo * 0.85, report["base"]["test_to_twemoji"] * 1.08)
    bx.set_xticks(x, [f"lr {lr:g}" for lr in args.lrs])
    bx.set(ylabel="held-out L2 to Twemoji at 32x32 (lower = better)",
           title=f"{args.n_test} held-out emoji, mean ± std over seeds")
    bx.legend(fontsize=7)
    if curves:  # held-out distance vs step, each method at its best lr; step 0 is the base
        cx = axes[2]
        for m in args.methods:
            lr = report["best"][m]["lr"]
            curve = report["per_lr"][m][f"{lr:g}"]["test_curve"]
            steps = [0] + [int(s) for s in curve]
            mean = np.array([report["base"]["test_to_twemoji"]] + [c["mean"] for c in curve.values()])
            std = np.array([0.0] + [c["std"] for c in curve.values()])
            cx.plot(steps, mean, marker="o", ms=3, color=colours.get(m), label=f"{LABELS.get(m, m)} lr {lr:g}")
            cx.fill_between(steps, mean - std, mean + std, color=colours.get(m), alpha=0.12)
        cx.set(xlabel="optimizer step", ylabel="held-out L2 to Twemoji (mean ± std over seeds)",
               title="held-out distance vs step (step 0: the base)")
        cx.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)


def grid(report, data, base_test, root: Path, args, path: Path) -> None:
    n = min(args.grid_emoji, len(data["test"]))
    seed = args.seeds[0]
    rows = [("Twemoji (target)", data["twitter"]["test"][:n]), ("Noto", data["google"]["test"][:n]),
            ("base", base_test[:n])]
    for m in args.methods:
        lr = report["best"][m]["lr"]
        rows.append((f"{LABELS.get(m, m)}\nlr {lr:g}", np.load(root / "runs" / f"{m}_lr{lr:g}_s{seed}.npz")["test"][:n]))
    save_grid(path, [imgs for _, imgs in rows], [label for label, _ in rows], [name[:18] for name in data["test"][:n]],
              f"held-out emoji, '<name> in {args.token} style', seed {seed}, {args.steps} steps")


if __name__ == "__main__":
    main()
