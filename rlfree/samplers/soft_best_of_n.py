"""Soft best-of-N (`--soft_best_of_n N`): for each pick, draw N completions, score them, return one with probability
softmax_i(log w_i), log w_i = r_i/beta + log pi_ref(o_i|q) - log p(o_i|q): the weighting stage's log-weight, so the
picks target pi_ref·exp(r/beta) even with temperature/top-k/top-p. beta = 0 is hard best-of-N, the beta -> 0 limit:
only the highest-reward candidates can be picked, ties broken in proportion to pi_ref/p. Any family."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from ..data import check_output_dir
from ..errors import StageInputError
from ..options import Options
from ..stages.generate import generate
from ..stages.score import score, score_config
from ..stages.weight import proposal_correction
from ..weights import pick_log_weights
from .base import Sampler, SampleSettings
from .picking import candidate_groups, candidates_config, pick_dataset, save_picks, with_costs


@dataclass(kw_only=True)
class SoftBestOfNOptions(Options):
    """Soft best-of-N: one of N candidates, picked with probability softmax(r/beta)."""

    soft_best_of_n: int | None = field(default=None, metadata={"help": "Soft best-of-N: candidates N per pick."})


class SoftBestOfN(Sampler):
    name = "soft_best_of_n"
    flag = "--soft_best_of_n"
    usage = "--soft_best_of_n N with a reward"
    options = SoftBestOfNOptions
    uses_reward = True

    def selected(self, config: SampleSettings) -> bool:
        return config.soft_best_of_n is not None

    def check(self, config: SampleSettings) -> None:
        if config.soft_best_of_n < 1:
            raise StageInputError(f"--soft_best_of_n must be >= 1, got {config.soft_best_of_n}")
        if not config.beta >= 0 or math.isinf(config.beta):
            raise StageInputError(f"--beta must be finite and >= 0 (0 = hard best-of-N), got {config.beta}")

    def run(self, config: SampleSettings) -> Dataset:
        """Generate num_picks·N candidates per prompt, score them, pick; write output_dir/{candidates,scored,picked}."""
        root, n = Path(config.output_dir), config.soft_best_of_n
        check_output_dir(root / "picked", "sampling", asdict(config), {})
        generate(candidates_config(config, n))
        scored = score(score_config(config, root / "candidates", root / "scored"))
        correction = proposal_correction(scored, config.family)
        reward = torch.tensor(scored["reward"], dtype=torch.float64)
        _, group = candidate_groups(scored, n, config.num_picks)
        log_weight = pick_log_weights(reward, correction, group, config.beta)
        picked = pick_dataset(scored, log_weight, n, config.num_picks, config.seed)
        costs = with_costs(picked, scored, config, n, config.family.passes_per_sample, True)
        return save_picks(costs, config, self.name, root / "scored")

    def describe(self, settings: dict) -> str:
        return f"N={settings['soft_best_of_n']} beta={settings['beta']}"


SOFT_BEST_OF_N = SoftBestOfN()
