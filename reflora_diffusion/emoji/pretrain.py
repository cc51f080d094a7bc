"""Pretrain the `tiny-emoji` base from scratch on the Noto emoji (64x64), on a 2-core CPU in under 90 minutes.

A Stable Diffusion 1.x pipeline at a small size: a VAE with scale factor 4 (64x64x3 <-> 16x16x4), a CLIP
text encoder with a word-level BPE vocabulary learned from the captions, a UNet with cross-attention at
16x16 and 8x8, epsilon prediction on SD's noise schedule. Two phases:

1. VAE: L1 + MSE reconstruction and a small KL, then the latent scaling factor (1 / std of the latents).
2. UNet + text encoder jointly (latents cached from the frozen VAE), 10% empty captions for
   classifier-free guidance, min-SNR weighting, an EMA of both; the EMA weights are shipped.

    python -m reflora_diffusion.emoji.pretrain --output_dir runs/tiny-emoji --seed 0   # the shipped recipe

Re-running the same command resumes from <output_dir>/checkpoints (safetensors only). The result is
<output_dir>/pipeline (StableDiffusionPipeline.save_pretrained, safetensors) and loss_curve.json/.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESOLUTION = 64
MAX_TOKENS = 32  # tokenizer.model_max_length: the longest caption is 12 words


# ---- tokenizer: CLIP byte-level BPE whose merges make every caption word one token ----


def learn_merges(captions: list[str]) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first) until every word of the captions is a single token."""
    from collections import Counter

    from reflora_diffusion.presets import make_tokenizer

    byte_tok = make_tokenizer()  # no merges: one token per byte, "</w>" on each word's last byte
    words: Counter = Counter()
    for caption in captions:
        word: list[str] = []
        for token in byte_tok.tokenize(caption):
            word.append(token)
            if token.endswith("</w>"):
                words[tuple(word)] += 1
                word = []
    merges = []
    while True:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties broken deterministically
        merges.append(best)
        joined: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            joined[tuple(out)] += n
        words = joined


def make_caption_tokenizer(captions: list[str]):
    from transformers import CLIPTokenizer

    from reflora_diffusion.presets import byte_vocab

    merges = learn_merges(captions)
    base = byte_vocab()  # 512 byte tokens + <|startoftext|> + <|endoftext|>
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = [t for t in base if t not in specials]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    vocab = {t: i for i, t in enumerate(tokens + specials)}
    return CLIPTokenizer(vocab=vocab, merges=[(a, b) for a, b in merges], model_max_length=MAX_TOKENS)


# ---- models ----


def make_models(tokenizer, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=RESOLUTION,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 96, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32,
    )  # fmt: skip
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, hidden_act="quick_gelu",
    ))  # fmt: skip
    return vae, unet, text_encoder


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(  # Stable Diffusion's training noise schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip


# ---- checkpoints: safetensors with the optimizer state flattened into tensors + JSON metadata ----


def save_state(path: Path, modules: dict, optimizer, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().clone()
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optimizer.{idx}.{k}"] = torch.as_tensor(v).contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "param_groups": opt["param_groups"]}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: Path, modules: dict, optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return meta


# ---- training ----


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(n: int, batch_size: int, seed: int, start_step: int):
    """Index batches of a seeded per-epoch permutation; step s always gets the same batch (resume)."""
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        yield step, perm[i * batch_size:(i + 1) * batch_size]
        step += 1


class Curve:
    def __init__(self, path: Path):
        self.path = path
        self.points = json.loads(path.read_text())["points"] if path.is_file() else []

        self._phase, self._running = None, []

    def add(self, phase: str, step: int, loss: float, elapsed: float) -> None:
        self.points.append({"phase": phase, "step": step, "loss": round(loss, 6), "time_s": round(elapsed, 1)})

    def track(self, phase: str, step: int, loss: float, elapsed: float, bar, every: int = 20) -> None:
        """One training step's loss: every `every` steps the mean since the last point is recorded, shown on the
        progress bar and saved."""
        if self._phase != phase:  # a new phase starts its own mean
            self._phase, self._running = phase, []
        self._running.append(loss)
        bar.update(1)
        if step % every == 0:
            mean = sum(self._running) / len(self._running)
            self.add(phase, step, mean, elapsed)
            bar.set_postfix(loss=f"{mean:.4f}")
            self._running = []
            self.save()

    def truncate(self, phase: str, step: int) -> None:  # after a resume: drop points past the checkpoint
        self.points = [p for p in self.points if not (p["phase"] == phase and p["step"] > step)]

    def save(self, extra: dict | None = None) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"points": self.points, **(extra or {})}, indent=0))
        os.replace(tmp, self.path)

    def plot(self, png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, phase in zip(axes, ("vae", "unet")):
            pts = [p for p in self.points if p["phase"] == phase]
            if pts:
                ax.plot([p["step"] for p in pts], [p["loss"] for p in pts])
            ax.set_title(f"{phase} loss")
            ax.set_xlabel("step")
            ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def train_vae(vae, images, args, out: Path, curve: Curve, t0: float):
    from tqdm import tqdm

    final = out / "checkpoints" / "vae.safetensors"
    if final.is_file():
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(final)))
        return
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = out / "checkpoints" / "vae-state.safetensors"
    start = load_state(ckpt, {"vae": vae}, opt)["step"] if ckpt.is_file() else 0
    curve.truncate("vae", start)
    vae.train()
    bar = tqdm(total=args.vae_steps, initial=start, desc="vae", mininterval=10)
    for step, idx in batches(len(images), args.batch_size, args.seed + 1, start):
        if step >= args.vae_steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 100)
        x = images[idx]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        curve.track("vae", step + 1, loss.item(), time.time() - t0, bar)
        if (step + 1) % args.checkpoint_every == 0:
            save_state(ckpt, {"vae": vae}, opt, {"step": step + 1})
    bar.close()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(final))
    ckpt.unlink(missing_ok=True)


