"""The offline presets are real diffusers pipelines: they load through from_pretrained and make images."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from reflora_diffusion.presets import PRESET_RESOLUTION, is_sdxl, make_tokenizer, resolve_pretrained

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflora_cache")
    old = os.environ.get("REFLORA_CACHE")
    os.environ["REFLORA_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("REFLORA_CACHE")
    else:
        os.environ["REFLORA_CACHE"] = old


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_preset_loads_and_generates(cache, name):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = resolve_pretrained(name)
    assert folder.startswith(str(cache)) and resolve_pretrained(name) == folder  # built once, then reused
    index = json.load(open(os.path.join(folder, "model_index.json")))
    cls = StableDiffusionXLPipeline if name == "tiny-sdxl" else StableDiffusionPipeline
    assert index["_class_name"] == cls.__name__
    assert is_sdxl(folder) == is_sdxl(name) == (name == "tiny-sdxl")

    pipe = cls.from_pretrained(folder)
    unet = pipe.unet
    # real architecture features the trainer and the exporters rely on
    names = [n for n, _ in unet.named_modules()]
    for part in ("attn1.to_q", "attn2.to_k", "attn1.to_v", "attn2.to_out.0", "resnets.0.conv1"):
        assert any(n.endswith(part) for n in names), part
    if name == "tiny-sdxl":
        assert unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2 is not None
        assert unet.config.cross_attention_dim == (
            pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        )

    images = pipe(
        "a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (1, PRESET_RESOLUTION, PRESET_RESOLUTION, 3)
    assert torch.isfinite(torch.from_numpy(images)).all() and images.std() > 0


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_preset_is_deterministic(tmp_path, monkeypatch, name):
    folders = []
    for i in range(2):
        monkeypatch.setenv("REFLORA_CACHE", str(tmp_path / str(i)))
        folders.append(resolve_pretrained(name))
    for component in ("unet", "vae", "text_encoder"):
        a, b = (load_file(next(p for p in _weights(f, component))) for f in folders)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _weights(folder, component):
    d = os.path.join(folder, component)
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def test_tokenizer_handles_any_text():
    tok = make_tokenizer()
    ids = tok("a photo of sks dog, naïve café 🐶").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of sks dog , naïve café 🐶"


def test_non_preset_names_pass_through(tmp_path):
    assert resolve_pretrained("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_two_processes_build_once(tmp_path):
    """Two trainers starting at once on a fresh cache: one builds, the other waits and reuses it."""
    import subprocess
    import sys

    code = "from reflora_diffusion.presets import resolve_pretrained; print(resolve_pretrained('tiny'))"
    env = {**os.environ, "REFLORA_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    folders = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(folders) == 1
    # only the finished preset and its lock file: no half-built temporary folders
    assert sorted(os.listdir(tmp_path / "presets")) == ["tiny-v1", "tiny-v1.lock"]
