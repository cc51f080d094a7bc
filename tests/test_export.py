"""Exported LoRA files load in diffusers (its own format and its kohya path) and reproduce the model.

Every test adapts the offline presets with LoRA (alpha != rank, random non-zero B so the adapter changes
the output), exports, loads the file into a freshly loaded pipeline with `load_lora_weights` and compares
the UNet / text-encoder outputs with the adapted models'.
"""

import logging
import os
import warnings

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflora_diffusion.export import WEIGHT_NAME, ExportError, export_diffusers, export_kohya, sgm_unet_name  # noqa: E402
from reflora_diffusion.presets import resolve_pretrained  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def adapted_models(name, unet_lora=(4, 6.0), te_lora=((2, 5.0), (3, 1.0)), targets=UNET_TARGETS, seed=0):
    """The preset's UNet and text encoder(s) with LoRA of (rank, alpha), B drawn at random."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = resolve_pretrained(name)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=unet_lora[0], lora_alpha=unet_lora[1], target_modules=targets))
    encoders = []
    if te_lora:
        classes = [CLIPTextModel] + ([CLIPTextModelWithProjection] if name == "tiny-sdxl" else [])
        for i, (cls, (r, alpha)) in enumerate(zip(classes, te_lora)):
            te = cls.from_pretrained(folder, subfolder="text_encoder" + ("_2" if i else ""))
            te.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=TEXT_TARGETS))
            encoders.append(te)
    gen = torch.Generator().manual_seed(seed)
    for model in [unet, *encoders]:
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
    return folder, unet, encoders


def inputs(sdxl):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)  # small latents keep the forward passes cheap
    enc = torch.randn(2, 77, 64 if sdxl else 32, generator=gen)
    extra = {}
    if sdxl:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}}
    ids = torch.randint(0, 512, (2, 16), generator=gen)
    return x, torch.tensor([10, 700]), enc, extra, ids


@torch.no_grad()
def outputs(unet, encoders, sdxl):
    x, t, enc, extra, ids = inputs(sdxl)
    return [unet(x, t, enc, **extra).sample] + [te(ids)[0] for te in encoders]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_into_pipeline(folder, lora_dir, weight_name, sdxl, with_text_encoder=True):
    """Fresh pipeline + load_lora_weights; fails on any warning (unexpected/missing keys, config mismatch)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(folder)
    handler = _Records()
    dlogging.get_logger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    finally:
        dlogging.get_logger("diffusers").removeHandler(handler)
    problems = handler.messages + [str(w.message) for w in caught if "lora" in str(w.message).lower()
                                   or "adapter" in str(w.message).lower() or "key" in str(w.message).lower()]
    if not with_text_encoder:  # diffusers notes that the file has no text-encoder LoRA: expected here
        problems = [p for p in problems if not p.startswith("No LoRA keys associated to CLIPTextModel")]
    assert not problems, problems
    return pipe


def lora_layer_names(model):
    from peft.tuners.lora import LoraLayer

    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_reproduces(pipe, unet, encoders, sdxl, reference):
    # the loaded adapter sits on exactly the layers that were trained (no missing, no extra)
    models = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    for loaded, trained in zip(models, [unet, *encoders]):
        assert lora_layer_names(loaded) == lora_layer_names(trained)
    got = outputs(pipe.unet, models[1:1 + len(encoders)], sdxl)
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_diffusers_and_kohya_files_reproduce_the_adapted_model(tmp_path, name):
    sdxl = name == "tiny-sdxl"
    folder, unet, encoders = adapted_models(name)
    reference = outputs(unet, encoders, sdxl)
    for model in [unet, *encoders]:  # the adapter must matter, or the comparison proves nothing
        model.disable_adapters()
    base = outputs(unet, encoders, sdxl)
    for model in [unet, *encoders]:
        model.enable_adapters()
    for r, b in zip(reference, base):
        assert (r - b).abs().max() > 1e-2

    info = {"method": "lora", "base_model": name, "steps": 5}
    path = export_diffusers(tmp_path, unet, *encoders, info=info)
    assert path == tmp_path / WEIGHT_NAME
    kohya = export_kohya(tmp_path, unet, *encoders, info=info, name="subject")
    assert kohya == tmp_path / "subject.safetensors"
    assert sorted(os.listdir(tmp_path)) == [WEIGHT_NAME, "subject.safetensors"]  # no temporary files left

    for weight_name in (WEIGHT_NAME, "subject.safetensors"):
        pipe = load_into_pipeline(folder, tmp_path, weight_name, sdxl)
        assert_reproduces(pipe, unet, encoders, sdxl, reference)


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_kohya_file_layout(tmp_path, name):
    sdxl = name == "tiny-sdxl"
    _, unet, encoders = adapted_models(name, unet_lora=(4, 6.0), te_lora=((2, 5.0), (2, 5.0)))
    path = export_kohya(tmp_path, unet, *encoders, info={"method": "reflora", "base_model": name, "steps": 7})
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if sdxl:  # kohya's sd-scripts names SDXL layers after the original (sgm) UNet; text encoders te1/te2
        expected = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                    "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_out_0",
                    "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                    "lora_unet_output_blocks_2_2_conv", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_te2_text_model_encoder_layers_1_mlp_fc2"]
    else:  # for SD 1.x it uses diffusers' module names; one text encoder, lora_te
        expected = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                    "lora_unet_mid_block_resnets_1_conv2", "lora_unet_up_blocks_0_upsamplers_0_conv",
                    "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    for key in expected:
        assert tensors[f"{key}.lora_down.weight"].shape[0] == tensors[f"{key}.lora_up.weight"].shape[1]
        alpha = tensors[f"{key}.alpha"]
        assert alpha.dim() == 0 and alpha.item() == (6.0 if "unet" in key else 5.0)
    assert len([k for k in tensors if k.endswith(".alpha")]) * 3 == len(tensors)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "6.0" and meta["ss_steps"] == "7" and meta["reflora_method"] == "reflora"
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert meta["ss_sd_model_name"] == name


