"""What every sampler does with its candidates: group them by pick, pick one per group by its log-weight, count what
each pick cost, and write `picked/` with its settings and cost."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset

from ..data import process_state, save_stage
from ..seeds import pick_uniforms
from ..sources import content_fingerprint
from ..stages.generate import GenerateConfig, generate_config
from ..weights import group_sum, normalize_per_group, pick
from .base import SampleSettings

COST_COLUMNS = ("cost_sequences", "cost_tokens", "cost_model_tokens", "cost_reward_calls")


def candidate_groups(candidates: Dataset, num_candidates: int, num_picks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pick number, pick group) of each candidate row: rows with sample_index in [k·N, (k+1)·N) of a prompt are the
    candidates of its pick k; groups are numbered 0..G-1 in (prompt, pick) order."""
    pick_number = torch.tensor(candidates["sample_index"]) // num_candidates
    # Dense numbering: prompts left out (--long_prompts skip) leave gaps in prompt_index.
    group = torch.unique(torch.tensor(candidates["prompt_index"]) * num_picks + pick_number, return_inverse=True)[1]
    return pick_number, group


def pick_dataset(
    candidates: Dataset, log_weight: torch.Tensor, num_candidates: int, num_picks: int, seed: int
) -> Dataset:
    """One row per (prompt, pick), in group order, drawn ∝ exp(log_weight) among its candidates, with `pick_index` and
    `pick_probability`. The pick's uniforms depend on (seed, prompt, pick, candidate) only, as the energy-guided
    sampler's first block does.
    """
    pick_number, group = candidate_groups(candidates, num_candidates, num_picks)
    keys = [(p, k, 0) for p, k in zip(candidates["prompt_index"], pick_number.tolist(), strict=True)]
    candidate = torch.tensor(candidates["sample_index"]) - pick_number * num_candidates
    rows = pick(log_weight, group, pick_uniforms(seed, keys, candidate.numpy()))
    probability = normalize_per_group(log_weight, group).exp()[rows]
    picked = candidates.select(rows.tolist())
    picked = picked.add_column("pick_index", pick_number[rows].tolist())
    return picked.add_column("pick_probability", probability.tolist())


def with_costs(
    picked: Dataset,
    candidates: Dataset,
    config: SampleSettings,
    num_candidates: int,
    models: int,
    scored: bool,
    extra_passes: int = 0,
) -> Dataset:
    """Each pick's cost: its N candidates, their tokens, and `models` model passes over each token, plus
    `extra_passes` per candidate (the classifier estimate's). For a diffusion pipeline a candidate's "tokens" are its
    denoising steps, one network pass each.

    `picked` holds one row per pick group in group order, as `pick_dataset` returns it.
    """
    _, group = candidate_groups(candidates, num_candidates, config.num_picks)
    lengths = config.family.sample_lengths(candidates, config.num_inference_steps)
    tokens = group_sum(lengths, group, len(picked)).tolist()
    columns = {
        "cost_sequences": [num_candidates] * len(picked),
        "cost_tokens": tokens,
        "cost_model_tokens": [models * count + extra_passes * num_candidates for count in tokens],
        "cost_reward_calls": [num_candidates if scored else 0] * len(picked),
    }
    for name, values in columns.items():
        picked = picked.add_column(name, values)
    return picked


def cost_summary(picked: Dataset) -> dict:
    """Totals of the cost columns and their mean per pick, for the sidecar."""
    totals = {name.removeprefix("cost_"): sum(picked[name]) for name in COST_COLUMNS}
    per_pick = {name: value / max(len(picked), 1) for name, value in totals.items()}
    return {"cost": {"total": totals, "per_pick": per_pick, "picks": len(picked)}}


def save_picks(picked: Dataset, config: SampleSettings, sampler: str, input_dir: Path) -> Dataset:
    """Write `picked/` with its settings and cost; under `accelerate launch` every process picked the same rows."""
    state = process_state()
    if state.is_main_process:
        settings = asdict(config) | {
            "sampler": sampler,
            "family": config.family.name,
            "prompts_fingerprint": content_fingerprint(config.prompts),
        }
        settings |= cost_summary(picked)
        save_stage(picked, Path(config.output_dir) / "picked", "sampling", settings, input_dir=input_dir)
    state.wait_for_everyone()
    return picked


def candidates_config(config: SampleSettings, num_candidates: int, **extra) -> GenerateConfig:
    """The `generate` stage that draws a sampler's `num_picks`·N candidates per prompt into output_dir/candidates."""
    return generate_config(
        config, str(Path(config.output_dir) / "candidates"), config.num_picks * num_candidates, **extra
    )
