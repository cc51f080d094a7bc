"""--memory_preset 24gb | 16gb | 12gb: the memory options of the leading trainers, set for the chosen family.

A preset only fills in what the command line left at its default (an explicit --optimizer sgd stays sgd), and the
trainer says in one line what it set. The rungs, each adding to the one above:
- 24gb: gradient checkpointing, cached latents (and, for the text-encoder-heavy flow families, cached prompts with
  the text encoders unloaded), bf16 mixed precision; the large transformers (FLUX.1/2, SD3, Z-Image, Qwen-Image)
  with an int8 base (torchao);
- 16gb: 8-bit AdamW (bitsandbytes); the large transformers with an nf4 base (bitsandbytes) instead;
- 12gb: batch size 1, and SDXL's UNet with an int8 base too.
These are starting points from the weights' sizes (FLUX.1-dev's transformer is 24 GB in bf16, 12 GB in int8, ~7 GB
in nf4), not measured peaks: benchmarks/gpu.py measures them when a GPU is lent (docs/gpu.md).
"""

from __future__ import annotations

PRESETS = ("24gb", "16gb", "12gb")
LARGE = ("flux", "flux2", "sd3", "zimage", "qwenimage")  # transformers whose bf16 weights alone crowd a 24 GB card


def preset_options(preset: str, family: str) -> dict:
    """The options a preset sets for a family (before the command line's own values are kept)."""
    rung = PRESETS.index(preset)
    opts = {"gradient_checkpointing": True, "cache_latents": True, "mixed_precision": "bf16"}
    if family in LARGE:
        opts["base_model_precision"] = "int8" if rung == 0 else "nf4"
    if rung >= 1:
        opts["optimizer"] = "adamw8bit"
    if rung >= 2:
        opts["train_batch_size"] = 1
        if family == "sdxl":
            opts["base_model_precision"] = "int8"
    return opts


def apply_memory_preset(cfg, family: str) -> str | None:
    """Set the preset's options that ``cfg`` left at their defaults; the one line that says what was set."""
    import dataclasses

    if not cfg.memory_preset:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    changed = []
    for key, value in preset_options(cfg.memory_preset, family).items():
        if getattr(cfg, key) == defaults.get(key) and getattr(cfg, key) != value:
            setattr(cfg, key, value)
            changed.append(f"--{key} {str(value).lower() if isinstance(value, bool) else value}")
    kept = "" if changed else " (every option it sets was given on the command line)"
    return f"--memory_preset {cfg.memory_preset} for {family}: set {', '.join(changed) or 'nothing'}{kept}"
