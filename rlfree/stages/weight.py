"""Stage 3: self-normalized importance weights towards the KL-regularized optimum.

For prompt q with samples o_i drawn from a proposal p:

    log w_i = r_i / beta                         (rlhf: target pi_ref * exp(r / beta))
            | gamma * log pi_ref(o_i | q)        (rlif: target pi_ref^(1 + gamma))
            | both terms                         (rlhf+rlif)
            + log pi_ref(o_i | q) - log p(o_i | q)
    w_i = exp(log w_i - logsumexp_j log w_j)     (within each prompt, so sum_i w_i = 1)

Everything is done in float64 log space, so r / beta in the thousands is fine. beta can instead be solved for a
target plug-in KL(pi* || pi_ref) or ESS (both move monotonically with 1 / beta), and the normalized weights can be
truncated (--max_weight_ratio) or pruned (--min_weight) before training.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from datasets import Dataset, load_from_disk

from ..data import check_output_dir, load_stage, process_state, save_stage
from ..errors import StageInputError, check_finite
from ..evaluation.tables import format_weighting_summary
from ..family import Family, family_of_data
from ..weights import SAMPLES_PER_EXP_KL, normalize_per_group, solve_coefficient, weigh

WEIGHTINGS = ("rlhf", "rlif", "rlhf+rlif")
BETA_SCOPES = ("global", "prompt")


@dataclass
class WeightConfig:
    """Settings of `rlfree weight`."""

    # Alternatives that replace each other: one given on the command line drops the others from a recipe.
    RECIPE_ALTERNATIVES: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("beta", "target_kl", "target_ess"),
        ("rlif_exponent", "beta_if"),
    )

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
    target_kl: float | None = field(
        default=None,
        metadata={
            "help": "Instead of --beta (or --rlif_exponent for rlif): solve it so that the plug-in KL(pi* || pi_ref), "
            "in nats, averaged over prompts (or per prompt, --beta_scope prompt), equals this."
        },
    )
    target_ess: float | None = field(
        default=None,
        metadata={
            "help": "Instead of --beta: solve it so that the effective sample size 1 / sum w^2, as a fraction of the "
            "samples per prompt and averaged over prompts (or per prompt), equals this."
        },
    )
    beta_scope: str = field(
        default="global",
        metadata={
            "help": "With a target: one beta for the whole dataset (global) or one per prompt (prompt).",
            "choices": BETA_SCOPES,
        },
    )
    max_weight_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Cap every weight at this multiple of its prompt's mean weight 1/N (the rest is renormalized "
            "so the cap still holds); truncated importance sampling, trading a little bias for variance."
        },
    )
    min_weight: float = field(
        default=0.0,
        metadata={
            "help": "Drop samples whose normalized weight (weights sum to 1 per prompt) is below this, so training "
            "spends no compute on them; each prompt keeps its largest weight."
        },
    )
    drop_uniform_prompts: bool = field(
        default=False,
        metadata={
            "help": "Drop the prompts whose weights are uniform (sampling from pi_ref, every sample got the same "
            "reward): their target is the proposal itself, so their samples only hold the model where it is. "
            "Dropping them saves that training compute (as DAPO's dynamic sampling drops such groups), at the price "
            "of that anchor."
        },
    )

    def __post_init__(self):
        check_finite(self)
        if self.weighting not in WEIGHTINGS:
            raise StageInputError(f"--weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        targets = [name for name in ("target_kl", "target_ess") if getattr(self, name) is not None]
        if len(targets) > 1:
            raise StageInputError("give at most one of --target_kl and --target_ess")
        if self.target_kl is not None and not self.target_kl > 0:
            raise StageInputError(f"--target_kl must be > 0 nats, got {self.target_kl}")
        if self.target_ess is not None and not 0 < self.target_ess < 1:
            raise StageInputError(
                f"--target_ess is a fraction of the samples per prompt in (0, 1), got {self.target_ess}"
            )
        if self.beta_scope not in BETA_SCOPES:
            raise StageInputError(f"--beta_scope must be one of {BETA_SCOPES}, got {self.beta_scope!r}")
        if self.beta_scope == "prompt" and not targets:
            raise StageInputError("--beta_scope prompt needs --target_kl or --target_ess to solve beta per prompt")
        if "rlhf" in self.weighting:
            if targets and self.beta is not None:
                raise StageInputError(f"give --beta or --{targets[0]}, not both: the target solves beta")
            if not targets and (self.beta is None or not self.beta > 0):
                raise StageInputError(
                    f"--weighting {self.weighting} needs --beta > 0 (or --target_kl / --target_ess), got {self.beta}"
                )
        if "rlif" in self.weighting:
            solves_exponent = bool(targets) and "rlhf" not in self.weighting
            if (self.rlif_exponent is None) == (self.beta_if is None) and not (
                solves_exponent and self.rlif_exponent is None and self.beta_if is None
            ):
                raise StageInputError(
                    f"--weighting {self.weighting} needs exactly one of --rlif_exponent or --beta_if"
                    + (" (or neither: the target solves gamma)" if solves_exponent else "")
                )
            if self.rlif_exponent is not None and not self.rlif_exponent > -1:
                raise StageInputError(
                    f"--rlif_exponent must be > -1 (the target is pi_ref^(1 + gamma)), got {self.rlif_exponent}"
                )
            if self.beta_if is not None and not self.beta_if > 0:
                raise StageInputError(f"--beta_if must be > 0, got {self.beta_if}")
            if self.rlif_length is not None and self.rlif_length < 1:
                raise StageInputError(f"--rlif_length must be >= 1, got {self.rlif_length}")
        if self.max_weight_ratio is not None and not self.max_weight_ratio >= 1:
            raise StageInputError(
                f"--max_weight_ratio must be >= 1 (1 makes every weight uniform), got {self.max_weight_ratio}"
            )
        if not 0 <= self.min_weight < 1:
            raise StageInputError(f"--min_weight must be in [0, 1), got {self.min_weight}")

    @property
    def target(self) -> tuple[str, float] | None:
        """("kl" or "ess", value) when a target solves the coefficient."""
        if self.target_kl is not None:
            return "kl", self.target_kl
        if self.target_ess is not None:
            return "ess", self.target_ess
        return None

    @property
    def solved_name(self) -> str:
        """The coefficient a target solves: beta when there is an rlhf term, else the rlif exponent gamma."""
        return "beta" if "rlhf" in self.weighting else "rlif_exponent"

    def required_columns(self, family: Family) -> tuple[str, ...]:
        """The input's columns this weighting reads; a family without likelihoods (diffusion) samples pi_ref itself
        and its rows carry no log-probabilities."""
        if not family.has_likelihood:
            if "rlif" in self.weighting:
                raise StageInputError(
                    f"--weighting {self.weighting}: RLIF weights by log pi_ref of each sample, which a {family.name} "
                    "model does not give; use --weighting rlhf"
                )
            return ("prompt_index", "reward")
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


def finite_column(dataset: Dataset, name: str) -> torch.Tensor:
    """A numeric column as float64, refused (naming it and the first row) where a value is None, NaN or infinite."""
    values = torch.tensor([math.nan if value is None else value for value in dataset[name]], dtype=torch.float64)
    bad = torch.nonzero(~torch.isfinite(values))
    if len(bad):
        raise StageInputError(f"column {name!r} is not finite in {len(bad)} row(s), first at row {int(bad[0])}")
    return values


def proposal_correction(dataset: Dataset, family: Family) -> torch.Tensor:
    """log pi_ref - log p per row: zero for a family without likelihoods, whose samples come from pi_ref itself."""
    if not family.has_likelihood:
        return torch.zeros(len(dataset), dtype=torch.float64)
    return finite_column(dataset, "ref_logprob") - finite_column(dataset, "proposal_logprob")


def log_weight_parts(
    dataset: Dataset, config: WeightConfig, family: Family
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correction, offset, statistic) with log w_i = offset_i + s * statistic_i before normalization.

    s is the coefficient a target solves for: 1 / beta on the reward when the weighting has an rlhf term, else gamma on
    log pi_ref. The correction log pi_ref - log p is part of the offset, as is the rlif term of rlhf+rlif.
    """
    correction = proposal_correction(dataset, family)
    if "rlhf" not in config.weighting:
        return correction, correction, finite_column(dataset, "ref_logprob")
    offset = correction
    if "rlif" in config.weighting:
        offset = offset + rlif_exponents(config, torch.tensor(dataset["num_tokens"])) * finite_column(
            dataset, "ref_logprob"
        )
    return correction, offset, finite_column(dataset, "reward")


