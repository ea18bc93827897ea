"""`StableDiffusion3Pipeline` (SD3, SD3.5): an MMDiT transformer on VAE latents under a flow-matching Euler scheduler,
conditioned on two CLIP encoders' embeddings and pooled embeddings, with T5's (zeros where the pipeline holds no T5)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import StageInputError
from .base import Condition, Layout
from .transformer import attention_and_feed_forward


class SD3Layout(Layout):
    name: ClassVar[str] = "SD3 (StableDiffusion3Pipeline)"
    denoiser: ClassVar[str] = "transformer"
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    required: ClassVar[frozenset[str]] = frozenset(
        {"transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    )
    optional: ClassVar[frozenset[str]] = frozenset({"text_encoder_3", "tokenizer_3"})

    def check_resolution(self, resolution: int, path: str) -> None:
        step = self.vae_scale_factor * self.config["patch_size"]
        if resolution % step:
            raise StageInputError(f"--resolution {resolution}: {path} takes multiples of {step} (VAE × patch size)")

    def set_timesteps(self, scheduler, num_inference_steps: int, shape: tuple[int, ...]) -> None:
        """As the pipeline: a resolution-dependent shift where the scheduler asks for one (SD3.5 does not)."""
        if scheduler.config.get("use_dynamic_shifting"):
            patch = self.config["patch_size"]
            tokens = (shape[-2] // patch) * (shape[-1] // patch)
            scheduler.set_timesteps(num_inference_steps, mu=resolution_shift(scheduler, tokens, max_shift=1.16))
        else:
            scheduler.set_timesteps(num_inference_steps)

    @torch.no_grad()
    def condition(self, pipeline, prompts: list[str], class_labels: torch.Tensor | None, device) -> Condition:
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def null_condition(self, pipeline, count: int, null_class: int | None, device) -> Condition:
        return self.condition(pipeline, [""] * count, None, device)  # the pipeline's negative: the empty prompt

    def predict(self, network, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return network(hidden_states=x, timestep=t.expand(len(x)), **condition).sample

    def lora_targets(self, network: torch.nn.Module) -> list[str]:
        return attention_and_feed_forward(network)


def resolution_shift(scheduler, tokens: int, max_shift: float) -> float:
    """mu of a dynamically shifted flow-matching schedule for `tokens` image tokens, as the pipelines'
    `calculate_shift` (linear in the token count between the scheduler's base and max sequence lengths)."""
    config = scheduler.config
    base_tokens, max_tokens = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return tokens * slope + base_shift - slope * base_tokens
