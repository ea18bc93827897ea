"""Loading a diffusers pipeline, drawing seeded samples from it, and its denoising loss, whatever its layout
(`rlfree.diffusion.layouts`: UNet pipelines in pixel space or with a text encoder, SDXL, SD3, Flux). The loop is
written here rather than calling `pipeline(...)`: every sample's noise, at the start and at every stochastic step,
comes from its own generator seeded by (seed, prompt, sample), so a sample does not depend on the batch it was drawn
in, and the stored sample is the model-space tensor (pixels or latents) the trainer needs, not only the image.
"""

from __future__ import annotations

import copy
import inspect

import torch

from ..adapters import as_reference
from ..device import default_device, resolve_dtype
from ..errors import StageInputError
from .layouts import Condition, Layout, null_components, read_layout
from .layouts.unet import UNetLayout

# The layout of a pixel-space UNet (the toy models, DDPMPipeline): the default of the functions below.
PIXEL_UNET = UNetLayout(config={}, conditioning="none")


def load_pipeline(path: str, dtype: str = "auto", device: torch.device | None = None):
    """The pipeline in eval mode on `device` (CUDA when present); float32 on CPU."""
    from diffusers import DiffusionPipeline

    layout = read_layout(path)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    dtype_kwargs = {} if torch_dtype == "auto" else {"dtype": torch_dtype}
    pipeline = DiffusionPipeline.from_pretrained(path, **null_components(path), **dtype_kwargs)
    layout.network(pipeline).eval()
    return pipeline.to(device)


def default_shape(network) -> tuple[int, int, int]:
    """[C, H, W] of a sample of a denoiser whose config gives its channels and sample size (a UNet, the toy models)."""
    size = network.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return network.config.in_channels, height, width


def joined(first: Condition, second: Condition) -> Condition:
    """Two conditionings as one batch, `first` ahead."""
    return {key: torch.cat([first[key], second[key]]) for key in first}


def predict(
    network,
    x: torch.Tensor,
    t,
    condition: Condition,
    null_condition: Condition | None,
    cfg_scale: float,
    layout: Layout,
) -> torch.Tensor:
    """The denoiser's output at (x, t); with `null_condition`, classifier-free guidance as diffusers pipelines apply it:
    uncond + cfg_scale·(cond - uncond), both halves in one batch."""
    t = torch.as_tensor(t, device=x.device)
    if null_condition is None:
        return layout.predict(network, x, t, condition)
    both = layout.predict(network, torch.cat([x, x]), t, joined(null_condition, condition))
    unconditional, conditional = both.chunk(2)
    return unconditional + cfg_scale * (conditional - unconditional)


