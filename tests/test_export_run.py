"""export_run / the CLI: from a run or checkpoint folder to diffusers and kohya files; bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflora_diffusion.export import (  # noqa: E402
    WEIGHT_NAME, ExportError, export_diffusers, export_kohya, export_run, read_diffusers, write_model_card)
from reflora_diffusion.export.__main__ import main  # noqa: E402
from reflora_diffusion.presets import resolve_pretrained  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_unet(name="tiny", seed=0, r=4, alpha=8.0):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(resolve_pretrained(name), subfolder="unet")
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    gen = torch.Generator().manual_seed(seed)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
    return unet


def make_run(tmp_path, unet, base="tiny", method="reflora", steps=10):
    """A run folder as the trainer leaves it: config.json, status.json, final file and one checkpoint."""
    run = tmp_path / "dog-reflora"
    export_diffusers(run, unet)
    export_diffusers(run / "checkpoints" / "checkpoint-4", unet)
    (run / "config.json").write_text(json.dumps({
        "pretrained_model_name_or_path": base, "method": method, "rank": 4, "lora_alpha": 8.0,
        "max_train_steps": steps, "instance_prompt": "a photo of sks dog"}))
    (run / "status.json").write_text(json.dumps({"state": "done", "step": steps, "max_steps": steps}))
    return run


def meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_export_run_to_kohya_and_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = lora_unet("tiny-sdxl")
    run = make_run(tmp_path, unet, base="tiny-sdxl")
    # the trainer's file may lack our extra metadata (e.g. written by another tool): then the run's
    # config.json names the base model, whose UNet layout gives kohya's SDXL block numbers
    tensors, m = load_file(str(run / WEIGHT_NAME)), meta(run / WEIGHT_NAME)
    del m["reflora_info"]
    save_file(tensors, str(run / WEIGHT_NAME), metadata=m)

    kohya = export_run(run, format="kohya", output=tmp_path / "a1111")
    assert kohya == tmp_path / "a1111" / "dog-reflora.safetensors"
    m = meta(kohya)
    assert (m["ss_steps"], m["reflora_method"], m["ss_sd_model_name"]) == ("10", "reflora", "tiny-sdxl")
    assert m["ss_network_dim"] == "4" and m["ss_network_alpha"] == "8.0"
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in load_file(str(kohya)))
    card = (tmp_path / "a1111" / "dog-reflora.md").read_text()  # a kohya file's card is named after it
    for fact in ("tiny-sdxl", "`reflora`", "| rank | 4", "| alpha | 8", "| steps | 10", "load_lora_weights",
                 "<lora:dog-reflora:1>", "StableDiffusionXLPipeline"):
        assert fact in card, fact

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained("tiny-sdxl"))
    pipe.load_lora_weights(kohya.parent, weight_name=kohya.name)
    gen = torch.Generator().manual_seed(0)
    x, enc = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 64, generator=gen)
    cond = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 5, enc, added_cond_kwargs=cond).sample,
                                   unet(x, 5, enc, added_cond_kwargs=cond).sample, rtol=1e-4, atol=1e-5)

    # a checkpoint exports with its own step count
    out = export_run(run / "checkpoints" / "checkpoint-4", format="diffusers", output=tmp_path / "ckpt4")
    assert read_diffusers(out).info["steps"] == 4
    src = load_file(str(run / "checkpoints" / "checkpoint-4" / WEIGHT_NAME))
    got = load_file(str(out))
    assert got.keys() == src.keys() and all(torch.equal(got[k], src[k]) for k in src)
    assert "| steps | 4" in (tmp_path / "ckpt4" / "README.md").read_text()


def test_refuses_to_overwrite_a_different_adapter(tmp_path):
    first, second = lora_unet(seed=0), lora_unet(seed=1)
    path = export_diffusers(tmp_path, first)
    kohya = export_kohya(tmp_path, first, name="dog")
    before = load_file(str(path)), load_file(str(kohya))
    assert export_diffusers(tmp_path, first) == path  # the same adapter again is fine

    for export in (lambda **kw: export_diffusers(tmp_path, second, **kw),
                   lambda **kw: export_kohya(tmp_path, second, name="dog", **kw)):
        with pytest.raises(ExportError, match="already holds a different adapter; pass overwrite=True"):
            export()
    after = load_file(str(path)), load_file(str(kohya))
    for old, new in zip(before, after):  # nothing was touched, no temporary files are left
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert sorted(os.listdir(tmp_path)) == sorted([WEIGHT_NAME, "dog.safetensors"])

    export_diffusers(tmp_path, second, overwrite=True)
    b = next(k for k in before[0] if "lora_B" in k)
    assert not torch.equal(load_file(str(path))[b], before[0][b])


def test_cli(tmp_path, capsys):
    run = make_run(tmp_path, lora_unet())
    out = tmp_path / "out"
    assert main([str(run), "--format", "kohya", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "dog-reflora.safetensors")
    # a different run into the same file is refused with one line, then allowed with --overwrite
    other = make_run(tmp_path / "other", lora_unet(seed=3))
    assert main([str(other), "--format", "kohya", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    assert main([str(other), "--format", "kohya", "--output", str(out), "--overwrite"]) == 0

    # the real entry point, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "reflora_diffusion.export", str(tmp_path / "missing"),
                           "--format", "kohya"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "does not exist" in proc.stderr


def test_bad_sources(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=f"holds no {WEIGHT_NAME}"):
        export_run(tmp_path / "empty", format="kohya")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / WEIGHT_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        export_run(damaged, format="kohya", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="unknown export format 'ckpt'"):
        export_run(damaged, format="ckpt")


def test_model_card_for_a_chain(tmp_path):
    run = make_run(tmp_path, lora_unet(r=2, alpha=3.0), method="cola", steps=6)
    card = write_model_card(run).read_text()
    assert "`cola`" in card and "chain of LoRA links" in card and "| alpha | 3 (scale alpha / rank = 1.5)" in card
    assert 'resolve_pretrained("tiny")' in card and "python -m reflora_diffusion.export" in card


def test_cli_never_replaces_a_readme_it_did_not_write(tmp_path, capsys):
    run = make_run(tmp_path, lora_unet())
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    assert main([str(run), "--format", "diffusers", "--output", str(project)]) == 2
    err = capsys.readouterr().err.strip()
    assert "README.md exists and is not a model card written by this exporter" in err and "\n" not in err
    assert (project / "README.md").read_text() == "# my project\n"
    assert sorted(os.listdir(project)) == ["README.md"]  # refused before anything was written
    # its own card is updated freely; a foreign one only with --overwrite
    assert main([str(run), "--format", "kohya", "--output", str(tmp_path / "out")]) == 0
    assert main([str(run), "--format", "diffusers", "--output", str(tmp_path / "out")]) == 0
    assert main([str(run), "--format", "diffusers", "--output", str(project), "--overwrite"]) == 0
    assert "(reflora-diffusion)" in (project / "README.md").read_text()


def test_kohya_exports_into_one_folder_keep_their_own_cards(tmp_path, capsys):
    """A1111's models/Lora holds many runs' files: each kohya file gets its card <name>.md, and nothing already in
    the folder (a user's README.md, another export's card) is replaced."""
    dog = make_run(tmp_path / "a", lora_unet(seed=0))
    cat = make_run(tmp_path / "b", lora_unet(seed=1))
    loras = tmp_path / "models" / "Lora"
    loras.mkdir(parents=True)
    (loras / "README.md").write_text("# my LoRAs\n")
    assert main([str(dog), "--format", "kohya", "--output", str(loras)]) == 0
    assert main([str(cat), "--format", "kohya", "--output", str(loras), "--name", "cat"]) == 0
    assert sorted(os.listdir(loras)) == ["README.md", "cat.md", "cat.safetensors", "dog-reflora.md",
                                         "dog-reflora.safetensors"]
    assert (loras / "README.md").read_text() == "# my LoRAs\n"
    assert "<lora:dog-reflora:1>" in (loras / "dog-reflora.md").read_text()
    assert "<lora:cat:1>" in (loras / "cat.md").read_text() and "dog-reflora" not in (loras / "cat.md").read_text()
    # a file of the user's with a card's name is refused in one line, naming it and the fix
    (loras / "fox.md").write_text("my notes on fox\n")
    capsys.readouterr()
    assert main([str(dog), "--format", "kohya", "--output", str(loras), "--name", "fox"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {loras / 'fox.md'} exists and is not a model card written by this exporter; pass "
                   "--overwrite to replace it, or choose another --output folder (or --name for a kohya file)")
    assert (loras / "fox.md").read_text() == "my notes on fox\n" and not (loras / "fox.safetensors").exists()
