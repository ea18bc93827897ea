"""`FluxPipeline` (FLUX.1): a transformer on 2×2-packed VAE latents under a flow-matching Euler scheduler with a
resolution-dependent shift, conditioned on T5's embeddings and CLIP's pooled embedding, and (FLUX.1-dev) on an
embedded guidance value. Samples are stored unpacked, [C, H, W], as the VAE reads them."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ...errors import StageInputError
from .base import Condition
from .transformer import TransformerLayout, resolution_shift

# The guidance a guidance-distilled Flux transformer is given (the pipeline's default `guidance_scale`), in sampling
# and in training, as diffusers' Flux training script does.
EMBEDDED_GUIDANCE = 3.5
DEFAULT_SAMPLE_SIZE = 128  # the pipeline's default latent size: 1024 pixels with FLUX.1's VAE


class FluxLayout(TransformerLayout):
    name: ClassVar[str] = "Flux (FluxPipeline)"
    pipelines: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    flow_times: ClassVar[str] = "uniform"  # diffusers' Flux scripts: weighting_scheme "none"

    def sample_shape(self, resolution: int | None) -> tuple[int, int, int]:
        size = DEFAULT_SAMPLE_SIZE if resolution is None else 2 * (resolution // (2 * self.vae_scale_factor))
        return self.config["in_channels"] // 4, size, size

    def check_resolution(self, resolution: int, path: str) -> None:
        step = 2 * self.vae_scale_factor
        if resolution % step:
            raise StageInputError(f"--resolution {resolution}: {path} takes multiples of {step} (VAE × 2×2 packing)")

    def set_timesteps(self, scheduler, num_inference_steps: int, shape: tuple[int, ...]) -> None:
        """As the pipeline: sigmas evenly spaced from 1 to 1/steps, shifted by the image's token count."""
        sigmas = (
            None
            if scheduler.config.get("use_flow_sigmas")
            else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        )
        tokens = (shape[-2] // 2) * (shape[-1] // 2)
        scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=resolution_shift(scheduler, tokens, 1.15))

    @torch.no_grad()
    def condition(self, pipeline, prompts: list[str], class_labels: torch.Tensor | None, device) -> Condition:
        embeds, pooled, _ = pipeline.encode_prompt(prompts, None, device=device)
        condition = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.config.get("guidance_embeds"):
            condition["guidance"] = torch.full((len(prompts),), EMBEDDED_GUIDANCE, device=device)
        return condition

    def predict(self, network, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        batch, channels, height, width = x.shape
        packed = x.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
        image_ids = torch.zeros(height // 2, width // 2, 3, device=x.device, dtype=x.dtype)
        image_ids[..., 1] += torch.arange(height // 2, device=x.device)[:, None]
        image_ids[..., 2] += torch.arange(width // 2, device=x.device)[None, :]
        text = condition["encoder_hidden_states"]
        output = network(
            hidden_states=packed,
            timestep=t.expand(batch).to(x.dtype) / 1000,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype),
            img_ids=image_ids.reshape(-1, 3),
            **condition,
        ).sample
        output = output.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return output.reshape(batch, channels, height, width)
