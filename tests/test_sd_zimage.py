"""Z-Image on the offline tiny-zimage preset: the family's prompt encoding (chat template, variable-length
embeddings), flow-matching training with the core's methods, validation from cached embeddings, the held-out loss,
and an export that ZImagePipeline.load_lora_weights reads and that changes its images."""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from reflora_diffusion import families
from reflora_diffusion.export import ExportError, export_run
from reflora_diffusion.presets import native_resolution, pixel_multiple, resolve_pretrained
from reflora_diffusion.rundir import read_events
from reflora_diffusion.sd.config import ConfigError

from test_export import lora_layer_names
from test_sd_train import PROMPT, _offline_single_thread, make_trainer, reset_accelerate, train  # noqa: F401

ZIMAGE = dict(pretrained_model_name_or_path="tiny-zimage", resolution=64, max_sequence_length=48,
              validation_steps=4, checkpointing_steps=10)


def pipeline():
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(resolve_pretrained("tiny-zimage"))


def generate(pipe, seed=0):
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, max_sequence_length=48, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


@torch.no_grad()
def transformer_out(transformer):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 32, 32, generator=g)
    hidden = [torch.randn(7, 32, generator=g)]
    transformer.eval()
    return families.get("zimage").predict(transformer, transformer.config, x, torch.tensor([500.0]), hidden, None, 0)


def test_preset_is_found_loads_and_generates():
    folder = resolve_pretrained("tiny-zimage")
    assert families.family_of(folder).name == "zimage"
    assert native_resolution(folder) == 256 and pixel_multiple(folder) == 4  # pipeline default 128 x VAE 2; patch 2
    pipe = pipeline()
    # the pipeline's own prompt encoding and the family's agree (chat template, hidden_states[-2], real tokens)
    ours, _ = families.get("zimage").encode_text([pipe.text_encoder], [pipe.tokenizer], [PROMPT, "a b"], "cpu")
    theirs = pipe._encode_prompt([PROMPT, "a b"], device="cpu", max_sequence_length=pipe.tokenizer.model_max_length)
    assert [t.shape for t in ours] == [t.shape for t in theirs] and ours[0].shape[0] != ours[1].shape[0]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    images = generate(pipe)
    assert images.shape == (1, 64, 64, 3) and images.std() > 0


@pytest.mark.parametrize("method,cache", [("reflora", False), ("reflora-s", True)])
def test_train_export_and_reload_in_the_pipeline(tmp_path, method, cache):
    run = tmp_path / "run"
    trainer = train(run, method=method, learning_rate=1e-3, cache_latents=cache, eval_loss_every=2, **ZIMAGE)
    steps = [e for e in read_events(run) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in steps)
    evals = [e for e in read_events(run) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(math.isfinite(e["eval_loss"]) for e in evals)
    transformer = trainer.c.denoiser
    trained = {n.removesuffix(".lora_A") for n, _ in transformer.named_modules() if n.endswith(".lora_A")}
    assert trained and {n.rsplit(".", 1)[-1] for n in trained} <= {"to_q", "to_k", "to_v", "0"}
    assert {"layers.0.attention.to_q", "noise_refiner.0.attention.to_out.0", "context_refiner.0.attention.to_v"} <= trained
    last = steps[-1]["refactor"]
    if method == "reflora":
        assert last["refactored"] == len(trained)
    else:
        assert last["balance_max"] == pytest.approx(1.0, rel=1e-4)
    if cache:  # frozen text encoder unloaded after caching; validation sampled from the cached embeddings
        assert trainer.c.text_encoders == []
    assert (run / "samples" / "step_4" / "0.png").is_file()

    keys = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert {k.split(".", 1)[0] for k in keys} == {"transformer"}
    card = (run / "README.md").read_text()
    assert "ZImagePipeline" in card and "z-image" in card and "No kohya / ComfyUI layout" in card
    pipe = pipeline()
    before = generate(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unused or missing keys
        pipe.load_lora_weights(str(run))
    assert lora_layer_names(pipe.transformer) == lora_layer_names(transformer)
    torch.testing.assert_close(transformer_out(pipe.transformer), transformer_out(transformer), rtol=1e-4, atol=1e-5)
    assert abs(generate(pipe) - before).max() > 1e-4
    with pytest.raises(ExportError, match="kohya export covers SD 1.x, SDXL and FLUX; for Z-Image") as e:
        export_run(run, format="kohya", output=tmp_path / "kohya")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options,message", [
    ({"train_text_encoder": True}, "--train_text_encoder: Z-Image's LoRA loader has no text encoder slot"),
    ({"mixed_precision": "fp16"}, "--mixed_precision fp16 does not work for Z-Image"),
    ({"snr_gamma": 5.0}, "--snr_gamma belong to SD/SDXL's DDPM loss; Z-Image trains by flow matching"),
])
def test_options_zimage_cannot_use_are_refused_in_one_line(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as e:
        make_trainer(tmp_path / "x", **{**ZIMAGE, **options})
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
