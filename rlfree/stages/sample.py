"""Soft best-of-N: the no-training baseline that samples pi* ∝ pi_ref·exp(r/beta) at inference time.

For each pick, draw N completions, score them, and return one with probability softmax_i(log w_i), where

    log w_i = r_i / beta + log pi_ref(o_i|q) - log p(o_i|q)

is the same log-weight the weighting stage uses. The proposal correction (0 when sampling from pi_ref itself) makes
the picks target pi_ref·exp(r/beta) even with temperature/top-k/top-p; without it they would target p·exp(r/beta).
As N grows the picked completion's distribution converges to pi*. beta = 0 is hard best-of-N, the beta -> 0 limit:
only the highest-reward candidates can be picked, ties broken in proportion to pi_ref/p (uniformly when p = pi_ref).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from ..data import check_output_dir, process_state, save_stage
from ..errors import StageInputError
from ..options import LoadOptions, PromptOptions, RewardOptions, SamplerOptions, options_of, prompts_field
from ..weights import normalize_per_group, pick, pick_log_weights
from .generate import GenerateConfig, generate
from .score import ScoreConfig, score


@dataclass
class SampleConfig(SamplerOptions, RewardOptions, PromptOptions, LoadOptions):
    """Settings of soft best-of-N sampling."""

    model_name_or_path: str = field(metadata={"help": "Model sampled from (pi_ref), a local folder or a Hub id."})
    prompts: str = prompts_field()
    output_dir: str = field(
        metadata={"help": "Root folder: candidates/ (generated), scored/ and picked/ (the result) are written in it."}
    )
    soft_best_of_n: int = field(metadata={"help": "Candidates N drawn for each pick."})
    beta: float = field(
        default=1.0,
        metadata={"help": "KL coefficient: pick with probability softmax(r/beta); 0 = hard best-of-N."},
    )
    num_picks: int = field(
        default=1, metadata={"help": "Completions returned per prompt, each picked from its own N candidates."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.soft_best_of_n < 1:
            raise StageInputError(f"--soft_best_of_n must be >= 1, got {self.soft_best_of_n}")
        if not self.beta >= 0 or math.isinf(self.beta):
            raise StageInputError(f"--beta must be finite and >= 0 (0 = hard best-of-N), got {self.beta}")
        if self.num_picks < 1:
            raise StageInputError(f"--num_picks must be >= 1, got {self.num_picks}")


def pick_dataset(scored: Dataset, num_candidates: int, num_picks: int, beta: float, seed: int) -> Dataset:
    """The picked rows of a scored dataset, with `pick_index` (0..num_picks-1 per prompt) and `pick_probability`.

    Rows with sample_index in [k·N, (k+1)·N) of a prompt are the candidates of its pick k.
    """
    pick_number = torch.tensor(scored["sample_index"]) // num_candidates
    # Groups numbered 0..G-1 in order: prompts left out (--long_prompts skip) leave gaps in prompt_index.
    group = torch.unique(torch.tensor(scored["prompt_index"]) * num_picks + pick_number, return_inverse=True)[1]
    reward = torch.tensor(scored["reward"], dtype=torch.float64)
    correction = torch.tensor(scored["ref_logprob"], dtype=torch.float64) - torch.tensor(
        scored["proposal_logprob"], dtype=torch.float64
    )
    log_weight = pick_log_weights(reward, correction, group, beta)
    rows = pick(log_weight, group, torch.Generator().manual_seed(seed))
    probability = normalize_per_group(log_weight, group).exp()[rows]
    picked = scored.select(rows.tolist())
    picked = picked.add_column("pick_index", pick_number[rows].tolist())
    return picked.add_column("pick_probability", probability.tolist())


def soft_best_of_n(config: SampleConfig) -> Dataset:
    """Generate num_picks·N candidates per prompt, score them, pick; write output_dir/{candidates,scored,picked}."""
    root = Path(config.output_dir)
    check_output_dir(root / "picked", "sampling", asdict(config), {})
    generate(
        GenerateConfig(
            **options_of(LoadOptions, config) | options_of(PromptOptions, config) | options_of(SamplerOptions, config),
            model_name_or_path=config.model_name_or_path,
            prompts=config.prompts,
            output_dir=str(root / "candidates"),
            num_samples=config.num_picks * config.soft_best_of_n,
        )
    )
    scored = score(
        ScoreConfig(
            **options_of(RewardOptions, config),
            input_dir=str(root / "candidates"),
            output_dir=str(root / "scored"),
            batch_size=config.batch_size,
        )
    )
    picked = pick_dataset(scored, config.soft_best_of_n, config.num_picks, config.beta, config.seed)
    state = process_state()  # under `accelerate launch`, every process picks the same rows; one writes them
    if state.is_main_process:
        save_stage(picked, root / "picked", "sampling", asdict(config), input_dir=root / "scored")
    state.wait_for_everyone()
    return picked


def sample_command(config: SampleConfig) -> str:
    return f"wrote {len(soft_best_of_n(config))} picked completions to {config.output_dir}/picked"
