"""Export from a run folder or checkpoint (the trainer's diffusers file) and write the model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

from reflora_diffusion.presets import PRESETS

from .diffusers_format import write_diffusers
from .factors import WEIGHT_NAME, ExportError, LoraFactors, read_diffusers
from .files import write_text
from .kohya import write_kohya

FORMATS = ("diffusers", "kohya")


def _locate(source: Path) -> tuple[Path, Path | None]:
    """(the diffusers weight file, the run folder holding config.json or None) for a run/checkpoint/file."""
    if not source.exists():
        raise ExportError(f"{source} does not exist; give a run folder, one of its checkpoints/checkpoint-N "
                          f"folders or a {WEIGHT_NAME} file.")
    weights = source if source.is_file() else source / WEIGHT_NAME
    if not weights.is_file():
        raise ExportError(f"{source} holds no {WEIGHT_NAME}; give a finished run folder or one of its "
                          "checkpoints/checkpoint-N folders.")
    for folder in (weights.parent, weights.parent.parent.parent):  # run/ or run/checkpoints/checkpoint-N/
        if (folder / "config.json").is_file():
            return weights, folder
    return weights, None


def _run_info(weights: Path, run_dir: Path | None) -> dict:
    """method, base_model, steps, prompt: from the run's config/status and the checkpoint's name."""
    info = {}
    if run_dir is not None:
        config = json.loads((run_dir / "config.json").read_text())
        info = {"method": config.get("method"), "base_model": config.get("pretrained_model_name_or_path"),
                "steps": config.get("max_train_steps"), "prompt": config.get("instance_prompt"),
                "train_text_encoder": config.get("train_text_encoder")}
        status = run_dir / "status.json"
        if status.is_file():
            info["steps"] = json.loads(status.read_text()).get("step", info["steps"])
    m = re.fullmatch(r"checkpoint-(\d+)", weights.parent.name)
    if m:
        info["steps"] = int(m[1])
    if run_dir is not None:  # the options a resume changed, up to the exported step
        info["changed_on_resume"] = [c for c in config.get("changed_on_resume") or []
                                     if c.get("step", 0) < info.get("steps", float("inf"))] or None
    return {k: v for k, v in info.items() if v is not None}


def _unet_blocks(base_model: str | None) -> dict | None:
    """The base UNet's layout (kohya's SDXL naming needs it) from its config, when the file lacks it."""
    if not base_model:
        return None
    from reflora_diffusion.presets import resolve_pretrained

    folder = Path(resolve_pretrained(base_model))
    try:
        if folder.is_dir():
            cfg = folder / "unet" / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            cfg = Path(hf_hub_download(base_model, "unet/config.json"))
        config = json.loads(cfg.read_text())
    except Exception:
        return None
    return {"layers_per_block": config["layers_per_block"], "up_block_types": config["up_block_types"]}


def load_run(source: str | Path) -> tuple[LoraFactors, Path, Path | None]:
    """Factors of a run/checkpoint with its info filled in; also the weight file and the run folder."""
    weights, run_dir = _locate(Path(source))
    factors = read_diffusers(weights)
    for key, value in _run_info(weights, run_dir).items():
        factors.info.setdefault(key, value)  # what the trainer wrote into the file is exact; fill gaps only
    base = factors.info.get("base_model")
    if "transformer" in factors.layers and "family" not in factors.info and base:
        from reflora_diffusion.presets import model_family

        factors.info["family"] = model_family(base)  # SD3 or FLUX: the base model tells
    elif "sdxl" not in factors.info and "text_encoder_2" not in factors.layers and base:
        from reflora_diffusion.presets import is_sdxl

        factors.sdxl = is_sdxl(base)  # a UNet-only file from elsewhere: the base model tells
    if factors.sdxl and "unet_blocks" not in factors.info:
        blocks = _unet_blocks(factors.info.get("base_model"))
        if blocks:
            factors.info["unet_blocks"] = blocks
    return factors, weights, run_dir


def export_run(source: str | Path, format: str = "diffusers", output: str | Path | None = None,
               overwrite: bool = False, name: str | None = None) -> Path:
    """Export a run or checkpoint folder's adapter; returns the written weight file.

    diffusers: <output>/pytorch_lora_weights.safetensors, with the model card README.md. kohya:
    <output>/<name>.safetensors, name defaulting to the run folder's name (A1111 shows it as <lora:name:1>),
    with the model card <name>.md (card_path): kohya files of many runs share one folder (A1111's
    models/Lora), so each keeps its own card. output defaults to the source folder.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of: {', '.join(FORMATS)}.")
    factors, weights, run_dir = load_run(source)
    output = Path(output) if output is not None else weights.parent
    if output.suffix == ".safetensors":
        raise ExportError(f"--output {output} should be a folder, not a file name; use --name for the file name.")
    name = name or (run_dir or weights.parent).resolve().name
    kohya_file = output / f"{name}.safetensors" if format == "kohya" else None
    _refuse_foreign_card(card_path(output, kohya_file), overwrite)  # before anything is written
    if format == "diffusers":
        path = write_diffusers(factors, output, overwrite=overwrite)
    else:
        path = write_kohya(factors, kohya_file, overwrite=overwrite)
    write_model_card(output, factors=factors, kohya_file=kohya_file, overwrite=overwrite)
    return path


CARD_MARK = "(reflora-diffusion) |"  # a line of every model card this exporter writes


def card_path(folder: str | Path, kohya_file: str | Path | None = None) -> Path:
    """Where the model card of an export goes: README.md (diffusers), <kohya file name>.md (kohya)."""
    return Path(folder) / (f"{Path(kohya_file).stem}.md" if kohya_file else "README.md")