def test_flux_kohya_layout_is_what_diffusers_reads_at_full_size():
    """FLUX.1-dev's real shapes (19 double, 38 single blocks, width 3072, MLP 12288) at rank 2: diffusers' own
    sd-scripts reader (_convert_kohya_flux_lora_to_diffusers, hard-coded to these sizes) gives back every layer's
    exact weight change, also for fused q/k/v (+ MLP), per-part alphas and the final layers' swapped halves."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from reflora_diffusion.export.factors import Factor
    from reflora_diffusion.export.kohya import flux_kohya_tensors

    D, M = 3072, 12288
    g = torch.Generator().manual_seed(0)
    double = {"attn.to_q": (D, D), "attn.to_k": (D, D), "attn.to_v": (D, D), "attn.to_out.0": (D, D),
              "attn.add_q_proj": (D, D), "attn.add_k_proj": (D, D), "attn.add_v_proj": (D, D),
              "attn.to_add_out": (D, D), "ff.net.0.proj": (D, M), "ff.net.2": (M, D), "ff_context.net.0.proj": (D, M),
              "ff_context.net.2": (M, D), "norm1.linear": (D, 6 * D), "norm1_context.linear": (D, 6 * D)}
    single = {"attn.to_q": (D, D), "attn.to_k": (D, D), "attn.to_v": (D, D), "proj_mlp": (D, M),
              "proj_out": (D + M, D), "norm.linear": (D, 3 * D)}
    shapes = {**{f"transformer_blocks.{i}.{n}": s for i in range(19) for n, s in double.items()},
              **{f"single_transformer_blocks.{i}.{n}": s for i in range(38) for n, s in single.items()},
              "x_embedder": (64, D), "time_text_embed.guidance_embedder.linear_1": (256, D), "proj_out": (D, 64),
              "norm_out.linear": (D, 2 * D)}
    layers = {name: Factor(torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g),
                           8.0 if name.endswith("to_k") else 4.0) for name, (d_in, d_out) in shapes.items()}
    kohya = flux_kohya_tensors(layers)
    assert kohya["lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight"].shape == (6, D)
    assert kohya["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (3 * D + M, 8)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for name, f in layers.items():  # compare B A x on random x (the full products would take minutes)
        key = ("transformer." if "blocks" in name else "") + name  # diffusers 0.42 leaves the top ones bare
        x = torch.randn(f.A.shape[1], 3, generator=g)
        got = back.pop(f"{key}.lora_B.weight") @ (back.pop(f"{key}.lora_A.weight") @ x)  # alpha baked in: scale 1
        torch.testing.assert_close(got, f.scaling * f.B @ (f.A @ x), rtol=1e-4, atol=1e-3, msg=name)
    assert not back


def test_sgm_names_match_sdxl_layout():
    # SDXL base: 3 down blocks of 2 layers (attention in blocks 1, 2), 3 up blocks of 3 layers
    blocks = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2": "middle_block.1.transformer_blocks.9.ff.net.2",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k": "output_blocks.2.1.transformer_blocks.9.attn2.to_k",
        "up_blocks.1.resnets.0.conv1": "output_blocks.3.0.in_layers.2",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for diffusers_name, sgm in cases.items():
        assert sgm_unet_name(diffusers_name, blocks) == sgm, diffusers_name
    with pytest.raises(ExportError, match="no name in kohya's SDXL format"):
        sgm_unet_name("conv_norm_out", blocks)


@pytest.mark.parametrize("method, steps, rank", [("cola", 4, 4), ("rac-lora", 5, 6)])
def test_chain_exports_as_one_lora(tmp_path, method, steps, rank):
    """A chain's merged links + current link export as one LoRA of rank K*r applied to the original base.

    Links merge after steps 2 and 4: after 5 steps three links (rank 6); after 4 the live link is fresh
    (B = 0) and adds nothing, so it is left out (rank 4)."""
    from reflora_diffusion.core import Refactorer

    folder, unet, _ = adapted_models("tiny", unet_lora=(2, 3.0), te_lora=None,
                                     targets=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    # rac-lora with p=0.5: some links train A against a random frozen B, others B against a random A
    ref = Refactorer(unet, method=method, chain_every=2, **({"p": 0.5} if method == "rac-lora" else {}))
    opt = ref.attach(torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2))
    x, t, enc, _, _ = inputs(False)
    for _ in range(steps):
        loss = (unet(x, t, enc).sample - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    reference = outputs(unet, [], False)  # merged base weights + the live link
    export_diffusers(tmp_path, unet, refactorer=ref, info={"method": method, "base_model": "tiny", "steps": 5})
    export_kohya(tmp_path, unet, refactorer=ref, name="chain")
    tensors = load_file(str(tmp_path / WEIGHT_NAME))
    assert {v.shape[0] for k, v in tensors.items() if "lora_A" in k} == {rank}
    for weight_name in (WEIGHT_NAME, "chain.safetensors"):
        pipe = load_into_pipeline(folder, tmp_path, weight_name, False, with_text_encoder=False)
        got = outputs(pipe.unet, [], False)
        torch.testing.assert_close(got[0], reference[0], rtol=1e-4, atol=1e-5)


def test_export_without_lora_is_a_clear_error(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(resolve_pretrained("tiny"), subfolder="unet")
    with pytest.raises(ExportError, match="no LoRA layers found"):
        export_diffusers(tmp_path, unet)
    assert not any(tmp_path.iterdir())
