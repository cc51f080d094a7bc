"""Z-Image, FLUX.2 [klein] (a Qwen3 text encoder behind a chat template) and Qwen-Image (Qwen2.5-VL behind a system
prompt) on the offline tiny-zimage / tiny-flux2 / tiny-qwenimage presets: the family's prompt encoding against the pipeline's own, flow-matching training with the core's
methods, validation from cached embeddings, the held-out loss, and an export that the pipeline's load_lora_weights
reads and that changes its images."""

import math
import re
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
from sd_helpers import PROMPT, make_trainer, train

SEQ = 48
PRESETS = {"tiny-zimage": "zimage", "tiny-flux2": "flux2", "tiny-qwenimage": "qwenimage"}


def seq(preset):
    # Qwen-Image's template is ~150 byte tokens of the tiny tokenizer: its default length keeps the prompt
    return 512 if preset == "tiny-qwenimage" else SEQ


def options(preset):
    return dict(pretrained_model_name_or_path=preset, resolution=64, max_sequence_length=seq(preset),
                validation_steps=4, checkpointing_steps=10)


def pipeline(preset):
    pipe = families.family_of(preset).pipeline_class().from_pretrained(resolve_pretrained(preset))
    pipe.name = preset
    return pipe


def generate(pipe, seed=0):
    return pipe(prompt=PROMPT, num_inference_steps=2, height=64, width=64, max_sequence_length=seq(pipe.name),
                output_type="np", generator=torch.Generator().manual_seed(seed)).images


@torch.no_grad()
def transformer_out(transformer, name):
    """One forward pass through the family's denoiser call on fixed inputs in its latent and text layouts."""
    g = torch.Generator().manual_seed(1)
    if name in ("zimage", "qwenimage"):  # 16 latent channels; a list of variable-length prompt embeddings
        x, hidden = torch.randn(1, 16, 32, 32, generator=g), [torch.randn(7, 32, generator=g)]
    else:  # FLUX.2: 4 x 8 patchified channels; 3 stacked text-encoder layers of 16
        x, hidden = torch.randn(1, 32, 16, 16, generator=g), torch.randn(1, 7, 48, generator=g)
    transformer.eval()
    return families.get(name).predict(transformer, transformer.config, x, torch.tensor([500.0]), hidden, None, 1.0)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_found_loads_and_encodes_prompts_like_its_pipeline(preset):
    folder = resolve_pretrained(preset)
    fam = families.family_of(folder)
    assert fam.name == PRESETS[preset]
    assert native_resolution(folder) == 256 and pixel_multiple(folder) == 4  # pipeline default 128 x VAE 2; 2x2
    pipe = pipeline(preset)
    pipe.tokenizer.model_max_length = seq(preset)
    ours, _ = fam.encode_text([pipe.text_encoder], [pipe.tokenizer], [PROMPT, "a b"], "cpu")
    if fam.name == "zimage":  # chat template, hidden_states[-2], each prompt's real tokens only
        theirs = pipe._encode_prompt([PROMPT, "a b"], device="cpu", max_sequence_length=SEQ)
        assert ours[0].shape[0] != ours[1].shape[0]
    elif fam.name == "qwenimage":  # system template, last hidden states, the template's head dropped, padded + mask
        embeds, mask = pipe.encode_prompt([PROMPT, "a b"], device="cpu", max_sequence_length=seq(preset))
        theirs = [e[m.bool()] for e, m in zip(embeds, mask)]
        assert ours[0].shape[0] != ours[1].shape[0]
    else:  # chat template (thinking off), hidden states of layers 9, 18, 27 side by side
        theirs, _ = pipe.encode_prompt([PROMPT, "a b"], device="cpu", max_sequence_length=SEQ)
        assert ours.shape == (2, SEQ, 48)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    images = generate(pipe)
    assert images.shape == (1, 64, 64, 3) and images.std() > 0


