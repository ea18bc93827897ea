"""Reward-weighted fine-tuning of a diffusion model against its base, on the Gaussian-mixture toy (rlfree.diffusion.toy),
and classifier-free guidance as soft best-of-N against its exact finite-N target.

pi_ref is a 1×4×4 UNet fitted to a mixture with 30% on the + component; the reward is 1 on the + component, so the
exact target's + frequency is pi_ref's tilted by exp(1/beta). The stages run as a user runs them (generate 1,024
samples with all 100 denoising steps, score, weight at beta, train), repeated over training seeds, beside two
references on the same weighted data:
- a control, plain (unweighted) training with the same recipe on a multinomial resample of the weighted data: it
  targets the same tilt, so where both land away from it is the UNet's fit, not the weighting;
- the same trainer on a model family that holds the tilt exactly (the mixture's closed-form denoiser with a learnable
  + weight), where no fit error stands between the loss and its optimum.
Reported: the + frequency (the mean reward) of 2,000 samples of each (with all 100 steps), the KL between component
frequencies to pi_ref (a lower bound on the models' KL, whose within-component shapes barely move), RLG's + frequency
by guidance scale W, and the CFG estimator's cost, noise and picks.

    python benchmarks/diffusion.py            # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from datasets import Dataset

from rlfree.data import read_sidecars, save_stage
from rlfree.diffusion import toy
from rlfree.diffusion.classifier import class_log_ratio
from rlfree.diffusion.layouts.base import to_images
from rlfree.diffusion.pipeline import PIXEL_UNET, denoise, load_pipeline
from rlfree.diffusion.trainer import DiffusionTrainer
from rlfree.samplers.picking import pick_dataset
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.sample import SampleConfig, sample
from rlfree.stages.score import ScoreConfig, score
from rlfree.stages.train import train
from rlfree.stages.weight import WeightConfig, weight
from rlfree.training import ModelConfig, RLFreeConfig

STEPS = 100  # all of the scheduler's steps: the DDPM sampler is then exact for an exact denoiser


def plus_frequency(folder: Path, count: int = 2000) -> float:
    pipeline = load_pipeline(str(folder))
    samples = denoise(pipeline.unet, pipeline.scheduler, list(range(10**6, 10**6 + count)), None, STEPS)
    return float(toy.component(to_images(samples)).mean())


def bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def span(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def fine_tuning(root: Path, args: argparse.Namespace) -> None:
    toy.build_pipeline(root / "base")
    toy.train_base(root / "base", 0.3, steps=400)
    generate(GenerateConfig(str(root / "base"), None, str(root / "gen"), num_samples=args.samples, num_inference_steps=STEPS, batch_size=256))  # fmt: skip
    score(ScoreConfig(reward=["rlfree.diffusion.toy:plus_component_reward"], input_dir=str(root / "gen"), output_dir=str(root / "scored")))  # fmt: skip
    weighted = weight(WeightConfig(str(root / "scored"), str(root / "weighted"), "rlhf", beta=args.beta))
    sidecar = read_sidecars(root / "weighted")["weighting"]
    save_stage(toy.resample(weighted, 0), root / "resampled", "weighting", sidecar, input_dir=root / "weighted")
    frequencies: dict[str, list[float]] = {"weighted": [], "resampled": []}
    for seed in range(args.seeds):
        for data in frequencies:
            train(
                ModelConfig(model_name_or_path=str(root / "base")),
                RLFreeConfig(
                    output_dir=str(root / f"tuned-{data}-{seed}"), dataset_dir=str(root / data), max_steps=args.steps,
                    per_device_train_batch_size=256, learning_rate=3e-3, lr_scheduler_type="linear", seed=seed,
                    report_to=[], disable_tqdm=True, logging_steps=10**6, save_strategy="no",
                ),
            )  # fmt: skip
            frequencies[data].append(plus_frequency(root / f"tuned-{data}-{seed}"))
    family = toy.MixtureDenoiser(toy.scheduler(), [0.3], learnable=True)
    family_args = RLFreeConfig(
        output_dir=str(root / "family"), dataset_dir=str(root / "weighted"), max_steps=400, learning_rate=0.05,
        per_device_train_batch_size=256, lr_scheduler_type="linear", report_to=[], disable_tqdm=True,
        logging_steps=10**6, save_strategy="no",
    )  # fmt: skip
    DiffusionTrainer(
        SimpleNamespace(unet=family, scheduler=toy.scheduler(), components={}), family_args, weighted, "base",
        layout=PIXEL_UNET,
    ).train()  # fmt: skip
    base = plus_frequency(root / "base")
    w, reward = np.array(weighted["weight"]), np.array(weighted["reward"])
    rows = {
        "pi_ref": [base],
        f"rlfree (weighted denoising), {args.seeds} training seeds": frequencies["weighted"],
        "control (unweighted, on a resample), same seeds": frequencies["resampled"],
        "weighted data (Σ w·r)": [float((w * reward).sum() / w.sum())],
        "trainer on the exact-denoiser family (learnable + weight)": [family.plus_weights.item()],
        "exact tilt of pi_ref": [float(toy.tilted_plus_weight(base, args.beta))],
    }
    print(
        f"\nbeta {args.beta}, {args.samples} samples, {args.steps} steps (batch 256, 3e-3 linear); 2,000 samples each"
    )
    print("| model | + frequency: mean (range) | KL of component weights to pi_ref |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {span(values)} | {bernoulli_kl(float(np.mean(values)), base):.3f} |")

    print(f"\nRLG between the seed-0 fine-tune and pi_ref, {args.rlg_samples} samples per W, {STEPS} steps")
    print("| W | + frequency | exact tilt of pi_ref at beta/W |\n|---|---|---|")
    for scale in (0.0, 0.5, 1.0, 2.0):
        picks = sample(
            SampleConfig(
                str(root / "tuned-weighted-0"), None, str(root / f"rlg-{scale}"), guidance_scale=scale,
                ref_model=str(root / "base"), num_picks=args.rlg_samples, num_inference_steps=STEPS, batch_size=500,
            )
        )  # fmt: skip
        frequency = toy.component(np.array(picks["completion"])).mean()
        exact = toy.tilted_plus_weight(base, args.beta / scale) if scale else base
        print(f"| {scale} | {frequency:.3f} | {exact:.3f} |")


def classifier_guidance(args: argparse.Namespace) -> None:
    """The eq. 36-37 estimator with the mixture's exact denoiser (classes with 20% and 70% on +, null = their mix)."""
    plus_weights, null = (0.2, 0.7), 0.45
    denoiser = toy.MixtureDenoiser(toy.scheduler(), [*plus_weights, null])
    picks, scale = 2000, 1.0
    print(f"\nCFG as soft best-of-N, exact denoiser, w = {scale}, {picks} picks per class (class 1: 70% on +)")
    print(
        "| N | estimates K | UNet passes per candidate | estimate's std. error | picks + | exact best-of-N | N → ∞ |"
    )
    print("|---|---|---|---|---|---|---|")
    expected = np.log([(1 - plus_weights[1]) / (1 - null), plus_weights[1] / null])
    limit = plus_weights[1] * np.exp(scale * expected[1])
    limit /= limit + (1 - plus_weights[1]) * np.exp(scale * expected[0])
    for n, estimates in ((4, 16), (4, 64), (16, 16)):
        labels = torch.ones(picks * n, dtype=torch.long)
        samples = toy.mixture_samples(plus_weights[1], len(labels), torch.Generator().manual_seed(n + estimates))
        ratio, stderr = class_log_ratio(
            denoiser, toy.scheduler(), samples, {"class_labels": labels}, {"class_labels": torch.full_like(labels, 2)},
            list(range(len(labels))), estimates,
        )  # fmt: skip
        candidates = Dataset.from_dict({"prompt_index": [0] * len(labels), "sample_index": list(range(len(labels)))})
        picked = pick_dataset(candidates, scale * ratio, n, picks, seed=0)
        frequency = toy.component(samples)[np.array(picked["sample_index"])].mean()
        target = toy.finite_n_plus_frequency(plus_weights[1], tuple(scale * expected), n)
        print(
            f"| {n} | {estimates} | {2 * estimates} | {stderr.mean():.3f} | {frequency:.3f} | {target:.3f} | {limit:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=400, help="Fine-tuning steps (batch 256, 3e-3 decayed linearly).")
    parser.add_argument("--samples", type=int, default=1024, help="Base samples N (one unconditional group).")
    parser.add_argument("--seeds", type=int, default=3, help="Training seeds for the weighted fit and the control.")
    parser.add_argument("--rlg_samples", type=int, default=1000)
    args = parser.parse_args()
    classifier_guidance(args)
    fine_tuning(Path(tempfile.mkdtemp(prefix="diffusion-benchmark-")), args)


if __name__ == "__main__":
    main()
