"""Classifier-free guidance as soft best-of-N (anthology §3.2, eq. 35-37): a conditional pipeline's own classifier,
log p(c|x), estimated from its conditional and unconditional denoising losses.

Picking one of N samples of p(x|c) with probability ∝ p(c|x)^w tends, as N grows, to p(x|c)·p(c|x)^w (eq. 35): the
distribution classifier-free guidance with scale 1 + w aims at but does not reach. The "unconditional" model is the
same UNet given the null condition it was trained with in place of a dropped one: a class-conditional UNet's null
class (`--null_class`), a text-to-image UNet's empty prompt. The estimates are a stage of their own (`classified/`:
written in shards, resumed), each with its standard error; `rlfree sample` picks.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from datasets import Dataset

from ..data import folder_stamp, load_stage, process_state, run_in_shards
from ..errors import StageInputError
from ..seeds import stream_seed
from .layouts import Condition, Layout, read_layout
from .pipeline import PIXEL_UNET, is_flow_matching, joined, load_pipeline, noise_scheduler, predicted_noise

COLUMNS = ("class_log_ratio", "class_log_ratio_stderr")


def elbo_weights(scheduler) -> torch.Tensor:
    """The DDPM variational bound's weight on E||eps - eps_hat(x_t, t)||² at each training step t (summed over
    pixels): ½(SNR(t-1)/SNR(t) - 1), SNR = abar/(1 - abar) (Ho et al. 2020, eq. 12, with the posterior variance); t = 0,
    the decoder term, gets 0. Eq. 37's p_t is these, normalized."""
    if not hasattr(scheduler, "alphas_cumprod"):
        raise StageInputError(
            f"{type(scheduler).__name__} has no discrete noise schedule (alphas_cumprod): the classifier estimate "
            "needs a DDPM-family scheduler"
        )
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar)
    return torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * (snr[:-1] / snr[1:] - 1)])


# Flow matching: the bound's time weight (1 - t)/t grows without limit as t -> 0, where the model was never trained
# (its training sigmas start at 1/num_train_timesteps); times are drawn from [FLOW_MIN_TIME, 1] and the sliver below it
# is left out. There the conditional and unconditional predictions agree (x_t is x_0 and the posterior over conditions
# is the same), so its share of the log ratio vanishes with it.
FLOW_MIN_TIME = 1e-3