def test_flux2_latents_are_patchified_and_batch_normalised():
    """FLUX.2's latent space: 2x2 patches, minus the VAE's batch-norm mean, over its std (the pipeline decodes by
    the inverse)."""
    from diffusers import Flux2KleinPipeline

    vae = pipeline("tiny-flux2").vae
    z = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = families.get("flux2").model_latents(vae, z)
    assert ours.shape == (2, 32, 8, 8)
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    back = Flux2KleinPipeline._unpatchify_latents(ours * std + vae.bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(back, z)
    assert not torch.allclose(ours, Flux2KleinPipeline._patchify_latents(z))  # the statistics are not the identity


@pytest.mark.parametrize("preset,method,cache", [("tiny-zimage", "reflora", False), ("tiny-zimage", "reflora-s", True),
                                                 ("tiny-flux2", "reflora", True), ("tiny-flux2", "reflora-s", False),
                                                 ("tiny-qwenimage", "reflora", True), ("tiny-qwenimage", "reflora-s", False)])
def test_train_export_and_reload_in_the_pipeline(tmp_path, preset, method, cache):
    run = tmp_path / "run"
    name = PRESETS[preset]
    trainer = train(run, method=method, learning_rate=1e-3, cache_latents=cache, eval_loss_every=2, **options(preset))
    steps = [e for e in read_events(run) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in steps)
    evals = [e for e in read_events(run) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(math.isfinite(e["eval_loss"]) for e in evals)
    transformer = trainer.components.denoiser
    trained = {n.removesuffix(".lora_A") for n, _ in transformer.named_modules() if n.endswith(".lora_A")}
    if name == "qwenimage":  # joint attention of every block
        assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0"} <= trained
        assert {n.rsplit(".", 1)[-1] for n in trained} <= {"to_q", "to_k", "to_v", "0"}
    elif name == "zimage":  # attention in the main layers and both refiners
        assert {n.rsplit(".", 1)[-1] for n in trained} <= {"to_q", "to_k", "to_v", "0"}
        assert {"layers.0.attention.to_q", "noise_refiner.0.attention.to_out.0",
                "context_refiner.0.attention.to_v"} <= trained
    else:  # double-block attention, the single blocks' fused qkv+MLP input and their output projections
        assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                "single_transformer_blocks.1.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"} <= trained
    last = steps[-1]["refactor"]
    if method == "reflora":
        assert last["refactored"] == len(trained)
    else:
        assert last["balance_max"] == pytest.approx(1.0, rel=1e-4)
    if cache:  # frozen text encoder unloaded after caching; validation sampled from the cached embeddings
        assert trainer.components.text_encoders == []
    assert (run / "samples" / "step_4" / "0.png").is_file()

    keys = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert {k.split(".", 1)[0] for k in keys} == {"transformer"}
    card = (run / "README.md").read_text()
    fam = families.get(name)
    assert fam.pipeline in card and fam.hub_tag in card
    assert ("No kohya / ComfyUI layout" in card) == (name == "flux2")
    pipe = pipeline(preset)
    before = generate(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unused or missing keys
        pipe.load_lora_weights(str(run))
    assert lora_layer_names(pipe.transformer) == lora_layer_names(transformer)
    torch.testing.assert_close(transformer_out(pipe.transformer, name), transformer_out(transformer, name),
                               rtol=1e-4, atol=1e-5)
    assert abs(generate(pipe) - before).max() > 1e-4
    if name == "flux2":  # FLUX.2's original layout fuses q/k/v: not written yet
        with pytest.raises(ExportError, match="kohya export covers SD 1.x, SDXL, FLUX, Z-Image and Qwen-Image; for "
                                              "FLUX.2") as e:
            export_run(run, format="kohya", output=tmp_path / "kohya")
        assert "\n" not in str(e.value)
        return
    # the original checkpoint's layout, read back through diffusers' own converter: the same weight change
    path = export_run(run, format="kohya", output=tmp_path / "kohya", name="dog")
    keys = load_file(str(path))
    assert all(k.startswith("diffusion_model.") for k in keys) and any(k.endswith(".alpha") for k in keys)
    again = pipeline(preset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_lora_weights(str(path))
    assert lora_layer_names(again.transformer) == lora_layer_names(transformer)
    torch.testing.assert_close(transformer_out(again.transformer, name), transformer_out(transformer, name),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("extra,message", [
    ({"train_text_encoder": True}, "--train_text_encoder: {}'s LoRA loader has no text encoder slot"),
    ({"mixed_precision": "fp16"}, "--mixed_precision fp16 does not work for {}"),
    ({"snr_gamma": 5.0}, "--snr_gamma belong to SD/SDXL's DDPM loss; {} trains by flow matching"),
])
def test_options_the_family_cannot_use_are_refused_in_one_line(tmp_path, preset, extra, message):
    label = re.escape(families.get(PRESETS[preset]).label)
    with pytest.raises(ConfigError, match=message.format(label)) as e:
        make_trainer(tmp_path / "x", **{**options(preset), **extra})
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
