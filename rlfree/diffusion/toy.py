"""A diffusion task whose tilted target is known in closed form: small images from a mixture of two Gaussians.

Every pixel of a sample of component k is mu_k + sigma·noise in model space (mu = -0.3 or +0.3, sigma = 0.3; the
image is sample/2 + 1/2): the component of a sample is the sign of its mean pixel, with no ambiguity at these
scales. A reward that depends on the component tilts the component weights exactly: p*(k) ∝ p(k)·exp(r_k/beta), and
leaves each component's shape alone. Against the base *model's* own component frequencies (not the data's: pi_ref is
the model), that is the target every stage is checked against. `MixtureDenoiser` is the exact noise prediction of
such mixtures (a perfectly trained UNet, in closed form) and `MixtureVelocity` their exact flow-matching velocity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from datasets import Dataset

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


def finite_n_plus_frequency(plus: float, log_weight: tuple[float, float], n: int) -> float:
    """P(the pick is +) when one of n candidates, each + with probability `plus`, is picked ∝ exp(log_weight[k])
    (k = 0 for -, 1 for +): exact, by enumerating how many candidates are +. Soft best-of-N's finite-N target."""
    minus_weight, plus_weight = math.exp(log_weight[0]), math.exp(log_weight[1])
    return sum(
        math.comb(n, m)
        * plus**m
        * (1 - plus) ** (n - m)
        * m
        * plus_weight
        / (m * plus_weight + (n - m) * minus_weight)
        for m in range(1, n + 1)
    )


class MixtureModel(torch.nn.Module):
    """The class-conditional mixture of the two components, noised as x_t = a·x0 + b·eps, in closed form: what a
    perfectly trained network would output, called as a UNet is (`model(x_t, t, class_labels=...).sample`).

    `plus_weights[c]` is class c's + weight; the last entry may be the null class (the mixture over classes). Given
    component k, x_t is N(a·mu_k, v·I) with v = a²·STD² + b², E[x0 | x_t, k] = mu_k + a·STD²·(x_t - a·mu_k)/v and
    E[eps | x_t, k] = b·(x_t - a·mu_k)/v; averaged over the posterior of k. With `learnable`, the weights are
    parameters (as logits): a model family that holds the tilted target exactly, so that training it by the weighted
    loss must land on that target. Subclasses say what (a, b) a timestep means and what the network predicts.
    """

    def __init__(self, plus_weights: list[float], learnable: bool = False):
        super().__init__()
        logits = torch.tensor(plus_weights, dtype=torch.float64).logit()
        self.plus_logits = torch.nn.Parameter(logits) if learnable else torch.nn.Buffer(logits)
        self.config = SimpleNamespace(sample_size=SIZE, in_channels=1, num_class_embeds=None)

    @property
    def plus_weights(self) -> torch.Tensor:
        return self.plus_logits.sigmoid()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def scales(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of x_t = a·x0 + b·eps at each timestep, shaped [B, 1, 1, 1]."""
        raise NotImplementedError

    def output(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network predicts, from the posterior means of the clean sample and the noise."""
        raise NotImplementedError

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None):
        x = noisy.double()
        a, b = self.scales(torch.as_tensor(timesteps).expand(len(x)))
        variance = a**2 * STD**2 + b**2
        labels = torch.zeros(len(x), dtype=torch.long) if class_labels is None else class_labels.long().cpu()
        plus = self.plus_weights[labels]
        log_joint = []
        for mean, weight in ((MEANS[0], 1 - plus), (MEANS[1], plus)):
            squared = (x - a * mean).pow(2).flatten(1).sum(1) / variance.flatten()
            log_joint.append(weight.log() - squared / 2)
        posterior_plus = torch.softmax(torch.stack(log_joint, 1), 1)[:, 1].view(-1, 1, 1, 1)
        mean = MEANS[0] + posterior_plus * (MEANS[1] - MEANS[0])
        clean, noise = mean + a * STD**2 * (x - a * mean) / variance, b * (x - a * mean) / variance
        return SimpleNamespace(sample=self.output(clean, noise).float())


