"""Every option of the Stable Diffusion LoRA trainer, in one dataclass.

Names follow diffusers' train_dreambooth_lora*.py / train_text_to_image_lora.py so their commands carry
over. The same names work as CLI flags (`--rank 8`) and as keys of a JSON/YAML file (`--config job.yaml`);
flags given on the command line override the file. `validate()` turns bad combinations into one-line
errors, and `save()` writes the resolved config (seed included) to the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from reflora_diffusion.core import METHODS
from reflora_diffusion.core.options import DEPRECATED, MethodOptions, rename_deprecated, rename_deprecated_keys

DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_TARGETS = ["conv1", "conv2", "conv_shortcut"]  # resnet convs of the UNet (kohya's "conv" LoRA / LoCon)
DEFAULT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class ConfigError(ValueError):
    """A user-fixable problem with the options; the message is one line naming the option and the fix."""


def _opt(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


BASE_PRECISIONS = ("no", "int8", "fp8", "nf4")


@dataclass
class SDTrainConfig(MethodOptions):
    """Every option; the core's method options (method, refactor_warmup_steps, ...) come from MethodOptions."""

    method: str = _opt("reflora-s", f"core method: {', '.join(METHODS)} (why reflora-s is the default: "
                                    "docs/refactoring_study.md)")
    refactor_warmup_steps: int | None = _opt(None, "plain LoRA optimizer steps before refactoring starts (peft starts "
                                                   "with B = 0; default: min(100, 10 % of the run))")
    # model
    pretrained_model_name_or_path: str | None = _opt(
        None, "hub id, local diffusers folder, or the offline presets 'tiny' / 'tiny-sdxl' / 'tiny-sd3' / "
              "'tiny-flux' / 'tiny-flux2' / 'tiny-zimage' / 'tiny-qwenimage' / 'tiny-emoji' (pretrained, draws "
              "emoji)")
    revision: str | None = _opt(None, "hub revision of the base model")
    variant: str | None = _opt(None, "weights variant of the base model, e.g. fp16")
    # DreamBooth data
    instance_data_dir: str | None = _opt(None, "folder of subject images (DreamBooth)")
    instance_prompt: str | None = _opt(None, "prompt for the subject images, e.g. 'a photo of sks dog'")
    class_data_dir: str | None = _opt(None, "folder of class images for prior preservation")
    class_prompt: str | None = _opt(None, "prompt for the class images, e.g. 'a photo of dog'")
    with_prior_preservation: bool = _opt(False, "add the prior-preservation loss on class images")
    prior_loss_weight: float = _opt(1.0, "weight of the prior-preservation loss")
    num_class_images: int = _opt(100, "class images wanted; missing ones are generated with the base model")
    sample_batch_size: int = _opt(4, "batch size when generating class images")
    # captioned image folder
    train_data_dir: str | None = _opt(None, "folder of images with metadata.jsonl/.csv or .txt/.caption captions, "
                                      "or of kohya '<repeats>_<caption>' subfolders (e.g. '10_sks dog')")
    image_column: str = _opt("file_name", "metadata column holding the image file name")
    caption_column: str = _opt("text", "metadata column holding the caption")
    # image processing
    resolution: int | None = _opt(None, "training resolution (square; default: the base model's native size, "
                                        "UNet sample_size x VAE scale factor: tiny 64, SD 1.5 512, SDXL 1024)")
    center_crop: bool = _opt(False, "center crop instead of random crop")
    random_flip: bool = _opt(False, "random horizontal flip")
    # aspect-ratio buckets and caption augmentation (kohya's names)
    enable_bucket: bool = _opt(False, "aspect-ratio buckets: each image trains at the bucket nearest its shape "
                                      "(area <= resolution^2)")
    min_bucket_reso: int | None = _opt(None, "smallest bucket side (default: half the resolution, e.g. 256 at 512)")
    max_bucket_reso: int | None = _opt(None, "largest bucket side (default: twice the resolution, e.g. 1024 at 512)")
    bucket_reso_steps: int | None = _opt(None, "bucket sides are multiples of this (default: 64 at >= 256 px, else "
                                               "16, rounded up to what the model's latents need)")
    bucket_no_upscale: bool = _opt(False, "images smaller than resolution^2 get a bucket of their own size "
                                          "(rounded down) instead of being enlarged")
    caption_dropout_rate: float = _opt(0.0, "probability of training an image with the empty caption")
    shuffle_caption: bool = _opt(False, "shuffle the comma-separated tags of each caption")
    keep_tokens: int = _opt(0, "with --shuffle_caption, keep the first N tags in place")
    # schedule
    train_batch_size: int = _opt(1, "batch size per device")
    max_train_steps: int | None = _opt(None, "optimizer steps; overrides num_train_epochs")
    num_train_epochs: int = _opt(1, "epochs (used when max_train_steps is not set)")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(1e-4, "learning rate")
    text_encoder_lr: float | None = _opt(None, "learning rate of text-encoder LoRA (default: learning_rate)")
    scale_lr: bool = _opt(False, "multiply lr by batch size * accumulation * processes")
    lr_scheduler: str = _opt("constant", "linear, cosine, cosine_with_restarts, polynomial, constant, "
                             "constant_with_warmup")
    lr_warmup_steps: int = _opt(0, "learning-rate warm-up steps")
    lr_num_cycles: int = _opt(1, "cycles of cosine_with_restarts")
    lr_power: float = _opt(1.0, "power of the polynomial scheduler")
    # optimizer
    optimizer: str = _opt("adamw", "adamw, adamw8bit (bitsandbytes), adafactor, prodigy (prodigyopt; lr ~1.0), "
                                    "schedulefree_adamw (schedulefree; constant lr) or any torch.optim class name")
    adam_beta1: float = _opt(0.9, "Adam beta1")
    adam_beta2: float = _opt(0.999, "Adam beta2")
    adam_epsilon: float = _opt(1e-8, "Adam epsilon")
    adam_weight_decay: float = _opt(1e-2, "weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    # LoRA
    rank: int = _opt(4, "LoRA rank r")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: rank, i.e. scaling 1)")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    target_modules: list[str] | None = _opt(None, "UNet/transformer layers to adapt (names or comma list; default "
                                              "per model: SD/SDXL to_q to_k to_v to_out.0, SD3 joint attention, "
                                              "FLUX attention + MLPs, see docs/sd.md)")
    lora_conv: bool = _opt(False, "also adapt the UNet resnet convolutions (conv1, conv2, conv_shortcut)")
    train_text_encoder: bool = _opt(False, "add LoRA to the text encoder(s) too (the CLIP ones; never T5)")
    text_encoder_target_modules: list[str] = _opt(DEFAULT_TEXT_TARGETS, "text-encoder layers to adapt")
    # speed and memory
    mixed_precision: str | None = _opt(None, "no, fp16 or bf16 (default: accelerate's config)")
    memory_preset: str | None = _opt(None, "24gb, 16gb or 12gb: gradient checkpointing, caching, bf16, 8-bit AdamW "
                                           "and a quantized base as the family needs them (sd/memory.py); options "
                                           "given on the command line are kept")
    base_model_precision: str = _opt("no", "the frozen denoiser's weights: no (the compute dtype), int8 (torchao int8 "
                                           "weight-only, CPU and GPU, with --mixed_precision bf16), fp8 (torchao "
                                           "float8 weight-only, CUDA compute capability >= 8.9), nf4 (bitsandbytes "
                                           "4-bit, CUDA); LoRA factors stay float32")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory in the UNet/text encoder")
    offload_blocks: int = _opt(0, "keep the frozen weights of the transformer's last N blocks in CPU memory and copy "
                                  "each block to the GPU only while it runs (-1: all blocks; needs "
                                  "--gradient_checkpointing; one GPU; not with a quantized base)")
    enable_xformers_memory_efficient_attention: bool = _opt(False, "use xformers attention (PyTorch SDPA "
                                                            "is the default)")
    cache_latents: bool = _opt(False, "encode images (and prompts, when the text encoder is frozen) once; "
                               "crop/flip are then drawn once; SD3/FLUX then also unload the frozen text "
                               "encoders (T5) after encoding every training and validation prompt")
    cache_dir: str | None = _opt(None, "keep the cached latents and prompt embeddings on disk in this folder, shared "
                                       "by runs and methods (keyed by base model, data, resolution and prompt: a "
                                       "change is a new entry); implies --cache_latents")
    dataloader_num_workers: int = _opt(0, "data loading worker processes")
    # loss
    snr_gamma: float | None = _opt(None, "min-SNR weighting gamma (5.0 is the paper's choice)")
    noise_offset: float = _opt(0.0, "noise offset (0.1 is common)")
    prediction_type: str | None = _opt(None, "epsilon or v_prediction (default: the scheduler's)")
    # flow matching (SD3, FLUX)
    weighting_scheme: str | None = _opt(None, "SD3/FLUX timestep density and loss weighting: logit_normal, mode, "
                                              "none (uniform), sigma_sqrt, cosmap (default: SD3 logit_normal, "
                                              "FLUX none, as diffusers' examples)")
    logit_mean: float = _opt(0.0, "mean of the logit_normal density")
    logit_std: float = _opt(1.0, "standard deviation of the logit_normal density")
    mode_scale: float = _opt(1.29, "scale of the mode density")
    guidance_scale: float = _opt(3.5, "FLUX guidance input in training and sampling (guidance-distilled models "
                                      "such as FLUX.1-dev)")
    max_sequence_length: int | None = _opt(None, "T5 tokens per prompt (default: SD3 77, FLUX 512)")
    max_bad_steps: int = _opt(10, "stop after this many consecutive steps with a NaN/inf loss")
    seed: int | None = _opt(None, "random seed (when not given one is drawn and recorded in config.json)")
    # validation
    validation_prompt: list[str] = _opt([], "prompt(s) sampled during training (fixed seeds)",
                                        aliases=["--validation_prompts"])
    num_validation_images: int = _opt(2, "images per validation prompt")
    validation_steps: int = _opt(100, "sample every N steps (and at the end)")
    validation_inference_steps: int = _opt(25, "denoising steps of validation samples")
    # held-out loss (the same for every method and run: compare runs by it)
    eval_loss_every: int = _opt(0, "every N steps (and at steps 0 and the last) log eval_loss to events.jsonl: the "
                                   "denoising loss at fixed noise and timesteps on --eval_data_dir (0: off)")
    eval_data_dir: str | None = _opt(None, "images for the eval loss, captioned like --train_data_dir (else "
                                           "--instance_prompt); default: the training images (a fit measure)")
    eval_seed: int = _opt(0, "seed of the eval loss's noise; independent of the training seed")
    eval_timesteps: int = _opt(8, "timesteps per image in the eval loss (evenly spaced quantiles)")
    eval_noises: int = _opt(4, "noise draws per image and timestep in the eval loss")
    # checkpoints and logging
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int | None = _opt(None, "keep at most this many checkpoints (>= 1; default: all)")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint folder")
    logging_steps: int = _opt(1, "write an events.jsonl line every N steps")
    report_to: str = _opt("none", "none, tensorboard, wandb, ... (accelerate trackers)")
    output_dir: str | None = _opt(None, "run folder")
    overwrite_output_dir: bool = _opt(False, "replace the run already in --output_dir (its adapter, events, "
                                             "samples and checkpoints); without it such a folder is refused")
    base_model_folder: str | None = _opt(None, "written by the trainer: the local folder the base model was "
                                               "loaded from (presets, local folders); informative only")
    changed_on_resume: list[dict] | None = _opt(None, "written by the trainer: options changed when the run was "
                                                      "resumed, [{step, option: [before, after]}]; informative only")

    # --- derived views -------------------------------------------------------------------------------
    def denoiser_targets(self, family_default: list[str] | None = None) -> list[str]:
        """--target_modules, else the model family's default (SD/SDXL: attention), plus --lora_conv's convs."""
        targets = list(self.target_modules or family_default or DEFAULT_UNET_TARGETS)
        return targets + ([m for m in CONV_TARGETS if m not in targets] if self.lora_conv else [])

    @property
    def unet_targets(self) -> list[str]:
        """SD/SDXL's UNet targets (denoiser_targets with no family default)."""
        return self.denoiser_targets()

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def __post_init__(self):
        pass  # checked by validate(), which reports ConfigError

    # --- checks --------------------------------------------------------------------------------------
    def resolve_buckets(self, multiple: int) -> None:
        """Fill in the bucket bounds the user left unset from the resolution (known once the base model is read)
        and check them: sides must be multiples of `multiple`, the model family's pixel multiple."""
        if not self.enable_bucket:
            return
        from .buckets import default_bucket_options

        for key, value in default_bucket_options(self.resolution, multiple).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        lo, hi, step = self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        if step % multiple:
            raise ConfigError(f"--bucket_reso_steps {step} does not suit this model: bucket sides must be multiples "
                              f"of {multiple} (what its latents need); use a multiple of {multiple}")
        if lo % step or hi % step:
            raise ConfigError(f"--min_bucket_reso {lo} and --max_bucket_reso {hi} must be multiples of "
                              f"--bucket_reso_steps {step}")
        if not lo <= self.resolution <= hi:
            raise ConfigError(f"--resolution {self.resolution} must lie within --min_bucket_reso {lo} and "
                              f"--max_bucket_reso {hi}")

    def validate(self) -> "SDTrainConfig":
        if self.cache_dir:
            self.cache_latents = True  # the disk cache keeps what --cache_latents computes
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is required (a hub id, a local folder, or 'tiny')")
        if not self.output_dir:
            raise ConfigError("--output_dir is required (the run folder to write)")
        if not self.instance_data_dir and not self.train_data_dir:
            raise ConfigError("no training data: give --instance_data_dir with --instance_prompt (DreamBooth) "
                              "or --train_data_dir (captioned images)")
        if self.instance_data_dir and self.train_data_dir:
            raise ConfigError("give either --instance_data_dir or --train_data_dir, not both")
        if self.instance_data_dir and not (self.instance_prompt or "").strip():
            raise ConfigError("--instance_prompt is required with --instance_data_dir, e.g. 'a photo of sks dog'")
        if self.with_prior_preservation:
            if not self.instance_data_dir:
                raise ConfigError("--with_prior_preservation needs DreamBooth data (--instance_data_dir)")
            if not self.class_data_dir:
                raise ConfigError("--with_prior_preservation needs --class_data_dir (a folder; missing class "
                                  "images are generated there)")
            if not (self.class_prompt or "").strip():
                raise ConfigError("--with_prior_preservation needs --class_prompt, e.g. 'a photo of dog'")
        for f in dataclasses.fields(self):  # nan passes every `<` / `>` check: refuse it (and inf) by name
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number (got {value})")
        if self.lora_alpha is not None and self.lora_alpha <= 0:  # scaling alpha / rank = 0: the adapter does nothing
            raise ConfigError(f"--lora_alpha must be > 0 (got {self.lora_alpha}): with alpha 0 the LoRA has no effect "
                              "and learns nothing; leave it out for alpha = rank")
        if self.snr_gamma is not None and self.snr_gamma <= 0:  # min(SNR, 0) / SNR weighs every loss by 0
            raise ConfigError(f"--snr_gamma must be > 0 (got {self.snr_gamma}): gamma 0 weighs every step's loss by 0; "
                              "leave it out to turn min-SNR weighting off")
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"--resolution must be >= 1 (got {self.resolution})")
        for name in ("eval_loss_every", "eval_seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if self.eval_data_dir and not self.eval_loss_every:
            raise ConfigError(f"--eval_data_dir {self.eval_data_dir!r} is given but the eval loss is off; add "
                              "--eval_loss_every N (e.g. 100), or leave out --eval_data_dir")
        for name in ("train_batch_size", "gradient_accumulation_steps", "rank", "num_train_epochs", "eval_timesteps",
                     "eval_noises",
                     "checkpointing_steps", "logging_steps", "validation_steps", "max_bad_steps",
                     "num_validation_images", "validation_inference_steps", "sample_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be >= 1 (got {self.max_train_steps})")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"--checkpoints_total_limit must be >= 1 (got {self.checkpoints_total_limit}); leave it "
                              "out to keep every checkpoint")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32) (got {self.seed})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1) (got {getattr(self, name)}); 0.9 / 0.999 are usual")
        for name in ("adam_epsilon", "adam_weight_decay", "max_grad_norm", "noise_offset", "prior_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8 (got {self.resolution})")
        if self.enable_bucket and self.with_prior_preservation:
            raise ConfigError("--enable_bucket does not work with --with_prior_preservation yet; drop one")
        for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.caption_dropout_rate <= 1:
            raise ConfigError(f"--caption_dropout_rate must be in [0, 1] (got {self.caption_dropout_rate})")
        if self.keep_tokens < 0:
            raise ConfigError(f"--keep_tokens must be >= 0 (got {self.keep_tokens})")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0 (got {self.learning_rate})")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"--mixed_precision must be no, fp16 or bf16 (got {self.mixed_precision!r})")
        if self.memory_preset not in (None, "24gb", "16gb", "12gb"):
            raise ConfigError(f"--memory_preset must be 24gb, 16gb or 12gb (got {self.memory_preset!r})")
        if self.base_model_precision not in BASE_PRECISIONS:
            raise ConfigError(f"--base_model_precision must be one of {', '.join(BASE_PRECISIONS)} "
                              f"(got {self.base_model_precision!r})")
        if self.offload_blocks < -1:
            raise ConfigError(f"--offload_blocks must be a block count, or -1 for all (got {self.offload_blocks})")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ConfigError(f"--prediction_type must be epsilon or v_prediction (got {self.prediction_type!r})")
        if self.lr_warmup_steps < 0:
            raise ConfigError("--lr_warmup_steps must be >= 0")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("--target_modules is empty; leave it out for the model's default (SD: to_q to_k to_v "
                              "to_out.0)")
        from .flow import WEIGHTING_SCHEMES

        if self.weighting_scheme not in (None, *WEIGHTING_SCHEMES):
            raise ConfigError(f"--weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)} "
                              f"(got {self.weighting_scheme!r})")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ConfigError(f"--max_sequence_length must be >= 1 (got {self.max_sequence_length})")
        if self.report_to not in ("none", "all"):
            import importlib.util

            modules = {"tensorboard": ("tensorboard", "tensorboardX")}.get(self.report_to, (self.report_to,))
            if not any(importlib.util.find_spec(m) for m in modules):
                raise ConfigError(f"--report_to {self.report_to} needs the {modules[0]} package: pip install "
                                  f"{modules[0]}, or use --report_to none (events.jsonl is always written)")
        from diffusers.optimization import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.lr_scheduler not in names:
            raise ConfigError(f"--lr_scheduler {self.lr_scheduler!r} is unknown; use one of {', '.join(names)}")
        try:
            self.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    # --- I/O -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config atomically (the run folder's config.json)."""
        from reflora_diffusion.rundir import write_json_atomic

        write_json_atomic(path, self.to_dict())


