"""`StableDiffusionXLPipeline`: a UNet on VAE latents conditioned on two CLIP encoders' embeddings, the second's
pooled embedding and the image's size and crop (SDXL's added time ids: original size, crop corner, target size)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import StageInputError
from .base import Condition, Layout
from .unet import unet_lora_targets


class SDXLLayout(Layout):
    name: ClassVar[str] = "SDXL (StableDiffusionXLPipeline)"
    denoiser: ClassVar[str] = "unet"
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    required: ClassVar[frozenset[str]] = frozenset(
        {"unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    )

    @classmethod
    def check_config(cls, path: str, pipeline_class: str, config: dict) -> None:
        if config.get("addition_embed_type") != "text_time":
            raise StageInputError(
                f"--model_name_or_path {path}: a {pipeline_class} whose UNet lacks SDXL's added time ids "
                f"(addition_embed_type {config.get('addition_embed_type')!r}, not 'text_time')"
            )

    @torch.no_grad()
    def condition(self, pipeline, prompts: list[str], class_labels: torch.Tensor | None, device) -> Condition:
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    @torch.no_grad()
    def null_condition(self, pipeline, count: int, null_class: int | None, device) -> Condition:
        """The pipeline's negative for no negative prompt: zeros where its config forces them
        (`force_zeros_for_empty_prompt`, SDXL base), else the empty prompt's embeddings."""
        _, embeds, _, pooled = pipeline.encode_prompt([""] * count, device=device, do_classifier_free_guidance=True)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, network, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The added time ids say the image was neither resized nor cropped: (H, W, 0, 0, H, W) in pixels, as the
        pipeline's defaults."""
        height, width = (side * self.vae_scale_factor for side in x.shape[-2:])
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=x.device, dtype=x.dtype)
        added = {"text_embeds": condition["text_embeds"], "time_ids": time_ids.expand(len(x), 6)}
        return network(x, t, encoder_hidden_states=condition["encoder_hidden_states"], added_cond_kwargs=added).sample

    def lora_targets(self, network: torch.nn.Module) -> list[str]:
        return unet_lora_targets(network)
