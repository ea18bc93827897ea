"""UNet pipelines: `DDPMPipeline`'s layout (unet + scheduler, in pixel space, unconditional or class-conditional) and
`StableDiffusionPipeline`'s (+ vae, text_encoder, tokenizer: the prompts are text, the samples latents)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import StageInputError
from .base import Condition, Layout

TEXT_COMPONENTS = frozenset({"vae", "text_encoder", "tokenizer"})


class UNetLayout(Layout):
    name: ClassVar[str] = "UNet (DDPMPipeline, StableDiffusionPipeline)"
    denoiser: ClassVar[str] = "unet"
    required: ClassVar[frozenset[str]] = frozenset({"unet", "scheduler"})

    @classmethod
    def serves(cls, pipeline_class: str, components: set[str]) -> bool:
        return "unet" in components  # any class name: unconditional pipelines are often custom

    @classmethod
    def check_config(cls, path: str, pipeline_class: str, config: dict) -> None:
        unsupported = [key for key in ("addition_embed_type", "time_cond_proj_dim") if config.get(key)]
        if unsupported:
            raise StageInputError(
                f"--model_name_or_path {path}: a {pipeline_class} whose UNet takes extra conditioning "
                f"({', '.join(unsupported)}: added time ids or an LCM's guidance embedding), which rlfree supplies "
                "only in StableDiffusionXLPipeline's layout"
            )

    @classmethod
    def required_for(cls, components: set[str]) -> frozenset[str]:
        """A text-to-image UNet needs all three text components; a pixel-space one none of them."""
        return cls.required | (TEXT_COMPONENTS if components & TEXT_COMPONENTS else frozenset())

    @classmethod
    def conditioning_of(cls, config: dict, components: set[str]) -> str:
        return "text" if "text_encoder" in components else "class" if config.get("num_class_embeds") else "none"

    @torch.no_grad()
    def condition(self, pipeline, prompts: list[str], class_labels: torch.Tensor | None, device) -> Condition:
        if self.conditioning == "text":
            return {"encoder_hidden_states": pipeline.encode_prompt(prompts, device, 1, False)[0]}
        return {} if class_labels is None else {"class_labels": class_labels.to(device)}

    @torch.no_grad()
    def null_condition(self, pipeline, count: int, null_class: int | None, device) -> Condition:
        if self.conditioning == "text":  # the pipeline's negative for no negative prompt: the empty prompt
            return {"encoder_hidden_states": pipeline.encode_prompt([""] * count, device, 1, False)[0]}
        return {"class_labels": torch.full((count,), null_class, device=device)}

    def predict(self, network, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return network(x, t, **condition).sample

    def lora_targets(self, network: torch.nn.Module) -> list[str]:
        return unet_lora_targets(network)


def unet_lora_targets(network: torch.nn.Module) -> list[str]:
    """Every linear layer (attention projections, time embeddings) and the 3×3 convolutions of the ResNet blocks,
    where a convolutional UNet keeps most of its weights."""
    return [
        name
        for name, module in network.named_modules()
        if isinstance(module, torch.nn.Linear)
        or (isinstance(module, torch.nn.Conv2d) and name.rsplit(".", 1)[-1] in ("conv1", "conv2"))
    ]
