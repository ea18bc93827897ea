"""Diffusion pipelines' training noise: the forward process of the scheduler's betas, whatever the sampler."""

from __future__ import annotations

import torch

from rlfree.diffusion.layouts import read_layout
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
    trainer = DiffusionTrainer(pipeline, args, weighted, str(text_pipeline), layout=read_layout(str(text_pipeline)))
    assert isinstance(trainer.noise_scheduler, DDPMScheduler)
    torch.testing.assert_close(trainer.noise_scheduler.alphas_cumprod, ddim_alphas)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert torch.isfinite(trainer.compute_loss(pipeline.unet, batch))


def test_the_flow_matching_euler_loop_on_the_exact_velocity_draws_the_mixture():
    """`denoise` under a flow-matching scheduler (no model-input scaling, unit initial noise) on the mixture's exact
    velocity field: the + frequency and each component's mean and spread are the mixture's. RLG between two exact
    fields at W = 0 and W = 1 gives the reference's and the tuned field's own samples, seed for seed."""
    import numpy as np

    from rlfree.diffusion import toy
    from rlfree.diffusion.pipeline import denoise

    count, plus = 2000, 0.3
    base, tuned = toy.MixtureVelocity([plus]), toy.MixtureVelocity([0.8])
    # Euler's own bias shrinks as 1/steps: each component's spread comes out 0.010 short at 50 steps, 0.005 at 100.
    samples = denoise(base, toy.flow_scheduler(), list(range(count)), None, 100).double()
    components = toy.component(samples)
    stderr = (plus * (1 - plus) / count) ** 0.5
    assert abs(components.mean() - plus) < 4 * stderr, components.mean()
    for k, mean in enumerate(toy.MEANS):
        pixels = samples[torch.from_numpy(components == k)]
        assert abs(pixels.mean().item() - mean) < 0.01 and abs(pixels.std().item() - toy.STD) < 0.01
    seeds = list(range(64))
    own = {name: denoise(field, toy.flow_scheduler(), seeds, None, 20) for name, field in (("base", base), ("tuned", tuned))}  # fmt: skip
    for scale, expected in ((0.0, own["base"]), (1.0, own["tuned"])):
        mixed = denoise(tuned, toy.flow_scheduler(), seeds, None, 20, ref_network=base, guidance_scale=scale)
        np.testing.assert_allclose(mixed.numpy(), expected.numpy(), atol=1e-6)
