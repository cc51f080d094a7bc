"""SD3/SD3.5 and FLUX.1 on the offline tiny-sd3 / tiny-flux presets: flow-matching training with the core's
methods, export that the pipelines' own load_lora_weights read, and the family-specific options.

Single-threaded and in-process (tests/conftest.py, tests/sd_helpers.py).
"""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from reflora_diffusion.export import ExportError, export_run
from reflora_diffusion.presets import PIPELINES, model_family, native_resolution, pipeline_class, resolve_pretrained
from reflora_diffusion.rundir import read_events
from reflora_diffusion.sd.config import ConfigError, make_config
from reflora_diffusion.sd.train import SDTrainer

from test_export import _Records, lora_layer_names
from sd_helpers import BASE, PROMPT, make_trainer, reset_accelerate, train

FLOW = dict(max_sequence_length=32, validation_steps=4, checkpointing_steps=10)
SEQ = 32  # T5 tokens in these tests (the char-level tiny tokenizer spends one per character)


def generate(pipe, seed=0):
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, max_sequence_length=SEQ, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


@torch.no_grad()
def transformer_out(transformer, family):
    """One forward pass of the transformer on fixed random inputs."""
    from reflora_diffusion import families

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 32, 32, generator=g)
    hidden, pooled = torch.randn(1, 40, 64, generator=g), torch.randn(1, 64 if family == "sd3" else 32, generator=g)
    transformer.eval()
    return families.get(family).predict(transformer, transformer.config, x, torch.tensor([500.0]), hidden, pooled, 3.5)


def load_lora_quietly(pipe, folder):
    """load_lora_weights, failing on any diffusers warning (unexpected or missing keys, config mismatch)."""
    from diffusers.utils import logging as dlogging

    handler = _Records()
    dlogging.get_logger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(folder))
    finally:
        dlogging.get_logger("diffusers").removeHandler(handler)
    problems = handler.messages + [str(w.message) for w in caught if "lora" in str(w.message).lower()
                                   or "key" in str(w.message).lower()]
    # diffusers notes a text encoder the file has no LoRA for (expected without --train_text_encoder)
    assert not [p for p in problems if not p.startswith("No LoRA keys associated to CLIPTextModel")], problems


# --- presets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_preset_loads_through_from_pretrained_and_generates(name):
    from transformers import CLIPTokenizer, T5EncoderModel, T5Tokenizer

    folder = resolve_pretrained(name)
    family = model_family(name)
    index = json.loads(open(f"{folder}/model_index.json").read())
    assert index["_class_name"] == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert model_family(folder) == family
    # the pipeline makes 64 x 64 by default for SD3 (sample_size 32 x VAE 2); FLUX has no sample_size:
    # FluxPipeline's default latent size 128 x 2
    assert native_resolution(folder) == {"sd3": 64, "flux": 256}[family]

    pipe = pipeline_class(family).from_pretrained(folder)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor
    t5 = pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2
    tok = pipe.tokenizer_3 if family == "sd3" else pipe.tokenizer_2
    assert isinstance(t5, T5EncoderModel) and isinstance(tok, T5Tokenizer) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert tok.unk_token_id not in tok("a photo of sks dog").input_ids
    if family == "flux":
        assert pipe.transformer.config.guidance_embeds
    else:  # SD3.5's dual attention and qk norms
        assert pipe.transformer.transformer_blocks[0].attn2 is not None
    images = generate(pipe)
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(images)).all() and images.std() > 0


# --- training, export, reload ----------------------------------------------------------------------------
CASES = [("tiny-sd3", "reflora", False), ("tiny-sd3", "reflora-s", True), ("tiny-flux", "reflora", True),
         ("tiny-flux", "reflora-s", False)]


