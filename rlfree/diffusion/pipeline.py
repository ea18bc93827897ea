"""Loading a diffusers pipeline, drawing seeded samples from it, and its denoising loss.

Supported: UNet pipelines, in pixel space (`DDPMPipeline`'s layout: unet + scheduler), unconditional or
class-conditional (`num_class_embeds`: the prompts are class labels), or in a VAE's latent space with a text encoder
(`StableDiffusionPipeline`'s layout: the prompts are text). The loop is written here rather than calling
`pipeline(...)`: every sample's noise, at the start and at every stochastic step, comes from its own generator seeded
by (seed, prompt, sample), so a sample does not depend on the batch it was drawn in, and the stored sample is the
model-space tensor (pixels or latents) the trainer needs, not only the image.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters import as_reference
from ..device import default_device, resolve_dtype
from ..errors import StageInputError
from ..sources import model_file

TEXT_COMPONENTS = {"unet", "scheduler", "vae", "text_encoder", "tokenizer"}
# Components a text-to-image pipeline may hold and rlfree leaves alone (saved as null when absent).
IGNORED_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder"}


@dataclass(frozen=True)
class Layout:
    """What a pipeline folder holds, read without loading weights: its UNet's config and how the UNet is conditioned
    ("none", "class": class labels, "text": a text encoder's embeddings of the prompt, in a VAE's latent space)."""

    unet: dict
    conditioning: str

    @property
    def num_classes(self) -> int | None:
        return self.unet.get("num_class_embeds") if self.conditioning == "class" else None


def read_layout(path: str) -> Layout:
    """The pipeline's layout, or a clear refusal of what rlfree cannot sample or train yet."""
    index = json.loads(model_file(path, "model_index.json").read_text())
    name = index.get("_class_name", "pipeline")
    components = {key for key, value in index.items() if not key.startswith("_") and value and value[0] is not None}
    if "unet" not in components or "scheduler" not in components:
        raise StageInputError(
            f"--model_name_or_path {path}: a {name} without a `unet` and a `scheduler` (a transformer-based pipeline, "
            "as SD3 or Flux, or a VQ model); rlfree supports UNet pipelines: DDPMPipeline's layout (unet + scheduler) "
            "and StableDiffusionPipeline's (+ vae, text_encoder, tokenizer)"
        )
    extra = sorted(components - TEXT_COMPONENTS - IGNORED_COMPONENTS)
    text = "text_encoder" in components
    missing = sorted(TEXT_COMPONENTS - components) if text else sorted(components & {"vae", "tokenizer"})
    if extra or missing:
        raise StageInputError(
            f"--model_name_or_path {path}: a {name} with components {sorted(components)}; rlfree supports "
            "DDPMPipeline's layout (unet + scheduler) and StableDiffusionPipeline's (unet, scheduler, vae, "
            f"text_encoder, tokenizer){f', not {extra}' if extra else f', and it lacks {missing}'}"
        )
    unet = json.loads(model_file(path, "unet/config.json").read_text())
    unsupported = [key for key in ("addition_embed_type", "time_cond_proj_dim") if unet.get(key) is not None]
    if unsupported:
        raise StageInputError(
            f"--model_name_or_path {path}: its UNet takes extra conditioning ({', '.join(unsupported)}: SDXL's added "
            "time ids or an LCM's guidance embedding), which rlfree does not supply yet"
        )
    conditioning = "text" if text else "class" if unet.get("num_class_embeds") else "none"
    return Layout(unet=unet, conditioning=conditioning)


def load_pipeline(path: str, dtype: str = "auto", device: torch.device | None = None):
    """The pipeline in eval mode on `device` (CUDA when present); float32 on CPU."""
    from diffusers import DiffusionPipeline

    read_layout(path)
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
def unet_condition(
    pipeline, class_labels: torch.Tensor | None = None, prompts: list[str] | None = None, device=None
) -> dict[str, torch.Tensor]:
    """The UNet's conditioning keyword arguments: the text encoder's embeddings of `prompts` for a text-to-image
    pipeline (as its own `encode_prompt` computes them), else `class_labels` (none for an unconditional UNet)."""
    device = device or pipeline.unet.device
    if getattr(pipeline, "text_encoder", None) is not None:
        return {"encoder_hidden_states": pipeline.encode_prompt(prompts, device, 1, False)[0]}
    return {} if class_labels is None else {"class_labels": class_labels.to(device)}


