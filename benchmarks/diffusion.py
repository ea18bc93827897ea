"""Reward-weighted fine-tuning of a diffusion model against its base, on the Gaussian-mixture toy (rlfree.diffusion.toy).

pi_ref is a 1×4×4 UNet fitted to a mixture with 30% on the + component; the reward is 1 on the + component, so the
exact target's + frequency is pi_ref's tilted by exp(1/beta). The stages run as a user runs them (generate 1,024
samples, score, weight at beta, train), and a control trains with the same schedule, unweighted, on a multinomial
resample of the weighted data: the two should land together if the weighting is all that differs. Reported: the +
frequency (the mean reward) of 2,000 samples of each, and the KL between component frequencies to pi_ref (a lower
bound on the models' KL, whose within-component shapes barely move).

    python benchmarks/diffusion.py            # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
from datasets import Dataset

from rlfree.data import read_sidecars, save_stage
from rlfree.diffusion import toy
from rlfree.diffusion.pipeline import denoise, load_pipeline, to_images
from rlfree.lm.trainer import RLFreeConfig
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.score import ScoreConfig, score
from rlfree.stages.train import ModelConfig, train
from rlfree.stages.weight import WeightConfig, weight


def plus_frequency(folder: Path, count: int = 2000) -> float:
    pipeline = load_pipeline(str(folder))
    samples = denoise(pipeline.unet, pipeline.scheduler, list(range(10**6, 10**6 + count)), None, 20)
    return float(toy.component(to_images(samples)).mean())


def bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def resample(weighted: Dataset, seed: int) -> Dataset:
    """Rows drawn in proportion to their weights, then weighted uniformly: the target as plain data."""
    rows = np.random.default_rng(seed).choice(len(weighted), len(weighted), p=np.array(weighted["weight"]) / np.sum(weighted["weight"]))  # fmt: skip
    uniform = [1.0 / len(weighted)] * len(weighted)
    return weighted.select(rows.tolist()).remove_columns("weight").add_column("weight", uniform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=1200, help="Fine-tuning steps (batch 64, constant 3e-3).")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="diffusion-benchmark-"))
    toy.build_pipeline(root / "base")
    toy.train_base(root / "base", 0.3, steps=400)
    generate(GenerateConfig(str(root / "base"), None, str(root / "gen"), num_samples=1024, num_inference_steps=20, batch_size=256))  # fmt: skip
    score(ScoreConfig(reward=["rlfree.diffusion.toy:plus_component_reward"], input_dir=str(root / "gen"), output_dir=str(root / "scored")))  # fmt: skip
    weighted = weight(WeightConfig(str(root / "scored"), str(root / "weighted"), "rlhf", beta=args.beta))
    sidecar = read_sidecars(root / "weighted")["weighting"]
    save_stage(resample(weighted, 0), root / "resampled", "weighting", sidecar, input_dir=root / "weighted")
    for name in ("weighted", "resampled"):
        train(
            ModelConfig(model_name_or_path=str(root / "base")),
            RLFreeConfig(
                output_dir=str(root / f"tuned-{name}"), dataset_dir=str(root / name), max_steps=args.steps,
                per_device_train_batch_size=64, learning_rate=3e-3, lr_scheduler_type="constant", report_to=[],
                disable_tqdm=True, logging_steps=10**6,
            ),
        )  # fmt: skip
    base = plus_frequency(root / "base")
    rows = {
        "pi_ref": base,
        "rlfree (weighted denoising)": plus_frequency(root / "tuned-weighted"),
        "control (unweighted, on a resample)": plus_frequency(root / "tuned-resampled"),
        "exact tilt of pi_ref": float(toy.tilted_plus_weight(base, args.beta)),
    }
    print(f"\nbeta {args.beta}, {args.steps} fine-tuning steps; + frequency = mean reward (2,000 samples each)")
    print("| model | + frequency | KL of component weights to pi_ref |\n|---|---|---|")
    for name, frequency in rows.items():
        print(f"| {name} | {frequency:.3f} | {bernoulli_kl(frequency, base):.3f} |")


if __name__ == "__main__":
    main()
