"""The Stable Diffusion / SDXL / SD3 / FLUX LoRA training loop, top to bottom (flow.py: SD3/FLUX specifics).

config -> data -> models (+ LoRA) -> optimizer + core method -> accelerate -> loop -> events, samples,
checkpoints -> export. `train(cfg)` is what `train/sd.py` calls.

Reproducibility is by construction, so that a resumed run and a 2-process run repeat a 1-process run:
- the data order and every crop/flip depend only on (seed, epoch, index) (see data.py);
- diffusion noise, timesteps and VAE samples come from one generator seeded identically on every
  process; each step draws them for the whole global batch and a process takes its own rows;
- a checkpoint holds that generator, accelerate's state (optimizer, scheduler, RNGs, scaler), the LoRA
  weights and the core's state (its step count, so the RefLoRA warm-up is never restarted).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reflora_diffusion.core.options import default_warmup
from reflora_diffusion.cpu import distributed_cpu_run
from reflora_diffusion.families.base import cast
from reflora_diffusion.logs import get_logger
from reflora_diffusion.rundir import (TRAINER_STATE, RunLog, check_output_dir, checkpoint_dirs, clean_stale_temps,
                                     clear_run, read_json, resume_changes)

from . import flow
from .config import ConfigError, SDTrainConfig
from .data import build_dataloader, build_dataset, check_data_dirs, load_class_images
from .models import Components, load_components, prepare_for_training, stored_bytes, trainable_parameters
from .offload import check_offload
from .stop import StopRequest, stop_on_sigterm

LORA_STATE = "{}_lora.safetensors"  # per trained model, inside a checkpoint


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated NaN losses); the message says what to change."""