@pytest.mark.parametrize("name,method,text_encoder", CASES)
def test_train_export_and_reload_in_the_pipeline(tmp_path, name, method, text_encoder):
    run = tmp_path / "run"
    trainer = train(run, pretrained_model_name_or_path=name, method=method, train_text_encoder=text_encoder,
                    learning_rate=1e-3, **FLOW)
    family = model_family(name)

    steps = [e for e in read_events(run) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in steps)
    # default targets: SD3 joint attention (+ SD3.5's second attention); FLUX attention, MLPs, single blocks
    transformer = trainer.components.denoiser
    trained = {n.removesuffix(".lora_A") for n, _ in transformer.named_modules() if n.endswith(".lora_A")}
    if family == "sd3":
        assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
                "transformer_blocks.0.attn2.to_q", "transformer_blocks.1.attn.to_out.0"} <= trained
    else:
        assert {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff_context.net.2",
                "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out",
                "single_transformer_blocks.0.attn.to_v"} <= trained
        assert "proj_out" not in trained  # the final output layer stays as it is
    n_text = {"sd3": 2, "flux": 1}[family] if text_encoder else 0  # CLIP encoders; T5 never
    layers = steps[0]["refactor"]["layers"]
    assert layers == len(trained) + n_text * 2 * 4  # 2 CLIP layers x q/k/v/out_proj each
    last = steps[-1]["refactor"]
    if method == "reflora":  # 2 plain warm-up steps, then every layer refactored
        assert steps[1]["refactor"]["refactored"] == 0 and last["skipped_nonfinite"] == 0
        if text_encoder:  # FLUX reads only CLIP's pooled (EOS) output: its last layer's LoRA gradients have rank
            # 1 per sample, so after 2 steps some B are still rank-deficient and skipped (the core's rule)
            assert last["refactored"] >= len(trained) and last["refactored"] + last["skipped_rank_deficient"] == layers
        else:
            assert last["refactored"] == layers
    else:  # ||A|| = ||B|| in every layer after each step
        assert steps[-1]["refactor"]["balance_max"] == pytest.approx(1.0, rel=1e-4)
    assert (run / "samples" / "step_4" / "0.png").is_file()

    keys = load_file(str(run / "pytorch_lora_weights.safetensors"))
    prefixes = {k.split(".", 1)[0] for k in keys}
    assert prefixes == {"transformer", *["text_encoder", "text_encoder_2"][:n_text]}
    card = (run / "README.md").read_text()
    assert PIPELINES[family] in card and 'a "Load LoRA" node' in card and "lora_unet" not in card

    # the file loads into the family's pipeline with no warning, on exactly the trained layers, reproduces the
    # trained transformer and changes the image (same seed)
    pipe = pipeline_class(family).from_pretrained(resolve_pretrained(name))
    before = generate(pipe)
    load_lora_quietly(pipe, run)
    assert lora_layer_names(pipe.transformer) == lora_layer_names(transformer)
    torch.testing.assert_close(transformer_out(pipe.transformer, family), transformer_out(transformer, family),
                               rtol=1e-4, atol=1e-5)
    assert abs(generate(pipe) - before).max() > 1e-4

    # re-export from the run folder gives the same tensors
    again = load_file(str(export_run(run, output=tmp_path / "again")))
    assert again.keys() == keys.keys() and all(torch.equal(again[k], keys[k]) for k in keys)
    if family == "sd3":  # no kohya layout that a loader reads: refused with a pointer to ComfyUI
        with pytest.raises(ExportError, match="kohya export covers SD 1.x, SDXL, FLUX, Z-Image and Qwen-Image; for SD3 .* Load LoRA node"):
            export_run(run, format="kohya", output=tmp_path / "kohya")
    else:  # sd-scripts' FLUX layout: each (fused) layer adds exactly the trained layers' weight change
        kohya = load_file(str(export_run(run, format="kohya", output=tmp_path / "kohya", name="dog")))
        assert_flux_kohya_matches(kohya, transformer)
        assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_")) for k in kohya)
        assert any(k.startswith("lora_te1_") for k in kohya) == text_encoder


def lora_delta(layer) -> torch.Tensor:
    """The weight change a peft LoRA layer adds: scaling * B @ A."""
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def assert_flux_kohya_matches(kohya, transformer):
    from reflora_diffusion.export.kohya import flux_kohya_name

    groups = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A"):
            key, part = flux_kohya_name(name)
            groups.setdefault(key, {})[part or 0] = lora_delta(module).detach()
    assert {k.rsplit(".", 2)[0] for k in kohya if k.startswith("lora_unet")} == set(groups)
    for key, parts in groups.items():
        down, up, alpha = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"], kohya[f"{key}.alpha"]
        got = alpha / down.shape[0] * up @ down
        want = torch.cat([parts[j] for j in sorted(parts)])  # fused: q, k, v (and the MLP input) stacked
        assert len(parts) in (1, 3, 4) and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --- options ---------------------------------------------------------------------------------------------
def test_fp16_and_ddpm_options_are_refused_with_one_line(tmp_path):
    for name, extra, expected in [
        ("tiny-flux", {"mixed_precision": "fp16"}, "--mixed_precision fp16 does not work for FLUX"),
        ("tiny-sd3", {"mixed_precision": "fp16"}, "--mixed_precision fp16 does not work for SD3"),
        ("tiny-sd3", {"snr_gamma": 5.0}, "--snr_gamma belong to SD/SDXL's DDPM loss; SD3 trains by flow matching"),
    ]:
        reset_accelerate()
        with pytest.raises(ConfigError, match=expected) as e:
            SDTrainer(make_config({**BASE, "pretrained_model_name_or_path": name, "output_dir": str(tmp_path / "x"),
                                   **extra}))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "x").exists()  # refused before the run folder is touched
    with pytest.raises(ConfigError, match="--weighting_scheme must be one of"):
        make_config({**BASE, "output_dir": str(tmp_path / "y"), "weighting_scheme": "uniform"})


