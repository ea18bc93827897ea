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

from .data import check_output_dir, process_state, save_stage
from .errors import StageInputError, check_finite
from .generation import GenerateConfig, generate, long_prompts_field
from .rewards import ScoreConfig, reward_functions_field, reward_models_field, score
from .weighting import group_max, normalize_per_group


@dataclass
class SampleConfig:
    """Settings of soft best-of-N sampling."""

    model_name_or_path: str = field(metadata={"help": "Model sampled from (pi_ref), a local folder or a Hub id."})
    prompts: str = field(
        metadata={
            "help": "JSONL/JSON/Parquet/CSV file, save_to_disk folder or Hub id with a 'prompt' or 'messages' column."
        }
    )
    output_dir: str = field(
        metadata={"help": "Root folder: candidates/ (generated), scored/ and picked/ (the result) are written in it."}
    )
    soft_best_of_n: int = field(metadata={"help": "Candidates N drawn for each pick."})
    reward: list[str] = reward_functions_field()
    reward_model: list[str] = reward_models_field()
    beta: float = field(
        default=1.0,
        metadata={"help": "KL coefficient: pick with probability softmax(r/beta); 0 = hard best-of-N."},
    )
    num_picks: int = field(
        default=1, metadata={"help": "Completions returned per prompt, each picked from its own N candidates."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion; longer ones are cut."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; != 1 is corrected for in the pick probabilities."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; < 1 is corrected for in the picks."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off); corrected for in the picks."})
    batch_size: int = field(default=64, metadata={"help": "Sequences generated (and completions scored) per batch."})
    seed: int = field(default=42, metadata={"help": "Random seed of the sampler and of the picks."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16 or float32."})
    long_prompts: str = long_prompts_field()

    def __post_init__(self):
        check_finite(self)
        if self.soft_best_of_n < 1:
            raise StageInputError(f"--soft_best_of_n must be >= 1, got {self.soft_best_of_n}")
        if not self.beta >= 0 or math.isinf(self.beta):
            raise StageInputError(f"--beta must be finite and >= 0 (0 = hard best-of-N), got {self.beta}")
        if self.num_picks < 1:
            raise StageInputError(f"--num_picks must be >= 1, got {self.num_picks}")
        if not self.reward and not self.reward_model:
            raise StageInputError("give at least one --reward path/to/file.py:FUNC or --reward_model PATH")


def log_weights(reward: torch.Tensor, correction: torch.Tensor, group: torch.Tensor, beta: float) -> torch.Tensor:
    """Unnormalized log pick weights r/beta + correction; at beta = 0 their limit: correction on each group's argmax.

    Taking the limit rather than dividing by zero keeps hard best-of-N exact (ties are compared as equal rewards,
    not as infinities) and keeps the proposal correction as the tie-break.
    """
    if beta > 0:
        return reward / beta + correction
    best = group_max(reward, group)
    return torch.where(reward == best[group], correction, torch.full_like(correction, -math.inf))


def pick(log_weight: torch.Tensor, group: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One row index per group (groups 0..G-1, in order), drawn with probability softmax of log_weight in its group.

    Gumbel-max in its exponential-race form: argmax_i log w_i - log E_i with E_i ~ Exp(1) picks i with probability
    w_i / sum_j w_j, for every group at once.
    """
    if torch.isnan(log_weight).any() or torch.isposinf(log_weight).any():
        raise StageInputError("log-weights must be finite or -inf (NaN or +inf found)")
    keys = log_weight - torch.empty_like(log_weight).exponential_(generator=generator).log()
    best = group_max(keys, group)
    num_groups = len(best)
    if torch.isneginf(best).any():
        empty = int(torch.nonzero(torch.isneginf(best))[0])
        raise StageInputError(f"group {empty} has no candidate with a finite log-weight to pick")
    rows = torch.arange(len(keys))
    winners = torch.where(keys == best[group], rows, torch.full_like(rows, len(keys)))
    return torch.full((num_groups,), len(keys), dtype=rows.dtype).scatter_reduce(0, group, winners, reduce="amin")


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
    log_weight = log_weights(reward, correction, group, beta)
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
            model_name_or_path=config.model_name_or_path,
            prompts=config.prompts,
            output_dir=str(root / "candidates"),
            num_samples=config.num_picks * config.soft_best_of_n,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            batch_size=config.batch_size,
            seed=config.seed,
            dtype=config.dtype,
            long_prompts=config.long_prompts,
        )
    )
    scored = score(
        ScoreConfig(
            input_dir=str(root / "candidates"),
            output_dir=str(root / "scored"),
            reward=config.reward,
            reward_model=config.reward_model,
            batch_size=config.batch_size,
        )
    )
    picked = pick_dataset(scored, config.soft_best_of_n, config.num_picks, config.beta, config.seed)
    state = process_state()  # under `accelerate launch`, every process picks the same rows; one writes them
    if state.is_main_process:
        save_stage(picked, root / "picked", "sampling", asdict(config), input_dir=root / "scored")
    state.wait_for_everyone()
    return picked