@torch.no_grad()
def encode_all(vae, images, batch_size=64):
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


class EMA:
    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, m in modules.items():
            for k, v in m.state_dict().items():
                s = self.shadow[n][k]
                if v.dtype.is_floating_point:
                    s.lerp_(v, 1 - d)
                else:
                    s.copy_(v)


def train_unet(unet, text_encoder, tokenizer, latents, captions, args, out: Path, curve: Curve, t0: float):
    from diffusers.training_utils import compute_snr
    from tqdm import tqdm

    sched = noise_scheduler()
    mean, std = latents
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    modules = {"unet": unet, "text_encoder": text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = EMA(modules, args.ema_decay)
    ckpt = out / "checkpoints" / "unet-state.safetensors"
    start = 0
    if ckpt.is_file():
        ema_modules = {f"ema_{n}": _Holder(s) for n, s in ema.shadow.items()}
        start = load_state(ckpt, {**modules, **ema_modules}, opt)["step"]
    curve.truncate("unet", start)
    unet.train()
    text_encoder.train()
    gen = torch.Generator()
    bar = tqdm(total=args.steps, initial=start, desc="unet+text", mininterval=10)
    for step, idx in batches(len(captions), args.batch_size, args.seed + 2, start):
        if step >= args.steps:
            break
        gen.manual_seed(args.seed * 1000003 + step)  # noise, timesteps and caption dropout per step
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 200)
        b = len(idx)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        z = z * args.scaling_factor
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        noisy = sched.add_noise(z, noise, t)
        tokens = ids[idx].clone()
        drop = torch.rand(b, generator=gen) < args.caption_dropout
        tokens[drop] = empty
        cond = text_encoder(tokens)[0]
        pred = unet(noisy, t, cond).sample
        snr = compute_snr(sched, t)
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(modules, step)
        curve.track("unet", step + 1, loss.item(), time.time() - t0, bar)
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            ema_modules = {f"ema_{n}": _Holder(s) for n, s in ema.shadow.items()}
            save_state(ckpt, {**modules, **ema_modules}, opt, {"step": step + 1})
    bar.close()
    for n, m in modules.items():
        m.load_state_dict(ema.shadow[n])
    return ckpt


class _Holder(torch.nn.Module):
    """A plain dict of tensors seen as a module, so the EMA weights go through save_state/load_state."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *a, **k):
        return dict(self.tensors)

    def load_state_dict(self, state, *a, **k):
        for key, v in state.items():
            self.tensors[key].copy_(v)


def write_slow_tokenizer_files(tokenizer, folder: Path) -> None:
    """vocab.json + merges.txt beside tokenizer.json, for transformers 4.x's slow CLIPTokenizer."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])  # by id: the same file on every run
    (folder / "vocab.json").write_text(json.dumps(dict(vocab), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def build_pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # the trainer loads DDPMScheduler from this config; sampling gets DPM-Solver++ (good in ~25 steps)
    sampler = DPMSolverMultistepScheduler.from_config(noise_scheduler().config)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sampler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pretrain the tiny-emoji Stable Diffusion base on CPU.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="google")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vae_steps", type=int, default=800)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=11000, help="UNet + text encoder steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--checkpoint_every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the shipped base: 2, both cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    out = Path(args.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))

    from . import data as emoji_data

    captions, pixels = emoji_data.load(args.style)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    tokenizer = make_caption_tokenizer(captions)
    vae, unet, text_encoder = make_models(tokenizer, args.seed)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in
              {"vae": vae, "unet": unet, "text_encoder": text_encoder}.items()}  # fmt: skip
    print(f"{len(captions)} images, vocab {len(tokenizer)}, params {counts}", flush=True)

    curve = Curve(out / "loss_curve.json")
    prior = curve.points[-1]["time_s"] if curve.points else 0.0  # time already spent before a resume
    t0 = time.time() - prior
    train_vae(vae, images, args, out, curve, t0)
    vae.requires_grad_(False)
    mean, std = encode_all(vae, images)
    args.scaling_factor = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=args.scaling_factor)
    with torch.no_grad():
        recon = vae.decode(mean[:256]).sample
    vae_mse = F.mse_loss(recon, images[:256]).item()
    print(f"vae: recon mse {vae_mse:.4f} (pixels in [-1, 1]), scaling_factor {args.scaling_factor:.4f}", flush=True)

    ckpt = train_unet(unet, text_encoder, tokenizer, (mean, std), captions, args, out, curve, t0)
    pipe = build_pipeline(vae, unet, text_encoder, tokenizer)
    folder = out / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    write_slow_tokenizer_files(tokenizer, folder / "tokenizer")
    elapsed = time.time() - t0
    unet_pts = [p["loss"] for p in curve.points if p["phase"] == "unet"]
    curve.save({"wall_time_s": round(elapsed, 1), "params": counts, "vae_recon_mse": vae_mse,
                "scaling_factor": args.scaling_factor, "final_unet_loss": unet_pts[-1] if unet_pts else None,
                "args": vars(args)})  # fmt: skip
    curve.plot(out / "loss_curve.png")
    ckpt.unlink(missing_ok=True)
    print(f"done in {elapsed / 60:.1f} min (this process {(time.time() - t_start) / 60:.1f} min): {folder}", flush=True)


if __name__ == "__main__":
    main()
