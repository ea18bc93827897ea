"""The weighting math, on tensors only: log-weights, per-group normalization, diagnostics, beta solving,
truncation, pruning, beta sweeps and soft best-of-N picks.

A group is a set of samples that share a normalizing constant (a prompt's N samples, or the N candidates of one
pick). Groups are numbered 0..G-1 in a `group` tensor beside the values. Every family's stage, the samplers and the
trainers' weighting call these, so the math lives once; nothing here reads a dataset or loads a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import StageInputError


def group_sum(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Each group's sum, indexed by group (0 for a group index with no rows)."""
    return torch.zeros(num_groups, dtype=values.dtype).index_add(0, group, values)


def group_max(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Each group's largest value (-inf for a group index with no rows), indexed by group."""
    num_groups = int(group.max()) + 1
    return torch.full((num_groups,), -math.inf, dtype=values.dtype).scatter_reduce(0, group, values, reduce="amax")


def normalize_per_group(log_weight: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Subtract each group's logsumexp so that every group's weights sum to one (stable at any scale)."""
    shifted = log_weight - group_max(log_weight, group)[group]
    return shifted - group_sum(shifted.exp(), group, int(group.max()) + 1).log()[group]


def group_log_mean_exp(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """log of each group's mean of exp(values) (energy-guided sampling's energy estimate), stable at any scale."""
    num_groups = int(group.max()) + 1
    peak = group_max(values, group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    sums = group_sum((values - peak[group]).exp(), group, num_groups)
    return peak + (sums / torch.bincount(group, minlength=num_groups).to(values.dtype)).log()


def diagnostics(
    weight: torch.Tensor, group: torch.Tensor, reference_log_weight: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-group ESS = 1 / sum w^2, plug-in KL estimates and the largest weight.

    `kl_estimate` is KL(pi* || p) ~ sum w log(N w), at most log N. `kl_ref_estimate` is KL(pi* || pi_ref) ~
    sum w log(w / v), where v are the self-normalized weights of pi_ref itself (`reference_log_weight`, from the
    correction log pi_ref - log p); it equals `kl_estimate` when the proposal is pi_ref.
    """
    num_groups = int(group.max()) + 1
    count = group_sum(torch.ones_like(weight), group, num_groups)
    if reference_log_weight is None:
        reference_log_weight = -count.log()[group]
    positive = weight > 0
    log_weight = torch.where(positive, weight.log(), torch.zeros_like(weight))
    kl_terms = torch.where(positive, weight * (log_weight + count.log()[group]), torch.zeros_like(weight))
    kl_ref_terms = torch.where(positive, weight * (log_weight - reference_log_weight), torch.zeros_like(weight))
    return {
        "count": count,
        "ess": 1.0 / group_sum(weight.square(), group, num_groups),
        "kl_estimate": group_sum(kl_terms, group, num_groups),
        "kl_ref_estimate": group_sum(kl_ref_terms, group, num_groups),
        "max_weight": group_max(weight, group),
    }


# Self-normalized importance sampling needs about exp(KL(pi* || p)) samples (Chatterjee & Diaconis, 2018); ten times
# that before the plug-in KL, capped at log N, is trusted.
SAMPLES_PER_EXP_KL = 10


def samples_needed(kl: float) -> int:
    return math.ceil(SAMPLES_PER_EXP_KL * math.exp(kl))


def solve_coefficient(
    offset: torch.Tensor,
    statistic: torch.Tensor,
    reference_log_weight: torch.Tensor,
    group: torch.Tensor,
    target: tuple[str, float],
    per_prompt: bool,
    iterations: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s (1 / beta, or gamma) per group such that the plug-in KL(pi* || pi_ref), or ESS / N, equals the target.

    Bisection on log s between 1e-6 and 1e6 over the reward's within-prompt spread. The KL grows with s (its derivative
    is s * Var_w(statistic)) and the ESS falls with it when the proposal is pi_ref, so the bracket holds the answer
    whenever one exists. Globally the mean over prompts is matched and an unreachable target is an error; per prompt,
    prompts that cannot reach it take the nearest end of the range. Returns (s, whether the target was reached) per
    group.
    """
    kind, value = target
    num_groups = int(group.max()) + 1
    count = group_sum(torch.ones_like(statistic), group, num_groups)
    present = count > 0
    centered = statistic - (group_sum(statistic, group, num_groups) / count.clamp(min=1))[group]
    spread = float(centered.square().mean().sqrt()) or 1.0
    shape = (num_groups,) if per_prompt else (1,)
    low = torch.full(shape, math.log(1e-6 / spread), dtype=torch.float64)
    high = torch.full(shape, math.log(1e6 / spread), dtype=torch.float64)

    def measure(log_s: torch.Tensor) -> torch.Tensor:
        s = log_s.exp()[group] if per_prompt else log_s.exp()
        weight = normalize_per_group(offset + s * statistic, group).exp()
        metrics = diagnostics(weight, group, reference_log_weight)
        measured = metrics["kl_ref_estimate"] if kind == "kl" else metrics["ess"] / count.clamp(min=1)
        return measured if per_prompt else measured[present].mean().reshape(1)

    sign = 1.0 if kind == "kl" else -1.0  # sign * (measured - value) grows with s
    at_low, at_high = measure(low), measure(high)
    too_near, too_far = sign * (at_low - value) > 0, sign * (at_high - value) < 0
    if not per_prompt and (too_near | too_far).any():
        name = "--target_kl" if kind == "kl" else "--target_ess"
        what = "plug-in KL(pi* || pi_ref) averaged over prompts" if kind == "kl" else "ESS / N averaged over prompts"
        if too_far.any():
            raise StageInputError(
                f"{name} {value} is out of reach: even the sharpest weights (beta -> 0, hard best-of-N) give a {what} "
                f"of {float(at_high):.4g}. Prompts whose rewards are all equal, or ties at the top, limit it; lower the "
                "target, or sample more completions per prompt."
            )
        raise StageInputError(
            f"{name} {value} is out of reach: even the flattest weights (beta -> infinity) give a {what} of "
            f"{float(at_low):.4g}, from the proposal correction or the rlif term alone; raise the target."
        )
    for _ in range(iterations):
        middle = (low + high) / 2
        below = sign * (measure(middle) - value) < 0
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    solution = ((low + high) / 2).exp()
    solution = torch.where(too_far, high.exp(), torch.where(too_near, low.exp(), solution))
    return solution.expand(num_groups), (~(too_near | too_far)).expand(num_groups)


def truncate(weight: torch.Tensor, group: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Cap each weight at max_ratio / N of its prompt and renormalize the rest so that the cap still holds.

    The result is min(c * w, cap) with c per prompt such that the weights sum to one; the set of capped samples
    only grows while c is refined, so the loop ends after at most N rounds (usually one or two).
    """
    num_groups = int(group.max()) + 1
    count = group_sum(torch.ones_like(weight), group, num_groups)
    cap = (max_ratio / count)[group]
    scale = torch.ones(num_groups, dtype=weight.dtype)
    capped = torch.zeros_like(weight, dtype=torch.bool)
    while True:
        newly_capped = (weight * scale[group] >= cap) & ~capped
        if not newly_capped.any():
            break
        capped |= newly_capped
        free_mass = group_sum(torch.where(capped, torch.zeros_like(weight), weight), group, num_groups)
        capped_mass = group_sum(torch.where(capped, cap, torch.zeros_like(weight)), group, num_groups)
        scale = torch.where(free_mass > 0, (1 - capped_mass).clamp(min=0) / free_mass, torch.ones_like(free_mass))
    return torch.where(capped, cap, weight * scale[group])


def prune(weight: torch.Tensor, group: torch.Tensor, min_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights below `min_weight` (keeping each prompt's largest) and renormalize; returns (weight, kept)."""
    kept = (weight >= min_weight) | (weight == group_max(weight, group)[group])
    weight = torch.where(kept, weight, torch.zeros_like(weight))
    return weight / group_sum(weight, group, int(group.max()) + 1)[group], kept


def uniform_groups(weight: torch.Tensor, group: torch.Tensor, tolerance: float = 1e-9) -> torch.Tensor:
    """Per group: whether its normalized weights are all equal (1/N each), up to `tolerance` relative to 1/N."""
    num_groups = int(group.max()) + 1
    count = group_sum(torch.ones_like(weight), group, num_groups)
    off = ((weight * count[group] - 1).abs() > tolerance).to(weight.dtype)
    return group_sum(off, group, num_groups) == 0


def pick_log_weights(reward: torch.Tensor, correction: torch.Tensor, group: torch.Tensor, beta: float) -> torch.Tensor:
    """Unnormalized log pick weights r/beta + correction; at beta = 0 their limit: correction on each group's argmax.

    Taking the limit rather than dividing by zero keeps hard best-of-N exact (ties are compared as equal rewards,
    not as infinities) and keeps the proposal correction as the tie-break.
    """
    if beta > 0:
        return reward / beta + correction
    best = group_max(reward, group)
    return torch.where(reward == best[group], correction, torch.full_like(correction, -math.inf))


def pick(log_weight: torch.Tensor, group: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One row index per group (groups 0..G-1, in order), drawn with probability softmax of log_weight in its group.

    Gumbel-max in its exponential-race form: argmax_i log w_i - log E_i with E_i = -log U_i ~ Exp(1) picks i with
    probability w_i / sum_j w_j, for every group at once. `uniform` holds one U_i in (0, 1) per row.
    """
    if torch.isnan(log_weight).any() or torch.isposinf(log_weight).any():
        raise StageInputError("log-weights must be finite or -inf (NaN or +inf found)")
    keys = log_weight - (-uniform.to(log_weight.dtype).log()).log()
    best = group_max(keys, group)
    num_groups = len(best)
    if torch.isneginf(best).any():
        empty = int(torch.nonzero(torch.isneginf(best))[0])
        raise StageInputError(f"group {empty} has no candidate with a finite log-weight to pick")
    rows = torch.arange(len(keys))
    winners = torch.where(keys == best[group], rows, torch.full_like(rows, len(keys)))
    return torch.full((num_groups,), len(keys), dtype=rows.dtype).scatter_reduce(0, group, winners, reduce="amin")


def weigh(
    log_weight: torch.Tensor,
    group: torch.Tensor,
    reference_log_weight: torch.Tensor,
    drop_uniform: bool = False,
    max_weight_ratio: float | None = None,
    min_weight: float = 0.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Self-normalized weights from unnormalized log-weights: normalized per group, groups with uniform weights
    dropped (`drop_uniform`, checked before pruning), truncated (`max_weight_ratio`) and pruned (`min_weight`).

    Returns the per-row columns (`log_weight`, `weight` and their group's `ess`, `kl_estimate`, `kl_ref_estimate`,
    `max_weight`), which rows are kept, and a summary (`summarize`, plus what dropping, truncation and pruning moved).
    """
    log_weight = normalize_per_group(log_weight, group)
    weight = log_weight.exp()
    kept = torch.ones_like(weight, dtype=torch.bool)
    summary: dict = {}
    if drop_uniform:
        uniform = uniform_groups(weight, group)
        if uniform[group].all():
            raise StageInputError(
                f"--drop_uniform_prompts: the weights of all {len(group.unique())} prompts are uniform (each "
                "prompt's samples tied), so nothing is left to train on; drop the flag, or sample more completions "
                "per prompt (--num_samples) so that some differ"
            )
        kept = ~uniform[group]
        summary["dropped_uniform_prompts"] = int(uniform[group.unique()].sum())
    if max_weight_ratio is not None:
        truncated = truncate(weight, group, max_weight_ratio)
        summary |= _mass_summary("truncated", (weight - truncated).clamp(min=0), group)
        weight = truncated
    if min_weight > 0:
        pruned, above_minimum = prune(weight, group, min_weight)
        kept &= above_minimum
        summary |= _mass_summary("pruned", torch.where(above_minimum, 0.0, weight), group)
        summary["pruned_samples"] = int((~above_minimum).sum())
        weight = pruned
    if max_weight_ratio is not None or min_weight > 0:
        log_weight = weight.log()
    per_prompt = diagnostics(weight, group, reference_log_weight)
    columns = {
        "log_weight": log_weight,
        "weight": weight,
        "ess": per_prompt["ess"][group],
        "kl_estimate": per_prompt["kl_estimate"][group],
        "kl_ref_estimate": per_prompt["kl_ref_estimate"][group],
        "max_weight": per_prompt["max_weight"][group],
    }
    return columns, kept, summarize(per_prompt) | summary


def summarize(per_prompt: dict[str, torch.Tensor]) -> dict[str, float]:
    """The weights' health over the prompts that have samples: ESS, plug-in KL, the largest weight, and how many
    prompts sit near the plug-in KL's ceiling (with the samples they would need)."""
    present = per_prompt["count"] > 0
    ess, kl_estimate = per_prompt["ess"][present], per_prompt["kl_estimate"][present]
    count = per_prompt["count"][present]
    # Uniform weights (KL 0: constant rewards, say) are estimated exactly, however few the samples.
    near_ceiling = (kl_estimate > count.log() - math.log(SAMPLES_PER_EXP_KL)) & (kl_estimate > 1e-9)
    return {
        "num_prompts": int(present.sum()),
        "num_samples": int(count.sum()),
        "ess_min": float(ess.min()),
        "ess_median": float(ess.quantile(0.5)),
        "kl_estimate_mean": float(kl_estimate.mean()),
        "kl_estimate_max": float(kl_estimate.max()),
        "kl_ref_estimate_mean": float(per_prompt["kl_ref_estimate"][present].mean()),
        "share_ess_below_2": float((ess < 2).double().mean()),
        "max_weight_max": float(per_prompt["max_weight"][present].max()),
        "prompts_near_kl_ceiling": int(near_ceiling.sum()),
        "samples_needed": samples_needed(float(kl_estimate[near_ceiling].max())) if near_ceiling.any() else None,
    }


def _mass_summary(name: str, removed: torch.Tensor, group: torch.Tensor) -> dict[str, float]:
    """Mean and largest weight mass per prompt that a truncation or pruning step moved."""
    per_prompt = group_sum(removed, group, int(group.max()) + 1)[group.unique()]
    return {f"{name}_mass_mean": float(per_prompt.mean()), f"{name}_mass_max": float(per_prompt.max())}


def _mass_summary(name: str, removed: torch.Tensor, group: torch.Tensor) -> dict[str, float]:
    """Mean and largest weight mass per prompt that a truncation or pruning step moved."""
    per_prompt = group_sum(removed, group, int(group.max()) + 1)[group.unique()]
    return {f"{name}_mass_mean": float(per_prompt.mean()), f"{name}_mass_max": float(per_prompt.max())}


def beta_sweep(
    correction: torch.Tensor, reward: torch.Tensor, group: torch.Tensor, betas: Sequence[float]
) -> dict[str, list[float]]:
    """Prompt-averaged plug-in KL(pi* || pi_ref) and ESS / N of rlhf weights r/beta + correction at each beta (for
    plots and choosing beta)."""
    reference_log_weight = normalize_per_group(correction, group)
    curve = {"beta": [], "kl_ref_estimate": [], "ess_fraction": []}
    for beta in betas:
        weight = normalize_per_group(correction + reward / beta, group).exp()
        metrics = diagnostics(weight, group, reference_log_weight)
        present = metrics["count"] > 0
        curve["beta"].append(float(beta))
        curve["kl_ref_estimate"].append(float(metrics["kl_ref_estimate"][present].mean()))
        curve["ess_fraction"].append(float((metrics["ess"] / metrics["count"].clamp(min=1))[present].mean()))
    return curve