def given_coefficient(dataset: Dataset, config: WeightConfig) -> torch.Tensor:
    """s when no target solves it: 1 / beta, or gamma per sample for rlif (it depends on length with --beta_if)."""
    if "rlhf" in config.weighting:
        return torch.tensor(1.0 / config.beta, dtype=torch.float64)
    return rlif_exponents(config, torch.tensor(dataset["num_tokens"]))


def smaller_kl_advice(config: WeightConfig) -> str:
    """How to ask this weighting for a target closer to pi_ref: the knob it has (rlif has no beta)."""
    if config.target_kl is not None:
        return "lower --target_kl"
    if config.target_ess is not None:
        return "raise --target_ess"
    if "rlhf" in config.weighting:
        return "raise --beta"
    return "lower --rlif_exponent" if config.rlif_exponent is not None else "raise --beta_if"


def warnings_for(summary: dict, config: WeightConfig) -> list[str]:
    """Plain-language warnings about estimates that should not be trusted."""
    messages = []
    if summary["prompts_near_kl_ceiling"]:
        messages.append(
            f"{summary['prompts_near_kl_ceiling']} of {summary['num_prompts']} prompts have a plug-in KL(pi* || p) "
            f"within log {SAMPLES_PER_EXP_KL} of its ceiling log N (largest {summary['kl_estimate_max']:.2f} nats): "
            "there it underestimates the true KL and a few samples carry the weight. Sample at least "
            f"{summary['samples_needed']} completions per prompt ({SAMPLES_PER_EXP_KL} * exp(KL)), or "
            f"{smaller_kl_advice(config)}."
        )
    if summary.get("prompts_out_of_reach"):
        messages.append(
            f"{summary['prompts_out_of_reach']} prompts cannot reach the target at any {config.solved_name} (all "
            f"values equal, or ties at the top); they use the nearest end of the {config.solved_name} range."
        )
    return messages