# --- building blocks --------------------------------------------------------------------------------------
def _import(module: str, flag: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--optimizer {flag} needs {package}: pip install {package} (or pip install "
                          "'reflora-diffusion[optimizers]'), or use adamw") from None


EXTRA_OPTIMIZERS = ("adamw8bit", "adamw_8bit", "adafactor", "prodigy", "schedulefree_adamw", "adamw_schedulefree")


def _torch_optimizers() -> dict:
    return {n.lower(): c for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}


def _check_optimizer_name(cfg: SDTrainConfig) -> None:
    classes = _torch_optimizers()
    if cfg.optimizer.lower() not in (*EXTRA_OPTIMIZERS, *classes):
        raise ConfigError(f"--optimizer {cfg.optimizer!r} is unknown; use adamw, adamw8bit, adafactor, prodigy, "
                          f"schedulefree_adamw or a torch.optim class ({', '.join(sorted(classes))})")


def _check_schedule_free(cfg: SDTrainConfig) -> None:
    if cfg.optimizer.lower() in ("schedulefree_adamw", "adamw_schedulefree") and cfg.lr_scheduler != "constant":
        raise ConfigError(f"--optimizer {cfg.optimizer} replaces the learning-rate schedule (--lr_scheduler "
                          f"{cfg.lr_scheduler}); use --lr_scheduler constant (--lr_warmup_steps is its warm-up)")


def make_optimizer(cfg: SDTrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW by default; bitsandbytes' 8-bit AdamW; Adafactor (transformers', constant lr as LoRA trainers use it);
    Prodigy (prodigyopt: --learning_rate is its multiplier, 1.0 as usual); schedule-free AdamW (schedulefree: its own
    warm-up, a constant lr); or any torch.optim class by (case-insensitive) name."""
    import inspect

    name = cfg.optimizer.lower()
    adam = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon, "weight_decay": cfg.adam_weight_decay}
    if name in ("adamw8bit", "adamw_8bit"):
        bnb = _import("bitsandbytes", cfg.optimizer, "bitsandbytes")
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, **adam)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.adam_weight_decay)
    if name == "prodigy":
        prodigyopt = _import("prodigyopt", cfg.optimizer, "prodigyopt")
        return prodigyopt.Prodigy(groups, lr=cfg.learning_rate, decouple=True, use_bias_correction=True,
                                  safeguard_warmup=True, **adam)
    if name in ("schedulefree_adamw", "adamw_schedulefree"):
        schedulefree = _import("schedulefree", cfg.optimizer, "schedulefree")
        _check_schedule_free(cfg)
        return schedulefree.AdamWScheduleFree(groups, lr=cfg.learning_rate, warmup_steps=cfg.lr_warmup_steps, **adam)
    classes = _torch_optimizers()
    _check_optimizer_name(cfg)
    cls = classes[name]
    accepted = inspect.signature(cls).parameters
    return cls(groups, lr=cfg.learning_rate, **{k: v for k, v in adam.items() if k in accepted})


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as in diffusers' training scripts."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the trained (LoRA) parameters, under their own names."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def find_resume_checkpoint(cfg: SDTrainConfig) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(Path(cfg.output_dir))
        return found[-1] if found else None
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir() and (Path(cfg.output_dir) / "checkpoints" / path).is_dir():
        path = Path(cfg.output_dir) / "checkpoints" / path  # "checkpoint-200" relative to the run
    if not path.is_dir():
        raise ConfigError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint!r} does not exist; give a "
                          "checkpoints/checkpoint-<N> folder or 'latest'")
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"--resume_from_checkpoint {str(path)!r} is not a checkpoint of this trainer "
                          f"(no {TRAINER_STATE})")
    return path


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint folder of this trainer was written at."""
    from safetensors import safe_open

    with safe_open(str(path / TRAINER_STATE), framework="pt") as f:
        return int(f.metadata()["global_step"])


# --- the trainer ----------------------------------------------------------------------------------------
class SDTrainer:
    @classmethod
    def in_process(cls, cfg: SDTrainConfig) -> "SDTrainer":
        """A trainer for a process that runs several in turn (benchmarks, tests, a notebook): accelerate's
        process-wide state is reset first, so each gets its own mixed precision and accumulation."""
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return cls(cfg)

    def __init__(self, cfg: SDTrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        preset_line = self._apply_memory_preset(cfg)  # before the Accelerator: it may set the mixed precision
        self.accelerator = Accelerator(
            cpu=distributed_cpu_run(),
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            # SDXL conditions on text encoder 1's penultimate layer: its last layer's LoRA gets no gradient
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train_text_encoder)],
            project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                logging_dir=str(self.run_dir / "logs")),
        )
        self.is_main = self.accelerator.is_main_process
        if preset_line:
            get_logger(__name__).info(preset_line)
        if self.accelerator.device.type == "cpu":
            from reflora_diffusion.cpu import configure_cpu_threads

            configure_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        # Everything a user can get wrong is checked before the run folder is touched: a refusal leaves it as it was.
        self.resume_dir = find_resume_checkpoint(cfg)
        previous = read_json(self.run_dir / "config.json") if self.resume_dir is not None else None
        if cfg.seed is None and isinstance(previous, dict):
            cfg.seed = previous.get("seed")  # a resumed run keeps its data order unless a seed is given
        requested = {**cfg.to_dict()}  # as given, before the seed is drawn (for comparing with the folder's run)
        if cfg.seed is None:  # drawn once and shared, so all processes agree; recorded in config.json
            from accelerate.utils import broadcast_object_list

            cfg.seed = broadcast_object_list([random.randint(0, 2**31 - 1)])[0]
        check_data_dirs(cfg)
        self.family = self._resolve_base(cfg)
        self.family.check_options(cfg, self.accelerator.mixed_precision)  # one line, before the run folder
        self._check_optimizer_method(cfg)
        check_offload(cfg, self.family, self.accelerator.num_processes)
        if cfg.base_model_precision != "no":  # its backend, device and dtype, before the run folder too
            from .models import quantization_config

            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)
            quantization_config(cfg, dtype, self.accelerator.device)
        self.dataset = build_dataset(cfg)  # decodes every image: unusable data fails here
        self.max_steps = self._count_steps()
        if cfg.refactor_warmup_steps is None:
            cfg.refactor_warmup_steps = default_warmup(self.max_steps)
        action = check_output_dir(self.run_dir, requested, resume_found=self.resume_dir is not None)
        if action == "resume" and checkpoint_step(self.resume_dir) >= self.max_steps:
            raise ConfigError(f"--resume_from_checkpoint: {self.resume_dir.name} is already at step "
                              f"{checkpoint_step(self.resume_dir)} of {self.max_steps}; pass a larger "
                              "--max_train_steps to train on")
        if action == "resume" and isinstance(previous, dict):
            self._record_resume_changes(previous, requested)
        if self.is_main:
            if action == "overwrite":
                clear_run(self.run_dir)  # (a "restart" has trained nothing: its events are reset below)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.run_dir)
            cfg.save(self.run_dir / "config.json")
        self.accelerator.wait_for_everyone()
        self.log = RunLog(self.run_dir, cfg.max_train_steps, enabled=self.is_main)
        self.log.set_status(state="running")
        self.stop = StopRequest()
        self.bar = None
        self.global_step = 0
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                             torch.float32)

    def _count_steps(self) -> int:
        """Optimizer steps of the run: --max_train_steps, else the epochs' worth of batches."""
        cfg, n = self.cfg, self.accelerator.num_processes
        if cfg.max_train_steps:
            return cfg.max_train_steps
        if cfg.with_prior_preservation:  # the class images are loaded in setup (after generating missing ones)
            batches = math.ceil(max(len(self.dataset), cfg.num_class_images) / cfg.train_batch_size)
        else:
            batches = len(build_dataloader(self.dataset, cfg, n))
        return cfg.num_train_epochs * math.ceil(math.ceil(batches / n) / cfg.gradient_accumulation_steps)

    def _record_resume_changes(self, previous: dict, requested: dict) -> None:
        """A resume with other data, prompts, learning rate, seed, ...: go on, say so in one line, and keep the
        change with its step in config.json (and so in the model card), so that they describe the whole run."""
        changes = resume_changes(previous, requested)
        history = list(previous.get("changed_on_resume") or [])
        if changes:
            step = checkpoint_step(self.resume_dir)
            history.append({"step": step, **changes})
            get_logger(__name__).warning(
                f"resuming at step {step} with changed options: "
                + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                + " (recorded in config.json and the model card)")
        self.cfg.changed_on_resume = history or None

    @staticmethod
    def _resolve_base(cfg: SDTrainConfig) -> str:
        """Build a preset if needed, record its local folder, default the resolution (and the SD3/FLUX options,
        the bucket bounds) to the model's own; returns the model family."""
        from reflora_diffusion.families import family_of
        from reflora_diffusion.presets import native_resolution, pixel_multiple, resolve_pretrained

        try:
            path = resolve_pretrained(cfg.pretrained_model_name_or_path)
            family = family_of(path)
            if cfg.resolution is None:
                cfg.resolution = native_resolution(path, cfg.revision)
            multiple = pixel_multiple(path, cfg.revision) if cfg.enable_bucket else 8
        except Exception as e:  # noqa: BLE001 - missing folder, offline hub, bad id: all the user's to fix
            raise ConfigError(f"cannot load base model {cfg.pretrained_model_name_or_path!r}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} (use a "
                              "local diffusers folder, a hub id reachable online, or 'tiny')") from None
        if Path(path).is_dir():
            cfg.base_model_folder = str(Path(path).resolve())
        cfg.resolve_buckets(multiple)
        cfg.weighting_scheme = cfg.weighting_scheme or family.default_weighting
        cfg.max_sequence_length = cfg.max_sequence_length or family.default_max_sequence_length
        return family

    @staticmethod
    def _apply_memory_preset(cfg: SDTrainConfig) -> str | None:
        if not cfg.memory_preset:
            return None
        from reflora_diffusion.families import family_of
        from reflora_diffusion.presets import resolve_pretrained

        from .memory import apply_memory_preset

        try:
            family = family_of(resolve_pretrained(cfg.pretrained_model_name_or_path)).name
        except Exception as e:  # noqa: BLE001 - the same one line _resolve_base gives
            raise ConfigError(f"cannot load base model {cfg.pretrained_model_name_or_path!r}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return apply_memory_preset(cfg, family)

    @staticmethod
    def _check_optimizer_method(cfg: SDTrainConfig) -> None:
        """Method and optimizer pairs whose optimizer state the method cannot carry (the core refuses them at
        attach; here before the run folder is touched)."""
        from reflora_diffusion.core.methods import state_change_refusal

        if cfg.base_model_precision != "no" and (cfg.method in ("cola", "rac-lora") or cfg.reinit):
            raise ConfigError(f"--base_model_precision {cfg.base_model_precision}: --method {cfg.method}"
                              f"{' --reinit' if cfg.reinit else ''} merges LoRA links into the base weights, which "
                              "a quantized base cannot take; use --base_model_precision no, or another method")
        _check_optimizer_name(cfg)
        package = {"prodigy": "prodigyopt", "schedulefree_adamw": "schedulefree", "adamw_schedulefree": "schedulefree",
                   "adamw8bit": "bitsandbytes", "adamw_8bit": "bitsandbytes"}.get(cfg.optimizer.lower())
        if package:
            _import(package, cfg.optimizer, package)
        _check_schedule_free(cfg)
        factors = cfg.method == "reflora" and cfg.reflora_apply_to == "factors"
        if cfg.method == "reflora-s" or factors:
            what = "--method reflora-s" if not factors else "--reflora_apply_to factors"
            reason = state_change_refusal(what, cfg.optimizer, factored=factors)
            if reason:
                raise ConfigError(f"--optimizer {cfg.optimizer}: {reason}")

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        with self.log.reporting():
            self._setup()

    def _setup(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from reflora_diffusion.core import Refactorer

        cfg, acc = self.cfg, self.accelerator
        resume_dir = self.resume_dir
        if cfg.with_prior_preservation:
            from .sample import ensure_class_images

            ensure_class_images(cfg, acc)
            self.dataset.classes = load_class_images(cfg)
        set_seed(cfg.seed)  # same on every process: identical LoRA init everywhere
        self.components: Components = load_components(cfg, self.weight_dtype, acc.device)
        prepare_for_training(self.components, cfg, self.weight_dtype, acc.device)
        if cfg.base_model_precision != "no":
            frozen = [p for p in self.components.denoiser.parameters() if not p.requires_grad]
            stored = sum(stored_bytes(p) for p in frozen)
            get_logger(__name__).info(
                f"base model precision {cfg.base_model_precision}: the frozen {self.components.denoiser_name} takes "
                f"{stored / 2**20:.1f} MiB ({sum(p.numel() for p in frozen) * 2 / 2**20:.1f} MiB in bf16)")
            self.log.event(step=0, base_model_precision=cfg.base_model_precision, base_weight_bytes=stored)

        # Trained models: the UNet/transformer, and the (CLIP) text encoders with --train_text_encoder.
        self.trained = {self.components.denoiser_name: self.components.denoiser}
        if cfg.train_text_encoder:
            adapted = self.components.lora_text_encoders  # the CLIP encoders (T5 never)
            self.trained.update({k: m for k, m in self.components.models.items() if any(m is t for t in adapted)})
        te_lr = cfg.text_encoder_lr or cfg.learning_rate
        groups = [{"params": trainable_parameters(m),
                   "lr": cfg.learning_rate if k == self.components.denoiser_name else te_lr}
                  for k, m in self.trained.items()]
        if cfg.scale_lr:
            factor = cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
            for g in groups:
                g["lr"] *= factor
        optimizer = make_optimizer(cfg, groups)
        # One Refactorer over all trained models: pair names are "unet.<module>", "text_encoder.<module>".
        try:
            self.ref = Refactorer(nn.ModuleDict(self.trained), method=cfg.method, **cfg.method_options())
        except TypeError as e:  # an option the method does not take
            raise ConfigError(f"--method {cfg.method}: {e}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if hasattr(optimizer, "train") and isinstance(optimizer.param_groups[0].get("train_mode"), bool):
            optimizer.train()  # schedule-free: training mode (evaluation_weights switches for samples and exports)
        self.ref.attach(optimizer)  # before the scheduler: lora+ adds a parameter group

        dataloader = build_dataloader(self.dataset, cfg, acc.num_processes)
        self.ref.check_schedule(self.max_steps)
        # accelerate steps a prepared scheduler once per process per optimizer step
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                     num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
                                     num_training_steps=self.max_steps * acc.num_processes,
                                     num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
        names = list(self.trained)
        # a swapped denoiser is placed by its BlockSwap (accelerate's model.to(device) would onload every block)
        placement = [self.components.block_swap is None or m is not self.components.denoiser
                     for m in self.trained.values()] + [True] * 3
        prepared = acc.prepare(*self.trained.values(), optimizer, dataloader, lr_scheduler, device_placement=placement)
        self.models = dict(zip(names, prepared[:len(names)]))
        self.optimizer, self.dataloader, self.lr_scheduler = prepared[len(names):]
        self.steps_per_epoch = math.ceil(len(self.dataloader) / cfg.gradient_accumulation_steps)
        self.epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        acc.register_save_state_pre_hook(self._save_lora_hook)
        acc.register_load_state_pre_hook(self._load_lora_hook)

        self.noise_gen = torch.Generator(device=acc.device).manual_seed(cfg.seed)
        self.global_step, self.skipped_steps = 0, 0
        self.text_cache: dict[str, tuple] = {}
        self.disk_cache = self._open_disk_cache() if cfg.cache_dir else None
        self.eval_set = self._build_eval_set() if cfg.eval_loss_every else None
        self.latent_cache = self._cache_latents() if cfg.cache_latents else None
        if cfg.cache_latents and self.components.flow and not cfg.train_text_encoder and not cfg.shuffle_caption:
            self._cache_prompts_and_unload()  # (shuffled tags make too many prompts to encode up front)
        if resume_dir is not None:
            self._load_checkpoint(resume_dir)
        else:
            if cfg.resume_from_checkpoint == "latest":
                get_logger(__name__).info(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting a new run")
            self.log.truncate_after(0)  # a fresh run in a reused folder starts a fresh event log
        if self.disk_cache is not None:
            get_logger(__name__).info(f"--cache_dir {cfg.cache_dir}: {self.disk_cache.hits} entries read, "
                                      f"{self.disk_cache.misses} encoded and written")
        if cfg.report_to != "none":
            acc.init_trackers("reflora-sd", config={k: str(v) if isinstance(v, list) else v
                                                   for k, v in cfg.to_dict().items() if v is not None})

    # ------------------------------------------------------------------ conditioning
    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings; cached per prompt when the text encoders are frozen and --cache_latents is on."""
        encoders = [self.models.get(k, m) for k, m in self.components.models.items() if k != self.components.denoiser_name]

        def encode(texts):
            return self.components.family.encode_text(encoders, self.components.tokenizers, texts, self.accelerator.device)

        if self.cfg.train_text_encoder:
            return encode(prompts)
        if not self.cfg.cache_latents or self.cfg.shuffle_caption:  # shuffled tags: too many prompts to keep
            with torch.no_grad():
                return encode(prompts)
        new = sorted(set(prompts) - set(self.text_cache))
        if new and self.disk_cache is not None:  # entries other runs (or methods) wrote
            for p in list(new):
                entry = self.disk_cache.load(self._text_entry(p))
                if entry is not None:
                    device = self.accelerator.device
                    self.text_cache[p] = (entry["hidden"].to(device), entry["pooled"].to(device) if "pooled" in entry
                                          else None)
                    new.remove(p)
        if new:
            with torch.no_grad():
                hidden, pooled = encode(new)
            for i, p in enumerate(new):
                self.text_cache[p] = (hidden[i], None if pooled is None else pooled[i])
                if self.disk_cache is not None and self.is_main:
                    self.disk_cache.save(self._text_entry(p), {"hidden": hidden[i],
                                                               **({} if pooled is None else {"pooled": pooled[i]})})
        hidden = self.components.family.batch_embeds([self.text_cache[p][0] for p in prompts])
        pooled = [self.text_cache[p][1] for p in prompts]
        pooled = None if pooled[0] is None else torch.stack(pooled)
        return hidden, pooled

    def _cache_prompts_and_unload(self) -> None:
        """SD3/FLUX with frozen text encoders: encode every training and validation prompt once, then free the
        text encoders (T5-XXL alone is ~9 GB in bf16); validation samples from the cached embeddings."""
        sets = [self.dataset.instances, self.dataset.classes]
        prompts = {p for s in sets if s is not None for p in s.prompts} | set(self.cfg.validation_prompt)
        prompts |= {b["prompts"][0] for b in self.eval_set or []}
        if self.components.family.negative_prompt_cached() or self.cfg.caption_dropout_rate > 0:
            prompts.add("")  # SD3's negative prompt in validation; a dropped caption
        self._encode_text(sorted(prompts))
        self.components.text_encoders = []
        if self.accelerator.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _latent_dist(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.components.vae
        return self.components.family.encode_images(vae, pixel_values.to(self.accelerator.device, vae.dtype))

    def _cache_latents(self) -> dict[int, tuple]:
        """VAE posterior (mean, std) per dataset index, at epoch 0's crop/flip; samples are still drawn per step."""
        from tqdm.auto import tqdm

        from .data import collate

        cache, disk = {}, self.disk_cache
        for i in tqdm(range(len(self.dataset)), desc="caching latents", disable=not self.is_main):
            pixels = collate([self.dataset[(0, i)]])["pixel_values"]
            path = disk.path("latents", pixels, str(self.components.vae.dtype)) if disk is not None else None
            entry = disk.load(path) if disk is not None else None
            if entry is not None:
                cache[i] = (entry["mean"].to(self.accelerator.device), entry["std"].to(self.accelerator.device))
                continue
            cache[i] = self._latent_dist(pixels)
            if disk is not None and self.is_main:
                disk.save(path, {"mean": cache[i][0], "std": cache[i][1]})
        return cache

    def _open_disk_cache(self):
        """--cache_dir: entries keyed by the base model's VAE and text encoders (disk_cache.py)."""
        from .disk_cache import DiskCache, model_identity

        c, cfg = self.components, self.cfg
        parts = [c.family.name, str(self.weight_dtype), model_identity(c.path, cfg.revision, "vae", dict(c.vae.config))]
        parts += [model_identity(c.path, cfg.revision, name, encoder.config.to_dict())
                  for name, encoder in zip(c.family.text_encoder_names, c.text_encoders)]
        return DiskCache(cfg.cache_dir, "\n".join(parts))

    def _text_entry(self, prompt: str):
        return self.disk_cache.path("text", prompt, [t.model_max_length for t in self.components.tokenizers])

    def _shared(self, n_inst: int, n_rows: int, make) -> torch.Tensor:
        """Random rows for this process's samples, cut from draws for the whole global batch.

        `make(m)` draws m rows from the shared generator. Instance and class halves draw separately, so
        row k of the global batch is the same sample whatever the number of processes.
        """
        p, i = self.accelerator.num_processes, self.accelerator.process_index
        parts = [make(n_inst * p)[i * n_inst:(i + 1) * n_inst] for _ in range(n_rows // n_inst)]
        return torch.cat(parts).to(self.accelerator.device)

    def _randn(self, n_inst: int, n_rows: int, *shape) -> torch.Tensor:
        g = self.noise_gen
        return self._shared(n_inst, n_rows, lambda m: torch.randn((m, *shape), generator=g, device=g.device))

    def _latents(self, batch: dict) -> torch.Tensor:
        """Scaled VAE latents of the batch; the posterior sample uses the shared generator (see module doc)."""
        n_inst = len(batch["index"])
        if self.latent_cache is not None:
            idx = batch["index"].tolist()
            halves = len(batch["prompts"]) // n_inst  # 2 with prior preservation (instance half, class half)
            mean = torch.cat([self.latent_cache[i][0][h:h + 1] for h in range(halves) for i in idx])
            std = torch.cat([self.latent_cache[i][1][h:h + 1] for h in range(halves) for i in idx])
        else:
            mean, std = self._latent_dist(batch["pixel_values"])
        eps = self._randn(n_inst, mean.shape[0], *mean.shape[1:])
        return self._scaled(mean + std * eps.to(mean.dtype))

    def _scaled(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents in the denoiser's space (the family's: shift and scale, FLUX.2's patchify and batch norm), in
        the weight dtype."""
        return self.components.family.model_latents(self.components.vae, latents.float()).to(self.weight_dtype)

    # ------------------------------------------------------------------ the held-out loss
    def _build_eval_set(self) -> list[dict]:
        """Per eval image: its latents (VAE posterior mean), fixed noise and timesteps (or flow densities u),
        prompt and sizes. Noise comes from --eval_seed and the image's index, timesteps are the K evenly spaced
        quantiles: the same for every method, run and process, and independent of the training RNG."""
        from .data import Crop, ImageCaptionSet

        cfg = self.cfg
        if cfg.eval_data_dir:
            images = ImageCaptionSet.from_folder(cfg.eval_data_dir, cfg.resolution, captions=True,
                                                 prompt=cfg.instance_prompt, image_column=cfg.image_column,
                                                 caption_column=cfg.caption_column, what="--eval_data_dir")
        else:
            images = self.dataset.instances
        crop = Crop(cfg.resolution, center_crop=True, random_flip=False, seed=0)
        k, m = cfg.eval_timesteps, cfg.eval_noises
        quantiles = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        if self.components.flow:
            steps = quantiles.float().repeat_interleave(m)  # u of the flow's timestep density
        else:
            steps = (quantiles * self.components.noise_scheduler.config.num_train_timesteps).long().repeat_interleave(m)
        out = []
        for i, image in enumerate(images.images):
            (w, h) = images.targets[i]
            pixels, top_left = crop(image, 0, 0, (w, h))
            latents = self._scaled(self._latent_dist(pixels[None])[0])  # the posterior mean: no sampling
            g = torch.Generator().manual_seed(cfg.eval_seed * 1_000_003 + i)
            noise = torch.randn((k * m, *latents.shape[1:]), generator=g).to(latents.device, latents.dtype)
            out.append({"latents": latents, "noise": noise, "steps": steps.to(latents.device),
                        "prompts": [images.prompts[i]] * m, "original_sizes": [images.sizes[i]] * m,
                        "crop_top_lefts": [top_left] * m, "target_sizes": [(h, w)] * m})
        return out

    @contextlib.contextmanager
    def evaluation_weights(self):
        """Schedule-free optimizers train at one point and evaluate at another (their average): the held-out loss,
        samples and exports use the evaluation point (``optimizer.eval()``), training goes on at the training point.
        Other optimizers: nothing changes."""
        opt = getattr(self, "optimizer", None)
        opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
        switch = opt is not None and isinstance(opt.param_groups[0].get("train_mode"), bool) and hasattr(opt, "eval")
        if switch:
            opt.eval()
        try:
            yield
        finally:
            if switch:
                opt.train()

    @torch.no_grad()
    def eval_loss(self) -> float:
        """The unweighted denoising loss (epsilon, v or flow target) over the eval set, at its fixed noise and
        timesteps, with the current weights; one forward pass per image and timestep."""
        with self.evaluation_weights():
            return self._eval_loss()

    def _eval_loss(self) -> float:
        for m in self.models.values():
            m.eval()
        total, m = 0.0, self.cfg.eval_noises
        for item in self.eval_set:
            for j in range(0, len(item["steps"]), m):
                latents = item["latents"].expand(m, *item["latents"].shape[1:])
                noise, steps = item["noise"][j:j + m], item["steps"][j:j + m]
                if self.components.flow:
                    pred, target, _ = self._flow_prediction(latents, noise, steps, item)
                else:
                    pred, target = self._unet_prediction(latents, noise, steps, item)
                total += float(F.mse_loss(pred, target))
        for model in self.models.values():
            model.train()  # as the loop has them
        return total / (len(self.eval_set) * self.cfg.eval_timesteps)

    def _log_eval_loss(self) -> None:
        value = self.eval_loss()  # on every process (identical there): a wrapped model's forward may sync
        self.log.event(step=self.global_step, eval_loss=value)

    # ------------------------------------------------------------------ one micro-batch
    def loss(self, batch: dict) -> torch.Tensor:
        if self.components.flow:
            return self._flow_loss(batch)
        cfg, sched = self.cfg, self.components.noise_scheduler
        latents = self._latents(batch)
        n_inst, n = len(batch["index"]), latents.shape[0]
        noise = self._randn(n_inst, n, *latents.shape[1:])
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * self._randn(n_inst, n, latents.shape[1], 1, 1)
        noise = noise.to(latents.dtype)
        g, steps = self.noise_gen, sched.config.num_train_timesteps
        timesteps = self._shared(n_inst, n, lambda m: torch.randint(0, steps, (m,), generator=g, device=g.device))
        pred, target = self._unet_prediction(latents, noise, timesteps, batch)

        prior_loss = 0.0
        if cfg.with_prior_preservation:  # instance half first, class half second (data.collate)
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            timesteps = timesteps[:n_inst]
            prior_loss = cfg.prior_loss_weight * F.mse_loss(pred_prior, target_prior)
        if cfg.snr_gamma is None:
            loss = F.mse_loss(pred, target)
        else:
            per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(sched, timesteps, cfg.snr_gamma)).mean()
        return loss + prior_loss

    def _unet_prediction(self, latents, noise, timesteps, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """SD/SDXL: the UNet's prediction for latents noised at `timesteps`, and its target (epsilon or v)."""
        sched = self.components.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        hidden, pooled = self._encode_text(batch["prompts"])
        added = self.components.family.added_cond_kwargs(batch, pooled, self.accelerator.device, self.weight_dtype)
        pred = self.models["unet"](noisy, timesteps, hidden.to(self.weight_dtype), added_cond_kwargs=added,
                                   return_dict=False)[0].float()
        target = (noise if sched.config.prediction_type == "epsilon"
                  else sched.get_velocity(latents, noise, timesteps)).float()
        return pred, target

    def _flow_prediction(self, latents, noise, u, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SD3/FLUX: x_t = (1 - sigma) x_0 + sigma noise at density draws u; (prediction, target noise - x_0,
        sigmas)."""
        timesteps, sigmas = flow.timesteps_and_sigmas(self.components.noise_scheduler, u)
        sigmas = sigmas.view(-1, 1, 1, 1)
        noisy = ((1.0 - sigmas) * latents.float() + sigmas * noise.float()).to(self.weight_dtype)
        hidden, pooled = self._encode_text(batch["prompts"])
        pred = self.components.family.predict(self.models[self.components.denoiser_name], self.components.denoiser.config, noisy, timesteps,
                                     cast(hidden, self.weight_dtype), cast(pooled, self.weight_dtype),
                                     self.cfg.guidance_scale)
        return pred.float(), (noise - latents).float(), sigmas

    def _flow_loss(self, batch: dict) -> torch.Tensor:
        """SD3/FLUX: x_t = (1 - sigma) x_0 + sigma noise, target noise - x_0, sigma from --weighting_scheme."""
        cfg = self.cfg
        latents = self._latents(batch)
        n_inst, n = len(batch["index"]), latents.shape[0]
        noise = self._randn(n_inst, n, *latents.shape[1:]).to(latents.dtype)
        u = self._shared(n_inst, n, lambda m: flow.sample_density(cfg, m, self.noise_gen))
        pred, target, sigmas = self._flow_prediction(latents, noise, u, batch)
        weighted = flow.loss_weighting(cfg.weighting_scheme, sigmas) * (pred - target) ** 2
        if not cfg.with_prior_preservation:
            return weighted.mean()
        instance, prior = weighted.chunk(2)  # instance half first, class half second (data.collate)
        return instance.mean() + cfg.prior_loss_weight * prior.mean()

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        with self.log.reporting():
            try:
                return self._loop()
            finally:
                if self.bar is not None:
                    self.bar.close()  # before an error line, not after it

    def _loop(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self.log.set_status(state="running", step=self.global_step, max_steps=self.max_steps)
        self.bar = bar = tqdm(total=self.max_steps, initial=self.global_step, desc=f"{cfg.method} r={cfg.rank}",
                              disable=not self.is_main)
        first_epoch = self.global_step // self.steps_per_epoch
        skip_batches = (self.global_step % self.steps_per_epoch) * cfg.gradient_accumulation_steps
        bad_streak = 0
        t_log, since_log = time.perf_counter(), []  # step losses since the last events.jsonl line
        for m in self.models.values():
            m.train()
        if cfg.eval_loss_every and self.global_step == 0:
            self._log_eval_loss()  # the base's, for reference

        for epoch in range(first_epoch, self.epochs):
            self.dataloader.set_epoch(epoch)
            loader = self.dataloader
            if epoch == first_epoch and skip_batches:
                loader = acc.skip_first_batches(self.dataloader, skip_batches)
                loader.set_epoch(epoch)
            for batch in loader:
                done = self.step(batch)
                if done is None:
                    continue  # inside a gradient-accumulation window
                losses, ok, stop_now = done
                self.global_step += 1
                since_log.append(float(losses.mean()) if ok else float("nan"))
                bar.update(1)
                if ok:
                    bad_streak = 0
                else:
                    self.skipped_steps += 1
                    bad_streak += 1
                    if bad_streak >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"loss or gradients were NaN/inf for {bad_streak} steps in a row (up to step "
                            f"{self.global_step}); lower --learning_rate, use bf16 instead of fp16, or check the data")
                if self.global_step % cfg.logging_steps == 0 or self.global_step == self.max_steps:
                    now = time.perf_counter()
                    finite = [x for x in since_log if math.isfinite(x)]
                    loss_avg = sum(finite) / len(finite) if finite else float("nan")  # mean since last line
                    self._log_step(loss_avg, (now - t_log) / len(since_log), epoch, ok)
                    bar.set_postfix(loss=f"{loss_avg:.4f}")
                    t_log, since_log = now, []
                if cfg.eval_loss_every and (self.global_step % cfg.eval_loss_every == 0
                                            or self.global_step == self.max_steps):
                    self._log_eval_loss()
                if self.global_step % cfg.checkpointing_steps == 0 and self.global_step < self.max_steps:
                    self.save_checkpoint()
                if cfg.validation_prompt and self.global_step % cfg.validation_steps == 0 \
                        and self.global_step < self.max_steps:
                    self.validate()
                if stop_now and self.global_step < self.max_steps:
                    self._stop_at_step_boundary()
                if self.global_step >= self.max_steps:
                    break
            if self.global_step >= self.max_steps:
                break
        bar.close()
        self.finish()
        return self.run_dir

    def step(self, batch: dict) -> tuple[torch.Tensor, bool, bool] | None:
        """One micro-batch: loss and backward; at the end of an accumulation window the optimizer step (the core's
        method runs inside it), clipped, and skipped when the loss or the gradients are not finite, then the
        scheduler. Returns None inside a window, else (every process's mean loss of the window, whether the
        optimizer stepped, whether any process was asked to stop). The loop and the benchmarks call this."""
        cfg, acc = self.cfg, self.accelerator
        if getattr(self, "_window", None) is None:
            self._window = [torch.zeros((), device=acc.device), 0]
            self._params = [p for m in self.trained.values() for p in trainable_parameters(m)]
        with acc.accumulate(*self.models.values()):
            loss = self.loss(batch)
            acc.backward(loss)  # also when NaN: every process runs the same collective ops
            self._window[0] += loss.detach()
            self._window[1] += 1
            if not acc.sync_gradients:
                return None
            # One collective per optimizer step: every process's mean loss of this window and whether it was asked
            # to stop (so all processes stop after the same step).
            flag = torch.ones((), device=acc.device) if self.stop.is_set() else torch.zeros((), device=acc.device)
            gathered = acc.gather(torch.stack([self._window[0] / self._window[1], flag]).float())
            losses, stop_now = gathered[0::2], bool(gathered[1::2].any())
            ok = bool(torch.isfinite(losses).all())
            if ok and cfg.max_grad_norm > 0:
                ok = bool(torch.isfinite(acc.clip_grad_norm_(self._params, cfg.max_grad_norm)))
            if ok:
                self.optimizer.step()  # the core's method runs inside (step hooks)
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._window[0].zero_()
        self._window[1] = 0
        return losses, ok, stop_now

    def _stop_at_step_boundary(self) -> None:
        """A requested stop (SIGTERM): keep the work done so far as a checkpoint, then end as cancelled."""
        if self.stop.watchdog is not None:
            self.stop.watchdog.cancel()
        if not (self.run_dir / "checkpoints" / f"checkpoint-{self.global_step}").is_dir():
            self.save_checkpoint()
        raise KeyboardInterrupt(f"stopped at step {self.global_step} by SIGTERM; continue with "
                                "--resume_from_checkpoint latest")

    # S* statistics (as costly as a RefLoRA step) go into every 10th event; the rest are logged at each step
    SSTAR_EVERY = 10

    def _log_step(self, loss: float, sec_per_step: float, epoch: int, ok: bool) -> None:
        stats = self.ref.stats(sstar=self.global_step % self.SSTAR_EVERY == 0 or self.global_step == self.max_steps)
        lr = self.lr_scheduler.get_last_lr()[0]
        event = {"step": self.global_step, "loss": loss, "lr": lr, "sec_per_step": sec_per_step,
                 "time": time.time(), "epoch": epoch, "refactor": stats}
        if not ok or self.skipped_steps:
            event.update(skipped=not ok, skipped_steps=self.skipped_steps)
        self.log.event(**event)
        self.log.set_status(step=self.global_step)
        if self.cfg.report_to != "none":
            self.accelerator.log({"loss": loss, "lr": lr, "balance_mean": stats["balance_mean"]},
                                 step=self.global_step)

    # ------------------------------------------------------------------ sampling
    def validate(self) -> None:
        """Validation images with fixed seeds; the training RNG streams are left untouched."""
        with self.evaluation_weights():
            self._validate()

    def _validate(self) -> None:
        if not self.is_main:
            return
        from .sample import build_pipeline, save_validation_samples

        acc = self.accelerator
        models = {k: acc.unwrap_model(m) for k, m in self.components.models.items()}
        for m in models.values():
            m.eval()
        if self.components.flow and not self.components.text_encoders:  # unloaded after caching: sample from the cached embeddings
            models.update(dict.fromkeys(self.components.family.text_encoder_names))
        with torch.random.fork_rng(devices=[] if acc.device.type == "cpu" else [acc.device]):
            pipe = build_pipeline(self.components.path, self.components.family, {**models, "vae": self.components.vae}, revision=self.cfg.revision)
            with acc.autocast():
                paths = save_validation_samples(pipe, self.cfg, self.global_step, self.run_dir, acc.device,
                                                self._cached_prompt_kwargs if self.components.flow else None)
        del pipe
        for k in self.trained:
            models[k].train()
        self.log.event(step=self.global_step, samples=paths)

    def _cached_prompt_kwargs(self, prompt: str) -> dict:
        """Pipeline arguments for one validation prompt: the prompt, or its cached embeddings once the text
        encoders are unloaded (with the empty prompt's as SD3's negative)."""
        extra = self.components.family.validation_kwargs(self.cfg)
        if self.components.text_encoders:
            return {"prompt": prompt, **extra}

        def embeds(p, prefix=""):
            return self.components.family.cached_prompt_kwargs(*self.text_cache[p], prefix)
        return {**embeds(prompt), **(embeds("", "negative_") if self.components.family.negative_prompt_cached() else {}), **extra}

    # ------------------------------------------------------------------ checkpoints
    def _save_lora_hook(self, models, weights, output_dir) -> None:
        # Save only the LoRA parameters (not the frozen base model) and stop accelerate saving full weights.
        from safetensors.torch import save_file

        names = {id(m): k for k, m in self.trained.items()}
        for model in models:
            key = names[id(self.accelerator.unwrap_model(model))]
            if self.is_main:
                path = Path(output_dir) / LORA_STATE.format(key)
                save_file(lora_state(self.accelerator.unwrap_model(model)), str(path))
        weights.clear()

    def _load_lora_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        names = {id(m): k for k, m in self.trained.items()}
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            key = names[id(model)]
            path = Path(input_dir) / LORA_STATE.format(key)
            if not path.is_file():
                raise ConfigError(f"checkpoint {str(input_dir)!r} has no {path.name}; it was made with a different "
                                  "--train_text_encoder setting")
            state = load_file(str(path), device=str(self.accelerator.device))
            expected = lora_state(model)
            wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
            if set(state) != set(expected) or wrong:
                shapes = (f" ({wrong[0]}: {tuple(state[wrong[0]].shape)} there, {tuple(expected[wrong[0]].shape)} "
                          "here)" if wrong else "")
                raise ConfigError(f"checkpoint {str(input_dir)!r} holds LoRA weights of another rank or target set "
                                  f"than this config{shapes}; resume with the same --rank / --target_modules")
            model.load_state_dict(state, strict=False)

    def save_checkpoint(self) -> Path:
        """checkpoints/checkpoint-<N>, written under a temporary name and renamed when complete.

        accelerate's ProjectConfiguration(automatic_checkpoint_naming, total_limit) would name and prune the
        folders itself, but writes straight into the final folder: a run killed mid-save would leave a
        checkpoint that `--resume_from_checkpoint latest` picks and fails on. So naming, pruning
        (--checkpoints_total_limit) and the atomic rename stay here."""
        from safetensors.torch import save_file

        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        final = root / f"checkpoint-{self.global_step}"
        tmp = root / f".checkpoint-{self.global_step}.tmp"
        try:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            if self.is_main:
                self.ref.save(tmp)
                meta = {"global_step": self.global_step, "skipped_steps": self.skipped_steps}
                save_file({"noise_rng": self.noise_gen.get_state().cpu()}, str(tmp / TRAINER_STATE),
                          metadata={k: str(v) for k, v in meta.items()})
                self.export(tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)  # at once: a half checkpoint is no use and takes the space
            if disk_full(e):
                raise TrainingError(f"no space left on the disk of {str(root)!r} while writing checkpoint-"
                                    f"{self.global_step} (removed); free space or set --checkpoints_total_limit, "
                                    "then continue with --resume_from_checkpoint latest") from None
            raise
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if self.cfg.checkpoints_total_limit:
                for old in checkpoint_dirs(self.run_dir)[:-self.cfg.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors import safe_open

        acc = self.accelerator
        get_logger(__name__).info(f"resuming from {path}")
        acc.load_state(str(path))
        try:
            self.ref.load(path)
        except (ValueError, FileNotFoundError) as e:  # e.g. a checkpoint of another --method
            raise ConfigError(f"cannot resume from {str(path)!r}: {e}") from None
        with safe_open(str(path / TRAINER_STATE), framework="pt") as f:
            meta = f.metadata()
            self.noise_gen.set_state(f.get_tensor("noise_rng"))
        self.global_step = int(meta["global_step"])
        self.skipped_steps = int(meta["skipped_steps"])
        self.log.truncate_after(self.global_step)  # drop what the interrupted run logged after this point

    # ------------------------------------------------------------------ the end
    def export(self, folder: Path) -> Path:
        """pytorch_lora_weights.safetensors (diffusers format) of the current weights into `folder`."""
        with self.evaluation_weights():
            return self._export(folder)

    def _export(self, folder: Path) -> Path:
        from reflora_diffusion.export import export_diffusers

        unwrap = self.accelerator.unwrap_model
        models = {k: unwrap(m) for k, m in self.models.items()}
        info = {"method": self.cfg.method, "base_model": self.cfg.pretrained_model_name_or_path,
                "steps": self.global_step, "rank": self.cfg.rank, "alpha": self.cfg.alpha, "family": self.components.family.name}
        # overwrite: the run folder and its checkpoints are this trainer's own output
        return export_diffusers(folder, refactorer=self.ref, info=info, overwrite=True, **models)  # (SDXL: from its UNet)

    def finish(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not (self.run_dir / "checkpoints" / f"checkpoint-{self.global_step}").is_dir():
            self.save_checkpoint()  # the state at the end, so a longer run continues from here (kohya's
            # save_state_on_train_end)
        if self.cfg.validation_prompt:
            self.validate()
        if self.is_main:
            self.export(self.run_dir)
            from reflora_diffusion.export import write_model_card

            # the run folder is ours (checked at start); the card reads what a resume changed from config.json
            write_model_card(self.run_dir, overwrite=True)
        self.log.set_status(state="done", step=self.global_step)
        acc.end_training()


def disk_full(error: BaseException) -> bool:
    """True for an error that says the disk is full (OSError ENOSPC, or safetensors' IoError text)."""
    import errno

    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def train(cfg: SDTrainConfig) -> Path:
    """Run a training job to completion; status.json says running/done/failed/cancelled throughout."""
    trainer = SDTrainer(cfg)
    with stop_on_sigterm(trainer):
        trainer.setup()
        return trainer.train()