def test_weighting_scheme_and_density_reach_the_loss(tmp_path):
    trainer = make_trainer(tmp_path / "w", pretrained_model_name_or_path="tiny-sd3", train_batch_size=4,
                           validation_prompt=[], **FLOW)
    assert trainer.cfg.weighting_scheme == "logit_normal"  # SD3's default, recorded in config.json
    assert json.loads((tmp_path / "w" / "config.json").read_text())["weighting_scheme"] == "logit_normal"
    batch = next(iter(trainer.dataloader))
    seen = []
    trainer.components.denoiser.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["timestep"].clone()),
                                                 with_kwargs=True)

    def step(**options):
        for k, v in options.items():
            setattr(trainer.cfg, k, v)
        trainer.noise_gen.manual_seed(0)
        with torch.no_grad():
            loss = trainer.loss(batch)
        return seen[-1], float(loss)

    t_logit, loss_logit = step(weighting_scheme="logit_normal", logit_mean=0.0)
    assert step() == (pytest.approx(t_logit), loss_logit)  # same seed, same draw
    t_mode, _ = step(weighting_scheme="mode", mode_scale=1.29)
    assert not torch.equal(t_mode, t_logit)
    t_pos, _ = step(weighting_scheme="logit_normal", logit_mean=3.0)
    t_neg, _ = step(logit_mean=-3.0)
    # the density's mean moves the timesteps; as in diffusers' examples u indexes the scheduler's timesteps,
    # which run from high to low noise, so a positive mean means low noise
    assert t_pos.max() < 300 < 900 < t_neg.min()
    t_none, loss_none = step(weighting_scheme="none")
    t_cosmap, loss_cosmap = step(weighting_scheme="cosmap")
    assert torch.equal(t_none, t_cosmap) and loss_none != loss_cosmap  # same (uniform) draw, weighted loss


def test_caching_unloads_the_text_encoders_with_bf16_and_checkpointing(tmp_path):
    trainer = train(tmp_path / "c", pretrained_model_name_or_path="tiny-flux", cache_latents=True,
                    mixed_precision="bf16", gradient_checkpointing=True, max_train_steps=2, validation_steps=2,
                    **{k: v for k, v in FLOW.items() if k != "validation_steps"})
    assert all(math.isfinite(e["loss"]) for e in read_events(tmp_path / "c") if "loss" in e)
    transformer = trainer.components.denoiser
    assert transformer.gradient_checkpointing
    assert {p.dtype for p in transformer.parameters() if p.requires_grad} == {torch.float32}  # LoRA stays fp32
    assert {p.dtype for p in transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert trainer.components.text_encoders == [] and set(trainer.text_cache) == {PROMPT}
    hidden, pooled = trainer.text_cache[PROMPT]
    assert hidden.shape == (SEQ, 64) and pooled.shape == (32,)  # T5 tokens x d_model; CLIP's pooled output
    assert (tmp_path / "c" / "samples" / "step_2" / "0.png").is_file()  # validation from cached embeddings
    # the cache holds what the pipeline's own encoder computes
    pipe = pipeline_class("flux").from_pretrained(resolve_pretrained("tiny-flux")).to(torch.bfloat16)  # T5's wo too
    with torch.no_grad():  # as in the pipeline's __call__ (CPU attention kernels differ with autograd on)
        embeds, pooled_ref, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=SEQ)
    torch.testing.assert_close(hidden, embeds[0])
    torch.testing.assert_close(pooled, pooled_ref[0])


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-zimage", "tiny-qwenimage"])
def test_resume_repeats_the_uninterrupted_flux_run(tmp_path, monkeypatch, preset):
    """All flow-matching randomness (density draws, noise, VAE samples) comes from the trainer's generator,
    which a checkpoint holds: a run stopped after a checkpoint and resumed repeats the run exactly (also with the
    list-of-embeddings families)."""
    opts = dict(pretrained_model_name_or_path=preset, method="reflora", max_train_steps=4, checkpointing_steps=2,
                train_batch_size=2, validation_prompt=[], max_sequence_length=SEQ, resolution=64)
    train(tmp_path / "full", **opts)
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["weighting_scheme"] == "none" and cfg["max_sequence_length"] == SEQ  # FLUX's defaults, recorded

    original = SDTrainer._log_step

    def interrupt_after_step_3(self, *a, **k):
        original(self, *a, **k)
        if self.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(SDTrainer, "_log_step", interrupt_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", **opts)
    monkeypatch.setattr(SDTrainer, "_log_step", original)
    train(tmp_path / "cut", **opts, resume_from_checkpoint="latest")
    loss = lambda run: [e["loss"] for e in read_events(run) if "loss" in e]  # noqa: E731
    assert len(loss(tmp_path / "full")) == 4 and loss(tmp_path / "cut") == loss(tmp_path / "full")  # exact
    a, b = (load_file(str(tmp_path / r / "pytorch_lora_weights.safetensors")) for r in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
