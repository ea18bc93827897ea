"""Diffusion pipelines' training noise: the forward process of the scheduler's betas, whatever the sampler."""

from __future__ import annotations

import torch

from rlfree.diffusion.pipeline import load_pipeline
from rlfree.training import RLFreeConfig

BRIGHTNESS = "tests.helpers:brightness"


def test_training_noise_follows_the_forward_process_whatever_the_sampler(
    text_pipeline, text_prompts, sample_score_weight, tmp_path
):
    """A pipeline whose scheduler is a sampler with its own units (Euler: x + sigma·eps) trains on the DDPM forward
    process of the same betas, as diffusers' training scripts do, not on the sampler's add_noise."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from rlfree.diffusion.trainer import DiffusionTrainer

    weighted = sample_score_weight(tmp_path, text_pipeline, text_prompts, BRIGHTNESS, 0.1, num_samples=2, num_inference_steps=2)  # fmt: skip
    pipeline = load_pipeline(str(text_pipeline))
    ddim_alphas = pipeline.scheduler.alphas_cumprod
    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    args = RLFreeConfig(output_dir=str(tmp_path / "x"), dataset_dir=str(tmp_path / "weighted"), report_to=[])
    trainer = DiffusionTrainer(pipeline, args, weighted, str(text_pipeline))
    assert isinstance(trainer.noise_scheduler, DDPMScheduler)
    torch.testing.assert_close(trainer.noise_scheduler.alphas_cumprod, ddim_alphas)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert torch.isfinite(trainer.compute_loss(pipeline.unet, batch))
