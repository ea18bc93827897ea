"""A diffusion task whose tilted target is known in closed form: small images from a mixture of two Gaussians.

Every pixel of an image of component k is mu_k + sigma·noise (mu = -0.3 or +0.3): the component of a sample is the
sign of its mean pixel, with no ambiguity at these scales. A reward that depends on the component tilts the
component weights exactly: p*(k) ∝ p(k)·exp(r_k/beta), and leaves each component's shape alone. Against the base
*model's* own component frequencies (not the data's: pi_ref is the model), that is the target every stage is checked
against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

MEANS = (-0.3, 0.3)
STD = 0.3
SIZE = 4


def component(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """1 for the + component, 0 for the - one, from images in [0, 1] ([B, H, W, C]) or samples in [-1, 1]."""
    values = np.asarray(images, dtype=np.float64)
    centre = 0.5 if values.min() >= 0 else 0.0
    return (values.reshape(len(values), -1).mean(1) > centre).astype(np.int64)


def plus_component_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """1.0 for an image of the + component (bright), else 0.0: images as `pipeline(output_type="np")` gives them."""
    return component(np.stack(completions)).astype(float).tolist()


def tilted_plus_weight(plus_weight: float | np.ndarray, beta: float) -> float | np.ndarray:
    """The + component's weight in p(x)·exp(r(x)/beta) for the 0/1 component reward."""
    tilted = plus_weight * np.exp(1 / beta)
    return tilted / (tilted + 1 - plus_weight)


def build_pipeline(folder: str | Path, num_class_embeds: int | None = None, seed: int = 0, sample_size: int = SIZE):
    """A tiny random UNet2DModel (1 channel, `sample_size` pixels square) with a 100-step cosine DDPM scheduler, saved
    as a DDPMPipeline folder. Trailing timestep spacing: sampling with fewer steps still starts at the last, pure-noise
    step (the default "leading" spacing starts short of it, which skews the mixture weights a sampler reproduces)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=num_class_embeds,
    )  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(folder)
    return pipeline


def fit_pipeline(
    folder: str | Path,
    draw_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor | None]],
    steps: int,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> None:
    """Fit the pipeline in `folder` by plain denoising on batches from `draw_batch` (samples, class labels or None) and
    save it back: how the toy pi_ref and the digits demo's base are trained."""
    from diffusers import DDPMPipeline

    from .pipeline import denoising_loss

    pipeline = DDPMPipeline.from_pretrained(folder)
    unet, scheduler = pipeline.unet.train(), pipeline.scheduler
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    for _ in range(steps):
        samples, labels = draw_batch(generator)
        loss = denoising_loss(unet, scheduler, samples, labels, generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    pipeline.unet.eval()
    pipeline.save_pretrained(folder)


def train_base(folder: str | Path, plus_weight: float, steps: int = 400, batch_size: int = 64, seed: int = 0) -> None:
    """Fit the unconditional pipeline in `folder` to the mixture with `plus_weight` on the + component: the toy
    pi_ref, in about 40 s on 2 CPU cores."""

    def draw_batch(generator: torch.Generator) -> tuple[torch.Tensor, None]:
        plus = torch.rand(batch_size, generator=generator) < plus_weight
        means = torch.where(plus, MEANS[1], MEANS[0]).view(-1, 1, 1, 1)
        return means + STD * torch.randn(batch_size, 1, SIZE, SIZE, generator=generator), None

    fit_pipeline(folder, draw_batch, steps, seed=seed)
