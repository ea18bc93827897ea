"""`StableDiffusion3Pipeline` (SD3, SD3.5): an MMDiT transformer on VAE latents under a flow-matching Euler scheduler,
conditioned on two CLIP encoders' embeddings and pooled embeddings, with T5's (zeros where the pipeline holds no T5)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import StageInputError
from .base import Condition
from .transformer import TransformerLayout, resolution_shift


class SD3Layout(TransformerLayout):
    name: ClassVar[str] = "SD3 (StableDiffusion3Pipeline)"
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
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

    def predict(self, network, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return network(hidden_states=x, timestep=t.expand(len(x)), **condition).sample