# --- parsing ----------------------------------------------------------------------------------------------
FIELDS = {f.name: f for f in dataclasses.fields(SDTrainConfig)}
_HINTS = typing.get_type_hints(SDTrainConfig)


def _base_type(name: str):
    """(scalar type, is_list) of a field, with Optional stripped."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    if typing.get_origin(hint) is list:
        return str, True
    return hint, False


def _coerce(name: str, value):
    """Bring a value from a file or flag to the field's type; one-line error when it cannot be."""
    typ, is_list = _base_type(name)
    if value is None:
        return None
    if name == "changed_on_resume":  # the trainer's own record, kept as written
        if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise ConfigError(f"option {name!r} is written by the trainer (a list of mappings); remove it")
        return value
    if is_list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or any(isinstance(v, (list, tuple, dict)) for v in items):
            raise ConfigError(f"option {name!r} expects a list of strings, got {value!r}")
        if name.endswith("target_modules"):  # "to_q,to_k" as one string is common
            items = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
        return [str(v) for v in items]
    expects = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, typ.__name__)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise ValueError
        if name == "mixed_precision" and value is False:  # YAML reads `mixed_precision: no` as false
            return "no"
        if isinstance(value, (bool, list, tuple, dict)):  # YAML's yes/true is no number, [a, b] no string
            raise ValueError
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if typ is str and not isinstance(value, str):
            if not isinstance(value, (int, float)):
                raise ValueError
        return typ(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"option {name!r} expects {expects}, got {value!r}") from None