def weight_dataset(dataset: Dataset, config: WeightConfig, family: Family) -> tuple[Dataset, dict]:
    """Add `log_weight`, `weight` and the per-prompt `ess`, `kl_estimate`, `kl_ref_estimate`, `max_weight` columns.

    With a target, the coefficient is solved first (and written per prompt under --beta_scope prompt); truncation
    and pruning then act on the normalized weights, and the pruned rows are dropped.
    """
    group = torch.tensor(dataset["prompt_index"], dtype=torch.long)
    correction, offset, statistic = log_weight_parts(dataset, config, family)
    reference_log_weight = normalize_per_group(correction, group)
    summary: dict = {}
    if config.target is None:
        coefficient = given_coefficient(dataset, config)
    else:
        per_prompt_scope = config.beta_scope == "prompt"
        solved, reached = solve_coefficient(
            offset, statistic, reference_log_weight, group, config.target, per_prompt_scope
        )
        coefficient = solved[group]
        solved_values = 1.0 / solved if config.solved_name == "beta" else solved
        present = group.unique()
        # Prompts out of reach sit at an end of the range; their value says nothing about the data, so leave them out.
        present_values = solved_values[present[reached[present]]] if reached[present].any() else solved_values[present]
        summary |= {
            "solved": config.solved_name,
            config.solved_name: float(present_values.quantile(0.5)),
            "beta_scope": config.beta_scope,
        }
        if per_prompt_scope:
            summary |= {
                "solved_min": float(present_values.min()),
                "solved_max": float(present_values.max()),
                "prompts_out_of_reach": int((~reached[present]).sum()),
            }
    columns, kept, weighing = weigh(
        offset + coefficient * statistic,
        group,
        reference_log_weight,
        config.drop_uniform_prompts,
        config.max_weight_ratio,
        config.min_weight,
    )
    if config.target is not None and config.beta_scope == "prompt":
        columns[config.solved_name] = solved_values[group]
    for name, values in columns.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values.tolist())
    if not kept.all():
        dataset = dataset.select(torch.nonzero(kept).squeeze(1).tolist())
    return dataset, summary | weighing | {"num_samples": len(dataset)}


def check_output(config: WeightConfig) -> None:
    """Refuse an --output_dir that weighting would destroy (`check_output_dir`), before anything is made."""
    check_output_dir(config.output_dir, "weighting", asdict(config), {"--input_dir": config.input_dir})


def weight(config: WeightConfig) -> Dataset:
    """Run the weighting stage, write its dataset and `weighting.json`, and print a summary.

    It is cheap and global (weights normalize per prompt, a target beta spans every prompt), so under
    `accelerate launch` the main process does it alone while the others wait, then all read the result.
    """
    state = process_state()
    check_output(config)
    if state.is_main_process:
        hint = "rlhf weighting needs `rlfree score` output." if "rlhf" in config.weighting else ""
        family = family_of_data(config.input_dir)
        dataset = load_stage(config.input_dir, config.required_columns(family), hint=hint, stage="weighting")
        dataset, summary = weight_dataset(dataset, config, family)
        print(f"weighting {config.weighting}:\n{format_weighting_summary(summary)}")
        for message in warnings_for(summary, config):
            print(f"warning: {message}", file=sys.stderr)
        settings = asdict(config) | {"family": family.name} | summary
        save_stage(dataset, config.output_dir, "weighting", settings, input_dir=config.input_dir)
    state.wait_for_everyone()
    return load_from_disk(config.output_dir)


def weight_command(config: WeightConfig) -> str:
    weight(config)
    return f"wrote weights to {config.output_dir}"