def _refuse_foreign_card(existing: Path, overwrite: bool) -> None:
    if not overwrite and existing.is_file() and CARD_MARK not in existing.read_text(errors="replace"):
        raise ExportError(f"{existing} exists and is not a model card written by this exporter; pass --overwrite "
                          "to replace it, or choose another --output folder (or --name for a kohya file)")


def write_model_card(run_dir: str | Path, factors: LoraFactors | None = None, kohya_file: str | Path | None = None,
                     info: dict | None = None, overwrite: bool = False) -> Path:
    """Write the model card (run_dir/README.md; <kohya file name>.md beside a kohya file): base model, method,
    rank, alpha, steps, how to load (diffusers, A1111, ComfyUI).

    factors default to the folder's own diffusers file with its run info; info overrides single fields.
    A card this exporter did not write (e.g. a project's own README.md, with --output .) is never replaced
    unless overwrite.
    """
    run_dir = Path(run_dir)
    target = card_path(run_dir, kohya_file)
    _refuse_foreign_card(target, overwrite)
    if factors is None:
        factors = load_run(run_dir)[0]
    info = {**factors.info, **(info or {})}
    base = info.get("base_model") or "<base model>"
    method = info.get("method") or "lora"
    rank, alpha = factors.common("rank"), factors.common("alpha")
    parts = ", ".join(f"{c} ({len(layers)} layers)" for c, layers in factors.layers.items())
    from reflora_diffusion import families

    family = families.get(factors.family)
    pipeline = family.pipeline
    flows = family.flow
    prompt = info.get("prompt") or "a photo of sks dog"
    kohya = Path(kohya_file).name if kohya_file else None
    lora_name = Path(kohya).stem if kohya else run_dir.resolve().name
    rank_note = (" (a chain of LoRA links exported as one LoRA of the summed rank)"
                 if method in ("rac-lora", "cola") else "")
    if base in PRESETS:  # the built-in offline presets are built locally, not on the hub
        load = "from reflora_diffusion.presets import resolve_pretrained\n"
        base_arg = f'resolve_pretrained("{base}")'
    else:
        load, base_arg = "", json.dumps(base)
    tags = ["lora", "diffusers", "reflora", "text-to-image", family.hub_tag]
    if not family.kohya and not family.comfyui_reads_diffusers:
        others = f"""## Other tools

No kohya / ComfyUI layout is written for {family.label} LoRA files yet: `{WEIGHT_NAME}` is diffusers' format.
"""
    elif not family.kohya:  # no kohya layout (SD3): ComfyUI reads the diffusers file
        others = f"""## ComfyUI

Copy `{WEIGHT_NAME}` into `models/loras/` and use a "Load LoRA" node: ComfyUI reads diffusers-format
{family.label} LoRA files as they are. (The kohya export covers SD 1.x, SDXL, FLUX, Z-Image and Qwen-Image.)
"""
    elif family.original_layout:
        others = f"""## Other tools

{f"`{kohya}` in this folder is" if kohya else "`python -m reflora_diffusion.export <this folder> --format kohya --output <folder>` writes"}
the same LoRA in the layout of LoRAs made for the original {family.label} checkpoint (`diffusion_model.<module>`
with lora_down / lora_up / alpha), which diffusers' loader reads too.
"""
    elif flows:
        others = f"""## ComfyUI / Forge

Copy `{kohya or WEIGHT_NAME}` into `models/loras/` and use a "Load LoRA" node: ComfyUI reads diffusers-format
FLUX LoRA files as they are{f", and `{kohya}` is the same LoRA in kohya sd-scripts' FLUX layout (Forge reads it too)"
if kohya else ""}. For the kohya layout: `python -m reflora_diffusion.export <this folder> --format kohya --output <folder>`.
"""
    else:
        others = f"""## AUTOMATIC1111 / ComfyUI (kohya format)

{f"`{kohya}` in this folder is the kohya-format file." if kohya else
 "Convert first: `python -m reflora_diffusion.export <this folder> --format kohya --output <folder>`."}
Copy it into `models/Lora/`, then use `<lora:{lora_name}:1>` in an A1111 prompt, or a
"Load LoRA" node in ComfyUI.
"""
    card = f"""---
base_model: {base}
library_name: diffusers
tags: [{", ".join(tags)}]
instance_prompt: {json.dumps(prompt)}
---

# LoRA for {base}, trained with {method}

| | |
|---|---|
| base model | `{base}` |
| method | `{method}` (reflora-diffusion) |
| rank | {rank}{rank_note} |
| alpha | {alpha:g} (scale alpha / rank = {alpha / rank:g}) |
| steps | {info.get("steps", "?")} |
| adapted | {parts} |
| prompt | `{prompt}` |

## diffusers

```python
from diffusers import {pipeline}
{load}
pipe = {pipeline}.from_pretrained({base_arg})
pipe.load_lora_weights("<this folder>")   # reads {WEIGHT_NAME}, rank and alpha included
image = pipe("{prompt}").images[0]
```

{others}{_resume_section(info.get("changed_on_resume"))}"""
    return write_text(card, target)


def _resume_section(changes: list[dict] | None) -> str:
    """The card's account of options changed when the run was resumed (the trainer's config.json record)."""
    if not changes:
        return ""
    lines = [f"- from step {c['step']}: " + "; ".join(f"`{k}` {json.dumps(v[0])} -> {json.dumps(v[1])}"
                                                      for k, v in c.items() if k != "step") for c in changes]
    return "\n## Resumed with changed options\n\nThe run was continued with other options; the table above shows " \
           "the last ones.\n\n" + "\n".join(lines) + "\n"
