"""Stage 3: self-normalized importance weights towards the KL-regularized optimum.

For prompt q with samples o_i drawn from a proposal p:

    log w_i = r_i / beta                         (rlhf: target pi_ref * exp(r / beta))
            | gamma * log pi_ref(o_i | q)        (rlif: target pi_ref^(1 + gamma))
            | both terms                         (rlhf+rlif)
            + log pi_ref(o_i | q) - log p(o_i | q)
    w_i = exp(log w_i - logsumexp_j log w_j)     (within each prompt, so sum_i w_i = 1)

Everything is done in float64 log space, so r / beta in the thousands is fine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from datasets import Dataset

from .data import StageInputError, load_stage, save_stage

WEIGHTINGS = ("rlhf", "rlif", "rlhf+rlif")


@dataclass
class WeightConfig:
    """Settings of `rlfree weight`."""

    input_dir: str = field(metadata={"help": "Output folder of `rlfree score` (rlhf) or `rlfree generate` (rlif)."})
    output_dir: str = field(metadata={"help": "Where the weighted dataset is written."})
    weighting: str = field(default="rlhf", metadata={"help": "rlhf, rlif or rlhf+rlif.", "choices": WEIGHTINGS})
    beta: float | None = field(default=None, metadata={"help": "KL coefficient beta of the rlhf target."})
    rlif_exponent: float | None = field(
        default=None, metadata={"help": "gamma of the rlif target pi_ref^(1 + gamma)."}
    )
    beta_if: float | None = field(
        default=None, metadata={"help": "RLIF KL coefficient; gives gamma = 1 / (L * beta_if - 1)."}
    )
    rlif_length: int | None = field(
        default=None,
        metadata={"help": "Fixed length L for --beta_if (default: each completion's num_tokens)."},
    )

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise StageInputError(f"--weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if "rlhf" in self.weighting and (self.beta is None or not self.beta > 0):
            raise StageInputError(f"--weighting {self.weighting} needs --beta > 0, got {self.beta}")
        if "rlif" in self.weighting:
            if (self.rlif_exponent is None) == (self.beta_if is None):
                raise StageInputError(
                    f"--weighting {self.weighting} needs exactly one of --rlif_exponent or --beta_if"
                )
            if self.rlif_exponent is not None and not self.rlif_exponent > -1:
                raise StageInputError(
                    f"--rlif_exponent must be > -1 (the target is pi_ref^(1 + gamma)), got {self.rlif_exponent}"
                )
            if self.beta_if is not None and not self.beta_if > 0:
                raise StageInputError(f"--beta_if must be > 0, got {self.beta_if}")
            if self.rlif_length is not None and self.rlif_length < 1:
                raise StageInputError(f"--rlif_length must be >= 1, got {self.rlif_length}")

    def required_columns(self) -> tuple[str, ...]:
        columns = ("prompt_index", "ref_logprob", "proposal_logprob", "num_tokens")
        return columns + (("reward",) if "rlhf" in self.weighting else ())


def rlif_exponents(config: WeightConfig, num_tokens: torch.Tensor) -> torch.Tensor:
    """gamma per sample: given directly, or gamma = 1 / (L * beta_if - 1), defined only when L * beta_if > 1."""
    if config.rlif_exponent is not None:
        return torch.full_like(num_tokens, config.rlif_exponent, dtype=torch.float64)
    lengths = (
        torch.full_like(num_tokens, config.rlif_length, dtype=torch.float64)
        if config.rlif_length is not None
        else num_tokens.double()
    )
    product = lengths * config.beta_if
    if (product <= 1).any():
        row = int(torch.nonzero(product <= 1)[0])
        raise StageInputError(
            f"L * beta_if must be > 1, but row {row} has L={int(lengths[row])} and beta_if={config.beta_if} "
            f"(L * beta_if = {float(product[row]):.3g}): the RLIF target pi_ref^(L*beta_if / (L*beta_if - 1)) "
            "is undefined there. Raise --beta_if or set a larger --rlif_length."
        )
    return 1.0 / (product - 1.0)


def _column(dataset: Dataset, name: str) -> torch.Tensor:
    values = torch.tensor([math.nan if value is None else value for value in dataset[name]], dtype=torch.float64)
    bad = torch.nonzero(~torch.isfinite(values))
    if len(bad):
        raise StageInputError(f"column {name!r} is not finite in {len(bad)} row(s), first at row {int(bad[0])}")
    return values


def unnormalized_log_weights(dataset: Dataset, config: WeightConfig) -> torch.Tensor:
    """log w_i before normalization, including the proposal correction log pi_ref - log p."""
    ref = _column(dataset, "ref_logprob")
    log_weight = ref - _column(dataset, "proposal_logprob")
    if "rlhf" in config.weighting:
        log_weight = log_weight + _column(dataset, "reward") / config.beta
    if "rlif" in config.weighting:
        log_weight = log_weight + rlif_exponents(config, torch.tensor(dataset["num_tokens"])) * ref
    return log_weight


def normalize_per_group(log_weight: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Subtract each group's logsumexp so that every group's weights sum to one (stable at any scale)."""
    num_groups = int(group.max()) + 1
    group_max = torch.full((num_groups,), -math.inf, dtype=log_weight.dtype).scatter_reduce(
        0, group, log_weight, reduce="amax"
    )
    shifted = log_weight - group_max[group]
    group_sum = torch.zeros(num_groups, dtype=log_weight.dtype).index_add(0, group, shifted.exp())
    return shifted - group_sum.log()[group]


