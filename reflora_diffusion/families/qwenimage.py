"""Qwen-Image: MMDiT over 2x2-packed latents, a Qwen2.5-VL text encoder behind a system prompt, a causal video VAE
used one frame at a time, rectified flow.

Follows diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py (diffusers 0.42 era): LoRA on the
attention projections (to_q, to_k, to_v, to_out.0); prompts in QwenImagePipeline's template, the last hidden states
with the template's first 34 tokens dropped, each prompt keeping its real tokens (padded per batch, with a mask);
latents ``(z - latents_mean) / latents_std`` per channel (the VAE's config), packed 2x2 with their (frame, h, w)
shapes; timestep / 1000.
"""

from __future__ import annotations

import torch

from .flow import FlowFamily

SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size: 1024 px at the VAE's factor 8
# QwenImagePipeline's prompt_template_encode and prompt_template_encode_start_idx
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34
TOKENIZER_MAX_LENGTH = 1024  # QwenImagePipeline.tokenizer_max_length


class QwenImage(FlowFamily):
    name = "qwenimage"
    label = "Qwen-Image"
    block_lists = ("transformer_blocks",)
    pipeline = "QwenImagePipeline"
    denoiser_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"
    n_text_encoders = 1  # Qwen2.5-VL
    lora_text_encoders = 0  # QwenImagePipeline's LoRA loader has the transformer only
    default_weighting = "none"
    default_max_sequence_length = 512  # QwenImagePipeline's max_sequence_length
    kohya = True  # as the original checkpoint's layout (original_layout), which diffusers' reader takes
    original_layout = True
    hub_tag = "qwen-image"
    presets = ("tiny-qwenimage",)
    resolution = 1024

    def matches(self, index: dict) -> bool:
        return index.get("_class_name", "") == "QwenImagePipeline"

    def matches_name(self, hub_id: str) -> bool:
        return "qwen-image" in hub_id.lower() and "edit" not in hub_id.lower()

    def default_targets(self, denoiser) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0"]

    def vae_factor(self, vae_config: dict) -> int:
        return 2 ** len(vae_config["temperal_downsample"])

    def sample_size(self, denoiser_config: dict) -> int:
        return SAMPLE_SIZE

    def pixel_multiple(self, vae_factor: int, denoiser_config: dict) -> int:
        return vae_factor * 2  # the 2x2 packing

    def encode_images(self, vae, pixels):
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist  # one frame
        return dist.mean.squeeze(2), dist.std.squeeze(2)

    def model_latents(self, vae, latents):
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) / std

    def encode_text(self, text_encoders, tokenizers, prompts, device):
        # as QwenImagePipeline.encode_prompt: its fixed tokenizer length, then --max_sequence_length after the drop
        tok = tokenizers[0]
        enc = tok([TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + DROP, padding=True,
                  truncation=True, return_tensors="pt").to(device)
        hidden = text_encoders[0](input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                  output_hidden_states=True).hidden_states[-1]
        return [h[m.bool()][DROP:][: tok.model_max_length] for h, m in zip(hidden, enc.attention_mask)], None

    def batch_embeds(self, per_prompt: list):
        return list(per_prompt)

    @staticmethod
    def _padded(hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(h.shape[0] for h in hidden)
        embeds = torch.stack([torch.cat([h, h.new_zeros(n - h.shape[0], h.shape[1])]) for h in hidden])
        mask = torch.stack([torch.arange(n, device=h.device) < h.shape[0] for h in hidden]).long()
        return embeds, mask

    def cached_prompt_kwargs(self, hidden, pooled, prefix=""):
        embeds, mask = self._padded([hidden])
        return {f"{prefix}prompt_embeds": embeds, f"{prefix}prompt_embeds_mask": mask}

    def predict(self, transformer, config, noisy, timesteps, hidden, pooled, guidance_scale):
        from diffusers import QwenImagePipeline as P

        b, c, h, w = noisy.shape
        embeds, mask = self._padded(list(hidden))
        out = transformer(hidden_states=P._pack_latents(noisy, b, c, h, w), encoder_hidden_states=embeds,
                          encoder_hidden_states_mask=mask, timestep=timesteps / 1000,
                          img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return P._unpack_latents(out, h, w, vae_scale_factor=1).squeeze(2)
