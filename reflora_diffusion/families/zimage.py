"""Z-Image: single-stream DiT over a list of latents, one Qwen3 text encoder behind a chat template, rectified flow.

Follows diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py (diffusers 0.42 era): LoRA on the attention
projections (to_q, to_k, to_v, to_out.0), the transformer only; prompts go through the tokenizer's chat template
and the encoder's second-to-last hidden states, each prompt keeping only its real tokens (a list of variable-length
embeddings); the transformer takes the latents as a list of (C, 1, H, W) items and the timestep as (1000 - t) / 1000,
and predicts the negative velocity.
"""

from __future__ import annotations

import torch

from .flow import FlowFamily

SAMPLE_SIZE = 128  # ZImagePipeline's default 1024 px at the VAE's factor 8 (its transformer config has no size)


class ZImage(FlowFamily):
    name = "zimage"
    label = "Z-Image"
    block_lists = ("layers",)
    pipeline = "ZImagePipeline"
    denoiser_class = "ZImageTransformer2DModel"
    n_text_encoders = 1  # Qwen3
    lora_text_encoders = 0  # ZImagePipeline's LoRA loader has the transformer only
    default_weighting = "none"  # the example's default (uniform timesteps)
    default_max_sequence_length = 512
    kohya = True  # as the original checkpoint's layout (original_layout), which diffusers' reader takes
    original_layout = True
    hub_tag = "z-image"
    presets = ("tiny-zimage",)
    resolution = 1024

    def matches(self, index: dict) -> bool:
        return index.get("_class_name", "").startswith("ZImage")

    def matches_name(self, hub_id: str) -> bool:
        return "z-image" in hub_id.lower()

    def default_targets(self, denoiser) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0"]

    def sample_size(self, denoiser_config: dict) -> int:
        return int(denoiser_config.get("sample_size", SAMPLE_SIZE))

    def pixel_multiple(self, vae_factor: int, denoiser_config: dict) -> int:
        return vae_factor * int(denoiser_config.get("all_patch_size", (2,))[0])

    def negative_prompt_cached(self) -> bool:
        return True  # the pipeline's classifier-free guidance needs the empty prompt's embeddings

    def encode_text(self, text_encoders, tokenizers, prompts, device):
        # ZImagePipeline._encode_prompt: chat template, padded to the training length, hidden_states[-2], real tokens
        tok = tokenizers[0]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True) for p in prompts]
        enc = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        mask = enc.attention_mask.to(device).bool()
        hidden = text_encoders[0](input_ids=enc.input_ids.to(device), attention_mask=mask,
                                  output_hidden_states=True).hidden_states[-2]
        return [h[m] for h, m in zip(hidden, mask)], None

    def batch_embeds(self, per_prompt: list):
        return list(per_prompt)  # variable lengths: the transformer takes a list

    def cached_prompt_kwargs(self, hidden, pooled, prefix=""):
        return {f"{prefix}prompt_embeds": [hidden]}

    def predict(self, transformer, config, noisy, timesteps, hidden, pooled, guidance_scale):
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, list(hidden),
                          return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
