"""`rlfree demo --family diffusion`: reward-weighted fine-tuning of a class-conditional UNet on 8×8 digits, offline.

scikit-learn's digits (1,797 images, shipped with the package) train a small class-conditional UNet from scratch;
then the five stages run on it as on any pipeline: generate N samples per digit, score them with a reward you can
see (ink: the mean brightness of the strokes), weight by exp(r/beta) per digit, train on the weighted denoising loss,
and sample again with the same seeds. Before/after grids and reward histograms land in the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk

from ..diffusion import toy
from ..stages.checks import check_outputs
from ..stages.generate import GenerateConfig, generate
from ..stages.score import ScoreConfig, score
from ..stages.train import train
from ..stages.weight import WeightConfig, weight
from ..training import ModelConfig, RLFreeConfig
from . import DemoConfig

REWARD = "rlfree.demos.digits:ink_reward"
# Sized to finish in a few minutes on 2 CPU cores; the base's steps are most of it.
BASE_STEPS, BASE_BATCH = 1500, 128
SAMPLES_PER_DIGIT, INFERENCE_STEPS = 32, 50
TUNE_STEPS, TUNE_LEARNING_RATE = 300, 1e-3


def ink_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """The mean brightness of an image in [0, 1] (bright strokes on a dark ground): thicker strokes score higher."""
    return [float(np.mean(image)) for image in completions]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as [n, 1, 8, 8] samples in [-1, 1] (0 = dark ground, 16 = full ink), and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    return images, torch.tensor(data.target)


def train_base(folder: Path, steps: int, seed: int) -> None:
    images, labels = digits()

    def draw_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(images), (BASE_BATCH,), generator=generator)
        return images[rows], labels[rows]

    toy.build_pipeline(folder, num_class_embeds=10, seed=seed, sample_size=8)
    toy.fit_pipeline(folder, draw_batch, steps, seed=seed)


def save_comparison(before: Path, after: Path, path: Path) -> None:
    """The before and after grids side by side, and the two reward histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = {name: load_from_disk(str(folder)).with_format("numpy")[:] for name, folder in (("before", before), ("after", after))}  # fmt: skip
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    for axis, (name, rows) in zip(axes[:2], datasets.items(), strict=True):
        order = np.lexsort((rows["sample_index"], rows["prompt_index"]))
        shown = rows["completion"][order].reshape(10, SAMPLES_PER_DIGIT, 8, 8)[:, :8]
        axis.imshow(shown.transpose(0, 2, 1, 3).reshape(80, 64), cmap="gray", vmin=0, vmax=1)
        axis.set_title(f"{name}: 8 samples per digit (rows 0-9)")
        axis.axis("off")
    for name, rows in datasets.items():
        axes[2].hist(rows["reward"], bins=30, alpha=0.6, label=name)
    axes[2].set_xlabel("ink reward (mean brightness)")
    axes[2].set_ylabel("samples")
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def stage_configs(config: DemoConfig, out: Path) -> dict[str, tuple]:
    """The configs of the demo's stages in `out` (a tuple each, as the stage functions take them): generate, score,
    weight and train on the base, then generate and score again from the fine-tuned pipeline (`after`, `after_score`).
    """
    sampling = {"num_samples": SAMPLES_PER_DIGIT, "num_inference_steps": INFERENCE_STEPS, "batch_size": 160, "seed": config.seed}  # fmt: skip
    prompts = str(out / "digits.jsonl")
    return {
        "generate": (GenerateConfig(str(out / "base"), prompts, str(out / "generated"), **sampling),),
        "score": (ScoreConfig(reward=[REWARD], input_dir=str(out / "generated"), output_dir=str(out / "scored")),),
        "weight": (WeightConfig(str(out / "scored"), str(out / "weighted"), "rlhf", beta=config.beta),),
        "train": (
            ModelConfig(model_name_or_path=str(out / "base")),
            RLFreeConfig(
                output_dir=str(out / "model"),
                dataset_dir=str(out / "weighted"),
                max_steps=TUNE_STEPS,
                learning_rate=TUNE_LEARNING_RATE,
                per_device_train_batch_size=64,
                lr_scheduler_type="constant",
                seed=config.seed,
                report_to="none",
                disable_tqdm=True,
                logging_steps=100,
            ),
        ),
        "after": (GenerateConfig(str(out / "model"), prompts, str(out / "after"), **sampling),),
        "after_score": (
            ScoreConfig(reward=[REWARD], input_dir=str(out / "after"), output_dir=str(out / "after_scored")),
        ),
    }


def run_digits_demo(config: DemoConfig) -> dict[str, dict[str, float]]:
    """Run the diffusion demo end to end; returns the mean ink per model: the base, the fine-tuned pipeline, and pi*
    as estimated from the weighted base samples."""
    start = time.time()
    out = Path(config.output_dir)
    stages = stage_configs(config, out)
    # Every stage folder is checked before step 1 retrains the base: a run over an earlier one with other settings
    # stops here, not at step 2 with stage outputs that no longer match their base.
    check_outputs(stages.values())
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[1/6] training a class-conditional UNet on scikit-learn's 8x8 digits ({BASE_STEPS} steps) -> {out / 'base'}"
    )
    train_base(out / "base", BASE_STEPS, config.seed)
    (out / "digits.jsonl").write_text("".join(json.dumps({"prompt": str(digit)}) + "\n" for digit in range(10)))
    print(f"[2/6] rlfree generate: {SAMPLES_PER_DIGIT} samples x 10 digits, {INFERENCE_STEPS} denoising steps")
    generate(*stages["generate"])
    print(f"[3/6] rlfree score --reward {REWARD}")
    score(*stages["score"])
    print(f"[4/6] rlfree weight --weighting rlhf --beta {config.beta}")
    weighted = weight(*stages["weight"])
    print(f"[5/6] rlfree train: weighted denoising loss, {TUNE_STEPS} steps")
    train(*stages["train"])
    print("[6/6] rlfree generate from the fine-tuned pipeline (same seeds) and score")
    generate(*stages["after"])
    after = score(*stages["after_score"])
    reward, weights = np.array(weighted["reward"]), np.array(weighted["weight"])
    figures = {
        "base (before)": {"mean_ink": float(reward.mean())},
        "rlfree (after)": {"mean_ink": float(np.mean(after["reward"]))},
        # Self-normalized within each digit, summed over digits: the weights estimate E_pi*[r] per digit.
        "pi* (estimate)": {"mean_ink": float((weights * reward).sum() / 10)},
    }
    save_comparison(out / "scored", out / "after_scored", out / "digits.png")
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "results": figures}, indent=2) + "\n")
    before, after_ink, target = (figures[name]["mean_ink"] for name in figures)
    print(
        f"\nmean ink: base {before:.3f} -> fine-tuned {after_ink:.3f} "
        f"(pi* at beta {config.beta}, estimated from the weighted base samples: {target:.3f})"
    )
    print(f"plot: {out / 'digits.png'}   grids: {out / 'after' / 'grids'}   took {time.time() - start:.0f} s")
    return figures