def predict(unet, x: torch.Tensor, t, condition: dict, null_condition: dict | None, cfg_scale: float) -> torch.Tensor:
    """The UNet's output at (x, t); with `null_condition`, classifier-free guidance as diffusers pipelines apply it:
    uncond + cfg_scale·(cond - uncond), both halves in one batch."""
    if null_condition is None:
        return unet(x, t, **condition).sample
    both = {key: torch.cat([null_condition[key], condition[key]]) for key in condition}
    unconditional, conditional = unet(torch.cat([x, x]), t, **both).sample.chunk(2)
    return unconditional + cfg_scale * (conditional - unconditional)


@torch.no_grad()
def denoise(
    unet,
    scheduler,
    noise_seeds: list[int],
    condition: dict | None,
    num_inference_steps: int,
    ref_unet=None,
    guidance_scale: float = 1.0,
    null_condition: dict | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Samples in model space, one per seed: the scheduler's reverse process with per-sample generators.

    `condition` holds the UNet's conditioning (`unet_condition`); with `null_condition`, each prediction is
    classifier-free guided at `cfg_scale`. With `ref_unet`, every step uses RLG's mix of the two predictions,
    ref + w·(unet - ref) (2508.21016): w = 0 is the reference, 1 the tuned model, w > 1 extrapolates. `ref_unet` may be
    `AdapterOff(unet)`: a LoRA-tuned UNet with its adapter switched off is its own base."""
    scheduler = copy.deepcopy(scheduler)  # set_timesteps and multistep solvers keep state
    scheduler.set_timesteps(num_inference_steps)
    generators = [torch.Generator().manual_seed(seed) for seed in noise_seeds]
    noise = torch.stack([torch.randn(sample_shape(unet), generator=generator) for generator in generators])
    # Flow-matching schedulers start from unit noise and take the model input as it is.
    x = noise.to(unet.device, unet.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    condition = condition or {}
    # As the pipelines' prepare_extra_step_kwargs: only stochastic steps take the generators.
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_input = scale(x, t)
        output = predict(unet, model_input, t, condition, null_condition, cfg_scale)
        if ref_unet is not None:
            with as_reference(ref_unet) as reference:
                ref_output = predict(reference, model_input, t, condition, null_condition, cfg_scale)
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


@torch.no_grad()
def to_images(samples: torch.Tensor, vae=None) -> np.ndarray:
    """[B, H, W, C] floats in [0, 1], exactly as the pipeline's `output_type="np"` turns its samples into images:
    latents go through the VAE's decoder first."""
    if vae is not None:
        latents = samples.to(vae.device, vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None) is not None:
            latents = latents + vae.config.shift_factor
        samples = vae.decode(latents, return_dict=False)[0]
    return (samples / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


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
# u = sigmoid(n), n ~ N(LOGIT_MEAN, LOGIT_STD), picks one of the scheduler's training sigmas, with a loss weight of 1.
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


def denoising_loss(
    unet, scheduler, samples: torch.Tensor, condition: dict | None, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Per-sample denoising loss ||target - prediction||² (mean over pixels) at a random time and noise; `condition`
    holds the UNet's conditioning (`unet_condition`). With `generators`, one per sample, each sample's time and noise
    come from its own generator (on the CPU), so they do not depend on the batch, the device or the process.

    The target is what the scheduler's config says the network predicts: the noise (epsilon), the velocity
    (v_prediction), the clean sample (sample), or noise - x0 for flow matching (x_t = (1 - s)·x0 + s·noise, with s one
    of the scheduler's training sigmas drawn as SD3 is trained: `LOGIT_MEAN`, `LOGIT_STD`; `scheduler` is then a fresh
    one, as `noise_scheduler` makes it).
    """
    batch, shape = samples.shape[0], samples.shape[1:]
    flow = is_flow_matching(scheduler)
    draw_time = (
        torch.randn if flow else torch.rand
    )  # the normal of a logit-normal time for flow matching, else uniform
    if generators is None:
        noise, time = torch.randn(samples.shape), draw_time(batch)
    else:
        noise = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
        time = torch.cat([draw_time(1, generator=generator) for generator in generators])
    noise, time = noise.to(samples.device, samples.dtype), time.to(samples.device)
    if flow:
        steps = scheduler.config.num_train_timesteps
        index = (torch.sigmoid(LOGIT_MEAN + LOGIT_STD * time) * steps).long().clamp_max(steps - 1)
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
    prediction = unet(noisy, timesteps, **(condition or {})).sample
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