def diagnostics(weight: torch.Tensor, group: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-group ESS = 1 / sum w^2, plug-in KL(pi* || p) ~ sum w log(N w) (at most log N), and the largest weight."""
    num_groups = int(group.max()) + 1
    count = torch.zeros(num_groups, dtype=weight.dtype).index_add(0, group, torch.ones_like(weight))
    ess = 1.0 / torch.zeros(num_groups, dtype=weight.dtype).index_add(0, group, weight.square())
    terms = torch.where(weight > 0, weight * torch.log(count[group] * weight), torch.zeros_like(weight))
    kl_estimate = torch.zeros(num_groups, dtype=weight.dtype).index_add(0, group, terms)
    max_weight = torch.zeros(num_groups, dtype=weight.dtype).scatter_reduce(0, group, weight, reduce="amax")
    return {"count": count, "ess": ess, "kl_estimate": kl_estimate, "max_weight": max_weight}


def summarize(per_prompt: dict[str, torch.Tensor]) -> dict[str, float]:
    present = per_prompt["count"] > 0
    ess, kl_estimate = per_prompt["ess"][present], per_prompt["kl_estimate"][present]
    return {
        "num_prompts": int(present.sum()),
        "num_samples": int(per_prompt["count"].sum()),
        "ess_min": float(ess.min()),
        "ess_median": float(ess.quantile(0.5)),
        "kl_estimate_mean": float(kl_estimate.mean()),
        "kl_estimate_max": float(kl_estimate.max()),
        "share_ess_below_2": float((ess < 2).double().mean()),
        "max_weight_max": float(per_prompt["max_weight"][present].max()),
    }


def format_summary(summary: dict[str, float]) -> str:
    rows = [
        ("prompts", f"{summary['num_prompts']}"),
        ("samples", f"{summary['num_samples']}"),
        ("ESS min / median", f"{summary['ess_min']:.2f} / {summary['ess_median']:.2f}"),
        (
            "KL estimate mean / max",
            f"{summary['kl_estimate_mean']:.3f} / {summary['kl_estimate_max']:.3f} nats",
        ),
        ("prompts with ESS < 2", f"{100 * summary['share_ess_below_2']:.1f}%"),
        ("largest weight", f"{summary['max_weight_max']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def weight_dataset(dataset: Dataset, config: WeightConfig) -> tuple[Dataset, dict[str, float]]:
    """Add `log_weight`, `weight` and the per-prompt `ess`, `kl_estimate`, `max_weight` columns."""
    group = torch.tensor(dataset["prompt_index"], dtype=torch.long)
    log_weight = normalize_per_group(unnormalized_log_weights(dataset, config), group)
    weight = log_weight.exp()
    per_prompt = diagnostics(weight, group)
    columns = {
        "log_weight": log_weight.tolist(),
        "weight": weight.tolist(),
        "ess": per_prompt["ess"][group].tolist(),
        "kl_estimate": per_prompt["kl_estimate"][group].tolist(),
        "max_weight": per_prompt["max_weight"][group].tolist(),
    }
    for name, values in columns.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values)
    return dataset, summarize(per_prompt)


def weight(config: WeightConfig) -> Dataset:
    """Run the weighting stage, write its dataset and `weighting.json`, and print a summary."""
    hint = "rlhf weighting needs `rlfree score` output." if "rlhf" in config.weighting else ""
    dataset = load_stage(config.input_dir, config.required_columns(), hint=hint)
    dataset, summary = weight_dataset(dataset, config)
    print(f"weighting {config.weighting}:\n{format_summary(summary)}")
    save_stage(dataset, config.output_dir, "weighting", asdict(config) | summary, input_dir=config.input_dir)
    return dataset
