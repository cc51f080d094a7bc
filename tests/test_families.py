"""Model families: one object per family, found from a pipeline's model_index.json, and the only place the
trainer learns what differs between SD, SDXL, SD3 and FLUX."""

import json
import re
from pathlib import Path

import diffusers
import pytest

from reflora_diffusion import families
from reflora_diffusion.presets import PRESETS, native_resolution, pixel_multiple, resolve_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_found_by_name_and_by_its_folder(preset):
    folder = resolve_pretrained(preset)
    fam = families.family_of(preset)
    assert families.family_of(folder) is fam and preset in fam.presets
    index = json.loads(Path(folder, "model_index.json").read_text())
    assert index["_class_name"] == fam.pipeline and index[fam.denoiser_folder][1] == fam.denoiser_class
    assert sum(k.startswith("text_encoder") for k in index) == fam.n_text_encoders
    # the size and pixel multiple come from the family's reading of the configs
    assert native_resolution(folder) % pixel_multiple(folder) == 0


def test_families_name_real_diffusers_classes_and_consistent_facts():
    for fam in families.FAMILIES.values():
        assert hasattr(diffusers, fam.pipeline) and hasattr(diffusers, fam.denoiser_class)
        assert 0 <= fam.lora_text_encoders <= fam.n_text_encoders
        assert fam.flow == (fam.default_weighting is not None) == (fam.default_max_sequence_length is not None)
        assert families.get(fam.name) is fam
    with pytest.raises(ValueError, match="unknown model family 'sd4'"):
        families.get("sd4")


@pytest.mark.parametrize("hub_id,name", [("black-forest-labs/FLUX.1-dev", "flux"), ("Tongyi-MAI/Z-Image-Turbo", "zimage"),
                                         ("black-forest-labs/FLUX.2-klein-4B", "flux2"), ("Qwen/Qwen-Image", "qwenimage"),
                                         ("stabilityai/stable-diffusion-3.5-medium", "sd3"),
                                         ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
                                         ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd")])
def test_hub_ids_are_guessed_offline_when_their_index_cannot_be_read(monkeypatch, hub_id, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert families.family_of(hub_id).name == name


def test_the_trainer_has_no_family_branches():
    """What differs per family lives in reflora_diffusion/families: the training loop asks the family object."""
    source = (ROOT / "reflora_diffusion" / "sd" / "train.py").read_text()
    branches = re.findall(r'family\s*(?:==|!=|in)\s|"(?:sd|sdxl|sd3|flux)"|\.sdxl\b(?!\s*=)', source)
    assert not branches, branches