def build_parser():
    """transformers' HfArgumentParser over the dataclass (the LLM entry points use it too), plus --config."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # one line, exit code 2 from the CLI, instead of usage + SystemExit
            raise ConfigError(f"{message}; see `python train/sd.py --help`")

    parser = Parser(SDTrainConfig, description="LoRA / RefLoRA training for Stable Diffusion, SDXL, SD3.5 and FLUX.1 "
                                               "(reflora_diffusion.sd)")
    parser.add_argument("--config", help="JSON or YAML file with the same option names; flags override it")
    for action in parser._actions:  # argparse formats help with %: a literal "10 %" would break --help
        if action.help and "%" in action.help:
            action.help = action.help.replace("%", "%%")
    return parser


def load_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; give a JSON or YAML file") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return data


# Old names of the SD trainer's method flags (before the core declared them once), accepted with a warning.
RENAMED = {**DEPRECATED, "warmup_steps": "refactor_warmup_steps", "interval": "refactor_interval"}


def make_config(values: dict) -> SDTrainConfig:
    """Config from a dict of option names (file, app form, ...); unknown names are an error."""
    values = rename_deprecated_keys(values, RENAMED)
    if "validation_prompts" in values:  # plural spelling accepted too
        values["validation_prompt"] = values.pop("validation_prompts")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{unknown_flag(unknown[0], FIELDS)}; see `python train/sd.py --help`")
    return SDTrainConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def parse_args(argv: list[str] | None = None) -> SDTrainConfig:
    """CLI flags (+ optional --config file, whose values the flags override) -> validated config."""
    argv = rename_deprecated(list(sys.argv[1:] if argv is None else argv), RENAMED)
    argv = [f"--{a[5:]}=false" if a.startswith("--no-") else a for a in argv]  # --no-flag (older spelling)
    parser = build_parser()
    path = vars(parser.parse_known_args(argv)[0]).get("config")
    values = rename_deprecated_keys(load_config_file(path), RENAMED) if path else {}
    if "validation_prompts" in values:
        values["validation_prompt"] = values.pop("validation_prompts")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{unknown_flag(unknown[0], FIELDS)} in {path}; see `python train/sd.py --help`")
    parser.set_defaults(**values)  # the file's values, overridden by the flags given
    parsed = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    cfg, unused = parsed[0], parsed[-1]  # (the --config namespace between them)
    unknown = [a for a in unused if a.startswith("-")]
    if unknown or unused:
        flag = (unknown or unused)[0]
        raise ConfigError(f"{unknown_flag(flag, FIELDS)}; see `python train/sd.py --help`" if unknown else
                          f"unexpected argument {flag!r} (values follow their flag, e.g. --rank 8); see "
                          "`python train/sd.py --help`")
    return make_config(dataclasses.asdict(cfg))


def unknown_flag(flag: str, names) -> str:
    """'unknown option --learnig_rate (did you mean --learning_rate?)': one line, with the closest valid name."""
    import difflib

    name = flag.lstrip("-").split("=")[0]
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f"unknown option --{name}" + (f" (did you mean --{close[0]}?)" if close else "")