@torch.no_grad()
def class_log_ratio(
    network,
    scheduler,
    samples: torch.Tensor,
    condition: Condition,
    null_condition: Condition,
    estimate_seeds: list[int],
    num_estimates: int,
    layout: Layout = PIXEL_UNET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(c|x) - log p(c) = log p(x|c) - log p(x), estimated as minus the difference of the conditional and the
    unconditional variational bounds (anthology eq. 36-37), the denoiser's conditioning given as `condition` and
    `null_condition` (`Layout.condition`, `Layout.null_condition`):

        -sum_t lambda_t E_eps[ ||eps - eps(x_t|c, t)||² - ||eps - eps(x_t|null, t)||² ],  lambda_t = `elbo_weights`.

    Eq. 37 draws t from p_t ∝ lambda_t and drops the sum of the lambdas, a constant factor that would silently rescale
    the guidance strength w; the sum is kept here. `num_estimates` draws of (t, eps) per sample, shared by both terms,
    from a generator seeded per sample (a sample's estimate does not depend on its batch). t is drawn uniformly and
    reweighted by lambda_t·T: unbiased, and far less noisy than drawing t ∝ lambda_t, which spends its draws on the
    last steps, where lambda_t is largest and the condition barely moves the prediction (on the toy's cosine schedule,
    one draw's standard deviation is 1.3 uniform against 14 ∝ lambda_t, over 2,048 draws).

    Under a flow-matching scheduler (x_t = (1 - t)·x + t·eps, the network predicts v = eps - x) the bound is the
    continuous-time one: with lambda = log SNR = 2·log((1 - t)/t), -dlambda/dt = 2/(t(1 - t)), and eps - eps_hat =
    (1 - t)·(v - v_hat), so the weight on ||v - v_hat||² is (1 - t)/t, with t uniform on [`FLOW_MIN_TIME`, 1].

    Returns the mean and its standard error per sample (float64, on the CPU).
    """
    flow = is_flow_matching(scheduler)
    generators = [torch.Generator().manual_seed(seed) for seed in estimate_seeds]
    shape = samples.shape[1:]
    if flow:
        times = torch.stack([torch.rand(num_estimates, generator=g, dtype=torch.float64) for g in generators])
        times = FLOW_MIN_TIME + (1 - FLOW_MIN_TIME) * times  # [B, K]
        importance = (1 - times) / times * (1 - FLOW_MIN_TIME)  # the weight over the uniform density of t
    else:
        weights = elbo_weights(scheduler)
        steps_used = torch.nonzero(weights > 0).view(-1)
        # [B, K] steps: each sample's draws from its own generator, in one call each.
        times = steps_used[
            torch.stack([torch.randint(len(steps_used), (num_estimates,), generator=g) for g in generators])
        ]
        importance = weights[times] * len(steps_used)  # lambda_t / (uniform probability of t)
        alpha_bars = scheduler.alphas_cumprod.double()
    noises = torch.stack([torch.randn((num_estimates, *shape), generator=g) for g in generators])  # [B, K, *shape]
    both = joined(condition, null_condition)
    pixels = [1] * len(shape)
    estimates = torch.empty(len(samples), num_estimates, dtype=torch.float64)
    for draw in range(num_estimates):
        noise = noises[:, draw].to(samples.device, samples.dtype)
        if flow:
            t = times[:, draw].view(-1, *pixels).to(samples.device, samples.dtype)
            noisy = ((1 - t) * samples + t * noise).repeat(2, *pixels)
            timesteps = (times[:, draw] * scheduler.config.num_train_timesteps).to(samples.device, samples.dtype)
            output = layout.predict(network, noisy, timesteps.repeat(2), both).double()
            target = (noise - samples).double().repeat(2, *pixels)
        else:
            step = times[:, draw].to(samples.device)
            noisy = scheduler.add_noise(samples, noise, step).repeat(2, *pixels)
            output = layout.predict(network, noisy, step.repeat(2), both)
            alpha_bar = alpha_bars[times[:, draw]].view(-1, *pixels).repeat(2, *pixels)
            output = predicted_noise(
                output.double(), noisy.double(), alpha_bar.to(samples.device), scheduler.config.prediction_type
            )
            target = noise.double().repeat(2, *pixels)
        errors = (output - target).pow(2).flatten(1).sum(1).cpu()
        conditional, unconditional = errors.chunk(2)
        estimates[:, draw] = -importance[:, draw] * (conditional - unconditional)
    stderr = estimates.std(1) / num_estimates**0.5 if num_estimates > 1 else torch.full((len(samples),), math.nan)
    return estimates.mean(1), stderr


def check_null_class(path: str, null_class: int | None) -> None:
    """The pipeline is conditional, and `null_class` is one of its labels (class-conditional) or unset (text: the
    null condition is the empty prompt)."""
    layout = read_layout(path)
    if layout.conditioning == "none":
        raise StageInputError(
            f"--cfg_best_of_n needs a conditional pipeline (class labels or text); {path} is unconditional: there is "
            "no p(c|x) to guide by (use --soft_best_of_n with a reward)"
        )
    if layout.conditioning == "text" and null_class is not None:
        raise StageInputError(
            f"--null_class {null_class}: {path} is a text-to-image pipeline, whose null condition is the empty prompt; "
            "drop --null_class"
        )
    classes = layout.num_classes
    if layout.conditioning == "class" and (null_class is None or not 0 <= null_class < classes):
        raise StageInputError(
            f"--null_class {null_class}: give the class label (0..{classes - 1}) {path} was trained with in place of "
            "a dropped condition (label dropout); log p(c|x) compares the prediction given c with the one given it"
        )


def classify(
    input_dir: str | Path,
    output_dir: str | Path,
    model_name_or_path: str,
    null_class: int | None,
    num_estimates: int,
    seed: int,
    batch_size: int,
    dtype: str = "auto",
    shard_size: int = 1024,
) -> Dataset:
    """Add `class_log_ratio` (the estimate of log p(c|x) - log p(c)) and its standard error to every sample of
    `input_dir`, a diffusion `generate` output of `model_name_or_path`; each sample's draws of (t, eps) come from
    (seed, prompt, sample), so the estimate does not depend on batching, sharding or processes."""
    state = process_state()
    layout = read_layout(model_name_or_path)
    text = layout.conditioning == "text"
    condition_column = "prompt" if text else "class_label"
    columns = ["sample", condition_column, "prompt_index", "sample_index"]
    dataset = load_stage(input_dir, tuple(columns), stage="classifying")
    null = "" if text else null_class
    if null in set(dataset.unique(condition_column)):
        raise StageInputError(
            f"the null condition ({'the empty prompt' if text else f'--null_class {null_class}'}) is also a prompt's "
            "condition: p(null|x) means nothing; drop those prompts"
        )
    settings = {
        "model_name_or_path": model_name_or_path,
        "model_stamp": folder_stamp(model_name_or_path),
        "null_class": null_class,
        "classifier_estimates": num_estimates,
        "seed": seed,
        "input_fingerprint": dataset._fingerprint,
    }

    @functools.cache
    def pipeline():
        return load_pipeline(model_name_or_path, dtype, state.device)

    @functools.cache
    def forward_process():
        return noise_scheduler(pipeline().scheduler)

    def make_shard(rows: range) -> Dataset:
        shard = dataset.select(rows)
        table = shard.select_columns(columns).with_format("torch")
        estimates, stderrs = [], []
        for start in range(0, len(shard), batch_size):
            batch = table[start : start + batch_size]
            count = len(batch["sample"])
            condition = layout.condition(pipeline(), batch.get("prompt"), batch.get("class_label"), state.device)
            null_condition = layout.null_condition(pipeline(), count, null_class, state.device)
            keys = zip(batch["prompt_index"].tolist(), batch["sample_index"].tolist(), strict=True)
            network = layout.network(pipeline())
            mean, stderr = class_log_ratio(
                network, forward_process(), batch["sample"].to(state.device, network.dtype), condition,
                null_condition, [stream_seed(seed, "classifier", p, s) for p, s in keys], num_estimates, layout,
            )  # fmt: skip
            estimates += mean.tolist()
            stderrs += stderr.tolist()
        return shard.add_column(COLUMNS[0], estimates).add_column(COLUMNS[1], stderrs)

    def finish(classified: Dataset) -> tuple[Dataset, dict]:
        stderr = torch.tensor(classified[COLUMNS[1]], dtype=torch.float64)
        return classified, {
            "classifier": {
                "unet_passes_per_sample": 2 * num_estimates,
                "mean_stderr": float(stderr.mean()) if num_estimates > 1 else None,
            }
        }

    return run_in_shards(
        output_dir, "classifying", settings, len(dataset), shard_size, make_shard, input_dir=input_dir, finish=finish
    )
