"""Classifier-free guidance as soft best-of-N (`--cfg_best_of_n N`; anthology eq. 35-37), for conditional diffusion
pipelines: N samples of p(x|c), one picked ∝ p(c|x)^w, with log p(c|x) estimated from the pipeline's own conditional
and unconditional denoising losses (`rlfree.diffusion.classifier`); the picks tend to p(x|c)·p(c|x)^w."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from ..data import check_output_dir
from ..diffusion.classifier import check_null_class, classify
from ..errors import StageInputError
from ..options import Options
from ..stages.generate import generate
from .base import Sampler, SampleSettings
from .picking import candidates_config, pick_dataset, save_picks, with_costs


@dataclass(kw_only=True)
class ClassifierOptions(Options):
    """Classifier-free guidance as soft best-of-N (anthology eq. 35-37), for class-conditional diffusion pipelines."""

    cfg_best_of_n: int | None = field(
        default=None,
        metadata={
            "help": "Candidates N per pick, drawn from p(x|c); one picked ∝ p(c|x)^--cfg_scale, log p(c|x) estimated "
            "by the pipeline's conditional minus unconditional denoising losses (a class-conditional pipeline needs "
            "--null_class; a text-to-image one's null condition is the empty prompt)."
        },
    )
    cfg_scale: float = field(
        default=1.0,
        metadata={
            "help": "w: picks tend to p(x|c)·p(c|x)^w, what CFG's guidance scale 1 + w aims at; 0 = no guidance."
        },
    )
    null_class: int | None = field(
        default=None,
        metadata={
            "help": "Class-conditional pipelines: the class label the UNet was trained with in place of a dropped "
            "condition (its null class)."
        },
    )
    classifier_estimates: int = field(
        default=16,
        metadata={"help": "Draws of (t, noise) per candidate estimating log p(c|x); each costs 2 UNet passes."},
    )


class CFGBestOfN(Sampler):
    name = "cfg_best_of_n"
    flag = "--cfg_best_of_n"
    usage = "--cfg_best_of_n N (conditional diffusion pipelines)"
    options = ClassifierOptions
    uses_reward = False

    def selected(self, config: SampleSettings) -> bool:
        return config.cfg_best_of_n is not None

    def check(self, config: SampleSettings) -> None:
        if config.family.name != "diffusion":
            raise StageInputError(
                f"--cfg_best_of_n picks by a diffusion pipeline's own classifier; {config.model_name_or_path} is not a "
                "pipeline folder (for a language model use --soft_best_of_n with a reward)"
            )
        check_null_class(config.model_name_or_path, config.null_class)
        for flag in ("cfg_best_of_n", "classifier_estimates"):
            if getattr(config, flag) < 1:
                raise StageInputError(f"--{flag} must be >= 1, got {getattr(config, flag)}")
        if not config.cfg_scale >= 0:
            raise StageInputError(f"--cfg_scale must be >= 0 (0 = no guidance), got {config.cfg_scale}")
        if config.reward or config.reward_model:
            raise StageInputError(
                "--cfg_best_of_n picks by the pipeline's own p(c|x), not a reward; drop --reward/--reward_model (or use "
                "--soft_best_of_n)"
            )

    def run(self, config: SampleSettings) -> Dataset:
        """N samples of p(x|c) per pick, each with its estimate of log p(c|x) (`classified/`), one picked ∝ p(c|x)^w."""
        root, n = Path(config.output_dir), config.cfg_best_of_n
        check_output_dir(root / "picked", "sampling", asdict(config), {})
        generate(candidates_config(config, n))
        classified = classify(
            root / "candidates", root / "classified", config.model_name_or_path, config.null_class,
            config.classifier_estimates, config.seed, config.batch_size, config.dtype,
        )  # fmt: skip
        log_weight = config.cfg_scale * torch.tensor(classified["class_log_ratio"], dtype=torch.float64)
        picked = pick_dataset(classified, log_weight, n, config.num_picks, config.seed)
        passes = config.family.passes_per_sample
        costs = with_costs(picked, classified, config, n, passes, False, extra_passes=2 * config.classifier_estimates)
        return save_picks(costs, config, self.name, root / "classified")

    def describe(self, settings: dict) -> str:
        return f"N={settings['cfg_best_of_n']} w={settings['cfg_scale']} K={settings['classifier_estimates']}"


CFG_BEST_OF_N = CFGBestOfN()
