"""--cache_dir: latents and prompt embeddings on disk, shared by runs and methods. A second run reads every entry
(nothing encoded) and trains exactly as an uncached run; a change of data, resolution or base is a new entry."""

import pytest
import torch
from PIL import Image

from reflora_diffusion.rundir import read_events

from sd_helpers import DOG, train


def losses(run):
    return [e["loss"] for e in read_events(run) if "loss" in e]


@pytest.mark.parametrize("preset", ["tiny", "tiny-flux"])
def test_second_run_reads_the_cache_and_trains_like_an_uncached_run(tmp_path, monkeypatch, preset):
    opts = dict(pretrained_model_name_or_path=preset, validation_prompt=[], max_sequence_length=32)
    if preset == "tiny":
        opts.pop("max_sequence_length")
    cache = tmp_path / "cache"
    plain = train(tmp_path / "plain", method="lora", cache_latents=True, **opts)
    first = train(tmp_path / "first", method="lora", cache_dir=str(cache), **opts)
    assert first.disk_cache.hits == 0 and first.disk_cache.misses > 0
    written = sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors"))
    assert {p.parts[0] for p in written} == {"latents", "text"}

    encoded = []
    from reflora_diffusion import families

    fam_cls = type(families.family_of(preset))
    real_images, real_text = fam_cls.encode_images, fam_cls.encode_text
    monkeypatch.setattr(fam_cls, "encode_images", lambda *a: encoded.append("image") or real_images(*a))
    monkeypatch.setattr(fam_cls, "encode_text", lambda *a: encoded.append("text") or real_text(*a))
    second = train(tmp_path / "second", method="reflora", cache_dir=str(cache), **opts)  # another method: same data
    assert second.disk_cache.misses == 0 and second.disk_cache.hits == len(written) and encoded == []
    assert sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors")) == written
    again = train(tmp_path / "again", method="lora", cache_dir=str(cache), **opts)
    assert losses(tmp_path / "again") == losses(tmp_path / "first") == losses(tmp_path / "plain")  # disk = computed
    for a, b in zip(first.latent_cache.values(), again.latent_cache.values()):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert plain.disk_cache is None


def test_changed_data_or_resolution_is_a_new_entry(tmp_path):
    cache = tmp_path / "cache"
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(DOG.glob("*.jpg"))[:2]:
        Image.open(p).save(data / p.name)
    opts = dict(instance_data_dir=str(data), validation_prompt=[], cache_dir=str(cache), max_train_steps=1)
    train(tmp_path / "a", **opts)
    n = len(list((cache / "latents").glob("*.safetensors")))
    img = Image.open(next(data.glob("*.jpg")))
    img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(next(data.glob("*.jpg")))  # one photo edited in place
    edited = train(tmp_path / "b", **opts)
    assert edited.disk_cache.misses == 1 and len(list((cache / "latents").glob("*.safetensors"))) == n + 1
    resized = train(tmp_path / "c", **{**opts, "resolution": 32})
    assert resized.disk_cache.hits == 1  # the prompt's entry; every image at 32 px is new
