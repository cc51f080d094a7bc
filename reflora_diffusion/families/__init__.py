"""Model families: one object per family (SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2 [klein], Z-Image,
Qwen-Image) that declares its facts.

    fam = family_of(folder_or_hub_id)     # from model_index.json
    fam = get("flux")                     # by name (exports record it)

Adding a family is one module with a ``Family`` subclass listed in ``FAMILIES`` (and an offline preset in
presets.py); the trainer, the presets, the exporters and the app read families from here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import TEXT_ENCODERS, Family
from .flux import Flux
from .flux2 import Flux2Klein
from .qwenimage import QwenImage
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL
from .zimage import ZImage

# detection order: the most specific first, SD (any other UNet pipeline) last
FAMILIES: dict[str, Family] = {f.name: f for f in (Flux2Klein(), Flux(), SD3(), ZImage(), QwenImage(), SDXL(), SD())}
PRESET_FAMILIES = {preset: f for f in FAMILIES.values() for preset in f.presets}

__all__ = ["FAMILIES", "Family", "TEXT_ENCODERS", "family_of", "get"]


def get(name: str) -> Family:
    """The family called ``name`` ("sd", "sdxl", "sd3", "flux")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(folder_or_id: str) -> Family:
    """The family of a preset name, local pipeline folder or hub id (its model_index.json)."""
    name = str(folder_or_id)
    if name in PRESET_FAMILIES:
        return PRESET_FAMILIES[name]
    index = Path(name) / "model_index.json"
    if not index.is_file():
        try:  # hub id: read its model_index.json (cached or downloaded; fails offline if never fetched)
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(name, "model_index.json"))
        except Exception:
            return next(f for f in FAMILIES.values() if f.matches_name(name) or f.name == "sd")
    info = json.loads(index.read_text())
    return next(f for f in FAMILIES.values() if f.matches(info))