class MixtureDenoiser(MixtureModel):
    """The exact noise prediction E[eps | x_t] under a DDPM scheduler's alphas (`MixtureModel`)."""

    def __init__(self, scheduler, plus_weights: list[float], learnable: bool = False):
        super().__init__(plus_weights, learnable)
        self.alpha_bars = scheduler.alphas_cumprod.double()

    def scales(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alpha_bars[timesteps.long()].view(-1, 1, 1, 1)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def output(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise


class MixtureVelocity(MixtureModel):
    """The exact rectified-flow velocity E[eps - x0 | x_t], x_t = (1 - s)·x0 + s·eps with s = timestep / 1000, as
    SD3's and Flux's transformers predict it under their flow-matching schedulers (`MixtureModel`)."""

    def __init__(self, plus_weights: list[float], learnable: bool = False, num_train_timesteps: int = 1000):
        super().__init__(plus_weights, learnable)
        self.num_train_timesteps = num_train_timesteps

    def scales(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = (timesteps.double() / self.num_train_timesteps).view(-1, 1, 1, 1)
        return 1 - sigma, sigma

    def output(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - clean


def mixture_log_density(samples: torch.Tensor, plus_weight: float) -> torch.Tensor:
    """log p(x) of model-space samples under the mixture with `plus_weight` on the + component (float64)."""
    x = samples.double().flatten(1)
    logs = [
        math.log(weight) - (x - mean).pow(2).sum(1) / (2 * STD**2)
        for mean, weight in ((MEANS[0], 1 - plus_weight), (MEANS[1], plus_weight))
    ]
    return torch.logsumexp(torch.stack(logs, 1), 1) - x.shape[1] * math.log(STD * math.sqrt(2 * math.pi))


def flow_scheduler():
    """A flow-matching Euler scheduler without a shift (SD3's scheduler class; SD3 itself shifts by 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def scheduler():
    """The toy's 100-step cosine DDPM scheduler. Trailing timestep spacing: sampling with fewer steps still starts at the
    last, pure-noise step (the default "leading" spacing starts short of it, which skews the mixture weights a sampler
    reproduces)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")


def build_pipeline(folder: str | Path, num_class_embeds: int | None = None, seed: int = 0, sample_size: int = SIZE):
    """A tiny random UNet2DModel (1 channel, `sample_size` pixels square) with the toy's `scheduler`, saved as a
    DDPMPipeline folder."""
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=num_class_embeds,
    )  # fmt: skip
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler())
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
        condition = None if labels is None else {"class_labels": labels}
        loss = denoising_loss(unet, scheduler, samples, condition, [generator] * len(samples)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    pipeline.unet.eval()
    pipeline.save_pretrained(folder)


def mixture_samples(plus_weight: float | torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` model-space samples ([count, 1, SIZE, SIZE]) of the mixture with `plus_weight` on + (one weight, or
    one per sample)."""
    plus = torch.rand(count, generator=generator) < plus_weight
    means = torch.where(plus, MEANS[1], MEANS[0]).view(-1, 1, 1, 1)
    return means + STD * torch.randn(count, 1, SIZE, SIZE, generator=generator)


def train_base(folder: str | Path, plus_weight: float, steps: int = 400, batch_size: int = 64, seed: int = 0) -> None:
    """Fit the unconditional pipeline in `folder` to the mixture with `plus_weight` on the + component: the toy
    pi_ref, in about 40 s on 2 CPU cores."""
    fit_pipeline(
        folder, lambda generator: (mixture_samples(plus_weight, batch_size, generator), None), steps, seed=seed
    )


def resample(weighted: Dataset, seed: int) -> Dataset:
    """The control for weighted training: as many rows, drawn in proportion to their weights, then weighted uniformly.
    Plain (unweighted) denoising on it targets the same tilt, so a fit that lands elsewhere on both is the model's
    fit, not the weighting. Systematic resampling over the rows sorted by weight (one uniform, N evenly spaced
    positions on the CDF) matches the weighted mass of every run of equal weights to 1/N: with a reward of a few
    values, the resample's reward shares are the weighted ones; a multinomial draw would add its own noise (±0.014
    at N = 1,024)."""
    weights = np.array(weighted["weight"], dtype=np.float64)
    order = np.argsort(weights, kind="stable")
    positions = (np.random.default_rng(seed).random() + np.arange(len(weights))) / len(weights)
    cdf = np.cumsum(weights[order] / weights.sum())
    rows = order[np.minimum(np.searchsorted(cdf, positions), len(weights) - 1)]
    uniform = [1.0 / len(weighted)] * len(weighted)
    return weighted.select(rows.tolist()).remove_columns("weight").add_column("weight", uniform)
