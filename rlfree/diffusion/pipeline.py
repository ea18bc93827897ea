"""Loading a diffusers pipeline, drawing seeded samples from it, and its denoising loss.

Supported: pixel-space pipelines made of a `UNet2DModel` and a scheduler (`DDPMPipeline`'s layout), unconditional
or class-conditional (`num_class_embeds`: the prompts are class labels). The loop is written here rather than calling
`pipeline(...)`: every sample's noise, at the start and at every stochastic step, comes from its own generator seeded
by (seed, prompt, sample), so a sample does not depend on the batch it was drawn in, and the stored sample is the
model-space tensor the trainer needs, not only the image.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import StageInputError
from ..lm.modeling import as_reference, default_device, resolve_dtype


def unet_config(path: str) -> dict:
    """The pipeline's UNet config, read without loading weights (to check prompts before any work)."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    if "unet" not in index or "scheduler" not in index:
        raise StageInputError(
            f"--model_name_or_path {path}: a {index.get('_class_name', 'pipeline')} without a `unet` and a "
            "`scheduler`; rlfree supports pixel-space UNet pipelines (DDPMPipeline's layout) so far"
        )
    extra = sorted(set(index) - {"unet", "scheduler"} - {key for key in index if key.startswith("_")})
    if extra:
        raise StageInputError(
            f"--model_name_or_path {path}: components {extra} (text encoder, VAE, ...) are not supported yet; "
            "rlfree supports pixel-space UNet pipelines (unet + scheduler) so far"
        )
    return json.loads((Path(path) / "unet" / "config.json").read_text())


def num_classes(config: dict) -> int | None:
    """How many class labels a class-conditional UNet takes; None for an unconditional one."""
    return config.get("num_class_embeds")


def load_pipeline(path: str, dtype: str = "auto", device: torch.device | None = None):
    """The pipeline in eval mode on `device` (CUDA when present); float32 on CPU."""
    from diffusers import DiffusionPipeline

    unet_config(path)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    pipeline = DiffusionPipeline.from_pretrained(path, **({} if torch_dtype == "auto" else {"dtype": torch_dtype}))
    pipeline.unet.eval()
    return pipeline.to(device)


def sample_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return unet.config.in_channels, height, width


@torch.no_grad()
def denoise(
    unet,
    scheduler,
    noise_seeds: list[int],
    class_labels: torch.Tensor | None,
    num_inference_steps: int,
    ref_unet=None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Samples in model space, one per seed: the scheduler's reverse process with per-sample generators.

    With `ref_unet`, every step uses RLG's mix of the two predictions, ref + w·(unet - ref) (2508.21016): w = 0 is the
    reference, 1 the tuned model, w > 1 extrapolates. `ref_unet` may be `AdapterOff(unet)`: a LoRA-tuned UNet with its
    adapter switched off is its own base."""
    scheduler = copy.deepcopy(scheduler)  # set_timesteps and multistep solvers keep state
    scheduler.set_timesteps(num_inference_steps)
    generators = [torch.Generator().manual_seed(seed) for seed in noise_seeds]
    noise = torch.stack([torch.randn(sample_shape(unet), generator=generator) for generator in generators])
    x = noise.to(unet.device, unet.dtype) * scheduler.init_noise_sigma
    labels = None if class_labels is None else class_labels.to(unet.device)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = unet(model_input, t, class_labels=labels).sample
        if ref_unet is not None:
            with as_reference(ref_unet) as reference:
                ref_output = reference(model_input, t, class_labels=labels).sample
            output = ref_output + guidance_scale * (output - ref_output)
        x = scheduler.step(output, t, x, generator=generators).prev_sample
    return x


def predicted_noise(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """The network's output as a noise prediction, whatever it predicts (epsilon, v_prediction or sample)."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return b * noisy + a * output
    if prediction_type == "sample":
        return (noisy - a * output) / b
    raise StageInputError(f"the scheduler's prediction_type {prediction_type!r} is not supported")


def to_images(samples: torch.Tensor) -> np.ndarray:
    """[B, H, W, C] floats in [0, 1], exactly as `DDPMPipeline(output_type="np")` turns its samples into images."""
    return (samples / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


def is_flow_matching(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def denoising_loss(
    unet, scheduler, samples: torch.Tensor, class_labels: torch.Tensor | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample denoising loss ||target - prediction||² (mean over pixels) at a random time and noise.

    The target is what the scheduler's config says the network predicts: the noise (epsilon), the velocity
    (v_prediction), the clean sample (sample), or noise - x0 for flow matching (x_t = (1 - s)·x0 + s·noise).
    """
    batch = samples.shape[0]
    noise = torch.randn(samples.shape, generator=generator, device=samples.device, dtype=samples.dtype)
    if is_flow_matching(scheduler):
        sigma = torch.rand(batch, generator=generator, device=samples.device, dtype=samples.dtype)
        expand = sigma.view(-1, *([1] * (samples.dim() - 1)))
        noisy = (1 - expand) * samples + expand * noise
        timesteps = sigma * scheduler.config.num_train_timesteps
        target = noise - samples
    else:
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=samples.device
        )
        noisy = scheduler.add_noise(samples, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(samples, noise, timesteps)
        elif prediction_type == "sample":
            target = samples
        else:
            raise StageInputError(f"the scheduler's prediction_type {prediction_type!r} is not supported")
    prediction = unet(noisy, timesteps, class_labels=class_labels).sample
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
