"""Every option of the Stable Diffusion LoRA trainer, in one dataclass.

Names follow diffusers' train_dreambooth_lora*.py / train_text_to_image_lora.py so their commands carry
over. The same names work as CLI flags (`--rank 8`) and as keys of a JSON/YAML file (`--config job.yaml`);
flags given on the command line override the file. `validate()` turns bad combinations into one-line
errors, and `save()` writes the resolved config (seed included) to the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_TARGETS = ["conv1", "conv2", "conv_shortcut"]  # resnet convs of the UNet (kohya's "conv" LoRA / LoCon)
DEFAULT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class ConfigError(ValueError):
    """A user-fixable problem with the options; the message is one line naming the option and the fix."""


def _opt(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SDTrainConfig:
    # model
    pretrained_model_name_or_path: str | None = _opt(
        None, "hub id, local diffusers folder, or the offline presets 'tiny' / 'tiny-sdxl' / 'tiny-emoji'")
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
    train_data_dir: str | None = _opt(None, "folder of images with metadata.jsonl/.csv or .txt captions")
    image_column: str = _opt("file_name", "metadata column holding the image file name")
    caption_column: str = _opt("text", "metadata column holding the caption")
    # image processing
    resolution: int = _opt(512, "training resolution (square)")
    center_crop: bool = _opt(False, "center crop instead of random crop")
    random_flip: bool = _opt(False, "random horizontal flip")
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
    optimizer: str = _opt("adamw", "adamw, adamw8bit (bitsandbytes) or any torch.optim class name")
    adam_beta1: float = _opt(0.9, "Adam beta1")
    adam_beta2: float = _opt(0.999, "Adam beta2")
    adam_epsilon: float = _opt(1e-8, "Adam epsilon")
    adam_weight_decay: float = _opt(1e-2, "weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    # LoRA
    rank: int = _opt(4, "LoRA rank r")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: rank, i.e. scaling 1)")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    target_modules: list[str] = _opt(DEFAULT_UNET_TARGETS, "UNet layers to adapt (names or comma list)")
    lora_conv: bool = _opt(False, "also adapt the UNet resnet convolutions (conv1, conv2, conv_shortcut)")
    train_text_encoder: bool = _opt(False, "add LoRA to the text encoder(s) too")
    text_encoder_target_modules: list[str] = _opt(DEFAULT_TEXT_TARGETS, "text-encoder layers to adapt")
    # method (reflora_diffusion.core)
    method: str = _opt("lora", "any name in reflora_diffusion.core.METHODS")
    warmup_steps: int = _opt(100, "plain-LoRA steps before refactoring starts (RefLoRA warm-up)")
    interval: int = _opt(1, "refactor every N optimizer steps")
    ratio: float | None = _opt(None, "lora+: lr(B) / lr(A)")
    delta: float | None = _opt(None, "preclora / nora+: damping")
    chain_every: int | None = _opt(None, "rac-lora / cola: steps per chain link")
    p: float | None = _opt(None, "rac-lora: probability of freezing A in a link")
    normalize: bool = _opt(False, "reflora: unit-determinant S* (steadier with Adam right after the warm-up)")
    reinit: bool = _opt(False, "random full-rank A, B with the base weight compensated: refactor from step 0 "
                               "(the export then has rank 2r)")
    # speed and memory
    mixed_precision: str | None = _opt(None, "no, fp16 or bf16 (default: accelerate's config)")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory in the UNet/text encoder")
    enable_xformers_memory_efficient_attention: bool = _opt(False, "use xformers attention (PyTorch SDPA "
                                                            "is the default)")
    cache_latents: bool = _opt(False, "encode images (and prompts, when the text encoder is frozen) once; "
                               "crop/flip are then drawn once")
    dataloader_num_workers: int = _opt(0, "data loading worker processes")
    # loss
    snr_gamma: float | None = _opt(None, "min-SNR weighting gamma (5.0 is the paper's choice)")
    noise_offset: float = _opt(0.0, "noise offset (0.1 is common)")
    prediction_type: str | None = _opt(None, "epsilon or v_prediction (default: the scheduler's)")
    max_bad_steps: int = _opt(10, "stop after this many consecutive steps with a NaN/inf loss")
    seed: int | None = _opt(None, "random seed (when not given one is drawn and recorded in config.json)")
    # validation
    validation_prompt: list[str] = _opt([], "prompt(s) sampled during training (fixed seeds)")
    num_validation_images: int = _opt(2, "images per validation prompt")
    validation_steps: int = _opt(100, "sample every N steps (and at the end)")
    validation_inference_steps: int = _opt(25, "denoising steps of validation samples")
    # checkpoints and logging
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int | None = _opt(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint folder")
    logging_steps: int = _opt(1, "write an events.jsonl line every N steps")
    report_to: str = _opt("none", "none, tensorboard, wandb, ... (accelerate trackers)")
    output_dir: str | None = _opt(None, "run folder")

    # --- derived views -------------------------------------------------------------------------------
    @property
    def unet_targets(self) -> list[str]:
        extra = [m for m in CONV_TARGETS if m not in self.target_modules] if self.lora_conv else []
        return list(self.target_modules) + extra

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def method_options(self) -> dict:
        """Keyword options for reflora_diffusion.core.Refactorer (only the ones set)."""
        opts = {"warmup_steps": self.warmup_steps, "interval": self.interval}
        for name in ("ratio", "delta", "chain_every", "p"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        if self.normalize:
            opts["normalize"] = True
        if self.reinit:
            opts["reinit"] = True
        return opts

    # --- checks --------------------------------------------------------------------------------------
    def validate(self) -> "SDTrainConfig":
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
        for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "rank", "num_train_epochs",
                     "checkpointing_steps", "logging_steps", "validation_steps", "interval", "max_bad_steps",
                     "num_validation_images", "validation_inference_steps", "sample_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be >= 1 (got {self.max_train_steps})")
        if self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8 (got {self.resolution})")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0 (got {self.learning_rate})")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"--mixed_precision must be no, fp16 or bf16 (got {self.mixed_precision!r})")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ConfigError(f"--prediction_type must be epsilon or v_prediction (got {self.prediction_type!r})")
        if self.warmup_steps < 0 or self.lr_warmup_steps < 0:
            raise ConfigError("--warmup_steps and --lr_warmup_steps must be >= 0")
        if not self.target_modules:
            raise ConfigError("--target_modules is empty; the default is to_q to_k to_v to_out.0")
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
        from reflora_diffusion.core import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        return self

    # --- I/O -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config atomically (the run folder's config.json)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)


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
    if is_list:
        items = [value] if isinstance(value, str) else list(value)
        if name.endswith("target_modules"):  # "to_q,to_k" as one string is common
            items = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
        return [str(v) for v in items]
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} expects {typ.__name__}, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LoRA / RefLoRA training for Stable Diffusion and SDXL (reflora_diffusion.sd)",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config file
    )
    parser.add_argument("--config", help="JSON or YAML file with the same option names; flags override it")
    for name, f in FIELDS.items():
        typ, is_list = _base_type(name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f"{f.metadata['help']} (default: {default})"
        if typ is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help)
        elif is_list:
            aliases = ["--validation_prompts"] if name == "validation_prompt" else []
            parser.add_argument(f"--{name}", *aliases, dest=name, nargs="+", help=help)
        else:
            parser.add_argument(f"--{name}", type=str, help=help)  # coerced below, with our own error text
    return parser


def load_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
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


def make_config(values: dict) -> SDTrainConfig:
    """Config from a dict of option names (file, app form, ...); unknown names are an error."""
    values = dict(values)
    if "validation_prompts" in values:  # plural spelling accepted too
        values["validation_prompt"] = values.pop("validation_prompts")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see `python train/sd.py --help`")
    return SDTrainConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def parse_args(argv: list[str] | None = None) -> SDTrainConfig:
    """CLI flags (+ optional --config file) -> validated config."""
    cli = vars(build_parser().parse_args(argv))
    values = load_config_file(cli.pop("config")) if "config" in cli else {}
    values.update(cli)
    return make_config(values)