@torch.no_grad()
def denoise(
    network,
    scheduler,
    noise_seeds: list[int],
    condition: Condition | None,
    num_inference_steps: int,
    ref_network=None,
    guidance_scale: float = 1.0,
    null_condition: Condition | None = None,
    cfg_scale: float = 1.0,
    layout: Layout = PIXEL_UNET,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Samples in model space, one per seed, of `shape` (default: the denoiser's sample size): the scheduler's reverse
    process with per-sample generators, each step a pass of the denoiser as `layout` drives it.

    `condition` holds the denoiser's conditioning (`Layout.condition`); with `null_condition`, each prediction is
    classifier-free guided at `cfg_scale`. With `ref_network`, every step uses RLG's mix of the two (guided)
    predictions, ref + w·(network - ref) (2508.21016): w = 0 is the reference, 1 the tuned model, w > 1 extrapolates.
    `ref_network` may be `AdapterOff(network)`: a LoRA-tuned denoiser with its adapter switched off is its own base."""
    shape = shape or default_shape(network)
    scheduler = copy.deepcopy(scheduler)  # set_timesteps and multistep solvers keep state
    layout.set_timesteps(scheduler, num_inference_steps, shape)
    generators = [torch.Generator().manual_seed(seed) for seed in noise_seeds]
    noise = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
    # Flow-matching schedulers start from unit noise and take the model input as it is.
    x = noise.to(network.device, network.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    condition = condition or {}
    # As the pipelines' prepare_extra_step_kwargs: only stochastic steps take the generators.
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_input = scale(x, t)
        output = predict(network, model_input, t, condition, null_condition, cfg_scale, layout)
        if ref_network is not None:
            with as_reference(ref_network) as reference:
                ref_output = predict(reference, model_input, t, condition, null_condition, cfg_scale, layout)
            output = ref_output + guidance_scale * (output - ref_output)
        x = scheduler.step(output, t, x, **step_kwargs).prev_sample
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


def is_flow_matching(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def noise_scheduler(scheduler):
    """The forward process to train and score with: a DDPMScheduler built from the pipeline's scheduler config (its
    betas, training steps and prediction type), as diffusers' training scripts do. The pipeline's own scheduler may be
    a sampler (PNDM, Euler, DPM-Solver) whose `add_noise` works in other units or needs `set_timesteps` first. A
    flow-matching scheduler is its own forward process: a fresh copy holds the training sigmas (with the model's
    shift), before any `set_timesteps`."""
    from diffusers import DDPMScheduler

    if is_flow_matching(scheduler):
        return type(scheduler).from_config(scheduler.config)
    return DDPMScheduler.from_config(scheduler.config)


# How flow-matching training draws its times, as diffusers' SD3 training script does by default (2403.03206, §3.1):
# u = sigmoid(n), n ~ N(LOGIT_MEAN, LOGIT_STD), picks one of the scheduler's training sigmas, with a loss weight of 1
# (Flux's script draws u uniformly, also with weight 1).
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


def denoising_loss(
    network,
    scheduler,
    samples: torch.Tensor,
    condition: Condition | None,
    generators: list[torch.Generator] | None = None,
    layout: Layout = PIXEL_UNET,
) -> torch.Tensor:
    """Per-sample denoising loss ||target - prediction||² (mean over pixels) at a random time and noise; `condition`
    holds the denoiser's conditioning (`Layout.condition`). With `generators`, one per sample, each sample's time and
    noise come from its own generator (on the CPU), so they do not depend on the batch, the device or the process.

    The target is what the scheduler's config says the network predicts: the noise (epsilon), the velocity
    (v_prediction), the clean sample (sample), or noise - x0 for flow matching (x_t = (1 - s)·x0 + s·noise, with s one
    of the scheduler's training sigmas, picked by u ∈ [0, 1) as diffusers' training scripts do: u logit-normal
    (`LOGIT_MEAN`, `LOGIT_STD`; SD3) or uniform (Flux), as `layout.flow_times` says; `scheduler` is then a fresh one,
    as `noise_scheduler` makes it).
    """
    batch, shape = samples.shape[0], samples.shape[1:]
    flow = is_flow_matching(scheduler)
    logit_normal = flow and layout.flow_times == "logit_normal"
    draw_time = torch.randn if logit_normal else torch.rand  # a logit-normal time's normal, else uniform
    if generators is None:
        noise, time = torch.randn(samples.shape), draw_time(batch)
    else:
        noise = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
        time = torch.cat([draw_time(1, generator=generator) for generator in generators])
    noise, time = noise.to(samples.device, samples.dtype), time.to(samples.device)
    if flow:
        steps = scheduler.config.num_train_timesteps
        u = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * time) if logit_normal else time
        index = (u * steps).long().clamp_max(steps - 1)
        sigma = scheduler.sigmas[index.cpu()].to(samples.device, samples.dtype)
        expand = sigma.view(-1, *([1] * len(shape)))
        noisy = (1 - expand) * samples + expand * noise
        timesteps = scheduler.timesteps[index.cpu()].to(samples.device)
        target = noise - samples
    else:
        steps = scheduler.config.num_train_timesteps
        timesteps = (time * steps).long().clamp_max(steps - 1)
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
    prediction = layout.predict(network, noisy, timesteps, condition or {})
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
