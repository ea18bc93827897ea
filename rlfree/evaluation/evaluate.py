"""`rlfree evaluate` and `rlfree ab`: how good a trained model is, and how far it moved from pi_ref.

Both sample the model(s) on a prompt set through the generate and score stages (so the samples are ordinary stage
folders that `rlfree inspect` reads), then report per-prompt-averaged statistics with percentile-bootstrap confidence
intervals that resample prompts: the prompt is the unit of replication, samples of one prompt are not independent
draws of the quantity of interest.

KL(pi_theta || pi_ref) is estimated from the model's own samples, o ~ pi_theta, with log r = log pi_ref − log pi_theta:
k1 = −log r (unbiased, can be negative on a sample) and k3 = (r − 1) − log r (unbiased and never negative).
This needs sampling from pi_theta itself, so with --ref_model the temperature must be 1 and top-k/top-p are off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from ..data import process_state
from ..errors import StageInputError
from ..options import LoadOptions, Options, PromptOptions, RewardOptions, SamplerOptions, options_of, prompts_field
from ..stages.generate import GenerateConfig, generate
from ..stages.score import ScoreConfig, score
from ..stages.weight import format_rows
from .inspect import PromptGroups, format_number, format_table, read_columns, save_plot


@dataclass(kw_only=True)
class BootstrapOptions(Options):
    """Confidence intervals: a percentile bootstrap over prompts."""

    confidence: float = field(default=0.95, metadata={"help": "Level of the bootstrap confidence intervals."})
    num_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of the prompts."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.confidence < 1:
            raise StageInputError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.num_bootstrap < 1:
            raise StageInputError(f"--num_bootstrap must be >= 1, got {self.num_bootstrap}")


@dataclass(kw_only=True)
class ComparisonOptions(BootstrapOptions, SamplerOptions, RewardOptions, PromptOptions, LoadOptions):
    """What `evaluate` and `ab` share: prompts, reward, sampler, the reference and the intervals."""

    num_samples: int = field(default=4, metadata={"help": "Completions sampled per prompt and model."})
    ref_model: str | None = field(
        default=None,
        metadata={"help": "Reference model pi_ref: report KL(model || pi_ref) from the model's samples (k1 and k3)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ref_model is not None and not self.is_plain:
            raise StageInputError(
                f"--temperature {self.temperature}, --top_k {self.top_k}, --top_p {self.top_p} with --ref_model: the "
                "KL estimate needs samples from the model itself (temperature 1, no top-k/top-p); drop --ref_model "
                "to evaluate a tempered or truncated sampler"
            )


@dataclass
class EvaluateConfig(ComparisonOptions):
    """Settings of `rlfree evaluate`."""

    model_name_or_path: str = field(metadata={"help": "Model evaluated (pi_theta): a local folder or a Hub id."})
    prompts: str = prompts_field()
    output_dir: str = field(metadata={"help": "Where samples/, scored/ and evaluation.json are written."})


@dataclass
class ABConfig(ComparisonOptions):
    """Settings of `rlfree ab`: the same prompts, sampler and reward for two models (seed: A's; B uses seed + 1)."""

    model_a: str = field(metadata={"help": "Model A: a local folder or a Hub id."})
    model_b: str = field(metadata={"help": "Model B: a local folder or a Hub id."})
    prompts: str = prompts_field()
    output_dir: str = field(metadata={"help": "Where a/, b/, ab.json, ab.md and ab.png are written."})

    def side(self, name: str) -> EvaluateConfig:
        """The evaluation of one side, in output_dir/a or output_dir/b.

        The sides get different seeds: one random stream would couple a_i with b_i and bias the K×K comparison.
        """
        shared = options_of(ComparisonOptions, self) | {"prompts": self.prompts}
        model = self.model_a if name == "a" else self.model_b
        seed = self.seed if name == "a" else self.seed + 1
        return EvaluateConfig(
            **shared | {"model_name_or_path": model, "output_dir": str(Path(self.output_dir) / name), "seed": seed}
        )


# --- statistics ------------------------------------------------------------------------------------------------------


def bootstrap_means(per_prompt: np.ndarray, num_bootstrap: int, seed: int) -> np.ndarray:
    """Means over prompts of `num_bootstrap` resamples (with replacement) of the prompts; seeded, so reproducible."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_prompt), size=(num_bootstrap, len(per_prompt)))
    return per_prompt[draws].mean(axis=1)


def estimate(name: str, per_prompt: np.ndarray, confidence: float, num_bootstrap: int, seed: int) -> dict[str, Any]:
    """`name`: mean over prompts; `name_ci`: percentile-bootstrap interval; `name_stderr`: bootstrap std."""
    means = bootstrap_means(np.asarray(per_prompt, dtype=np.float64), num_bootstrap, seed)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {
        name: float(np.mean(per_prompt)),
        f"{name}_ci": [float(low), float(high)],
        f"{name}_stderr": float(means.std()),
    }


def by_prompt(dataset: Dataset, name: str) -> np.ndarray:
    """A column as a [prompt, sample] matrix, rows in prompt order and samples in sample order."""
    table = dataset.select_columns(["prompt_index", "sample_index", name]).with_format("arrow")[:]
    prompt_index, sample_index, values = (table.column(column).to_numpy() for column in table.column_names)
    order = np.lexsort((sample_index, prompt_index))
    return values[order].reshape(len(np.unique(prompt_index)), -1)


def win_rates(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
    """Per prompt, the share of all (a_i, b_j) pairs that A wins, a tie counting one half. Inputs: [prompt, sample]."""
    a, b = rewards_a[:, :, None], rewards_b[:, None, :]
    return ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2))


def kl_samples(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sample k1 and k3 estimates of KL(pi_theta || pi_ref) from samples of pi_theta."""
    log_ratio = columns["ref_logprob"] - columns["proposal_logprob"]  # log pi_ref − log pi_theta
    return {"kl_k1": -log_ratio, "kl_k3": np.expm1(log_ratio) - log_ratio}


def summarize(dataset: Dataset, config: EvaluateConfig) -> dict[str, Any]:
    """Mean reward and (with a reference) KL with confidence intervals, completion lengths and finish reasons."""
    columns = read_columns(dataset)
    groups = PromptGroups.of(columns["prompt_index"])
    per_sample = {"mean_reward": columns["reward"]}
    if config.ref_model is not None:
        per_sample |= kl_samples(columns)
    report: dict[str, Any] = {
        "model": config.model_name_or_path,
        "ref_model": config.ref_model,
        "num_prompts": len(groups.count),
        "num_samples": config.num_samples,
        "temperature": config.temperature,
        "confidence": config.confidence,
        "interval": "percentile bootstrap over prompts",
    }
    for name, values in per_sample.items():
        report |= estimate(name, groups.mean(values), config.confidence, config.num_bootstrap, config.seed)
    tokens = columns["num_tokens"]
    report["num_tokens"] = {"mean": float(tokens.mean()), "median": float(np.median(tokens)), "max": int(tokens.max())}
    reasons, counts = np.unique(columns["finish_reason"], return_counts=True)
    report["finish_reasons"] = {str(r): float(c / len(dataset)) for r, c in zip(reasons, counts, strict=True)}
    return report


# --- running ---------------------------------------------------------------------------------------------------------


def sample_and_score(config: EvaluateConfig) -> Dataset:
    """Generate from the model with the sampler flags into samples/, then score into scored/."""
    output = Path(config.output_dir)
    generate(
        GenerateConfig(
            **options_of(LoadOptions, config) | options_of(PromptOptions, config) | options_of(SamplerOptions, config),
            model_name_or_path=config.model_name_or_path,
            prompts=config.prompts,
            output_dir=str(output / "samples"),
            ref_model=config.ref_model,
            num_samples=config.num_samples,
        )
    )
    return score(
        ScoreConfig(
            **options_of(RewardOptions, config),
            input_dir=str(output / "samples"),
            output_dir=str(output / "scored"),
            batch_size=config.batch_size,
        )
    )


def evaluate_model(config: EvaluateConfig) -> tuple[Dataset, dict[str, Any]]:
    """Sample, score and summarize one model; writes output_dir/evaluation.json."""
    dataset = sample_and_score(config)
    report = summarize(dataset, config)
    if process_state().is_main_process:  # under `accelerate launch` every process holds the same report
        (Path(config.output_dir) / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    return dataset, report


def format_estimate(report: dict[str, Any], name: str) -> str:
    low, high = report[f"{name}_ci"]
    return f"{format_number(report[name])} [{format_number(low)}, {format_number(high)}]"


ESTIMATE_LABELS = {"mean_reward": "mean reward", "kl_k1": "KL k1 (nats)", "kl_k3": "KL k3 (nats)"}


def estimate_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Label / "value [low, high]" for the estimates the report holds."""
    return [(label, format_estimate(report, name)) for name, label in ESTIMATE_LABELS.items() if name in report]


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation, print a short table and return the report written to evaluation.json."""
    _, report = evaluate_model(config)
    tokens = report["num_tokens"]
    rows = [
        ("model", report["model"]),
        ("prompts x samples", f"{report['num_prompts']} x {report['num_samples']}"),
        *estimate_rows(report),
        ("completion tokens mean / median / max", " / ".join(format_number(v) for v in tokens.values())),
        ("finish reasons", ", ".join(f"{r} {share:.1%}" for r, share in report["finish_reasons"].items())),
    ]
    if process_state().is_main_process:
        print(f"{config.confidence:.0%} intervals: percentile bootstrap over prompts\n{format_rows(rows)}")
        print(f"report: {Path(config.output_dir) / 'evaluation.json'}")
    return report


def kl_fields(report: dict[str, Any]) -> dict[str, Any]:
    """k1 and k3 (with intervals) of one side, without the `kl_` prefix."""
    return {key.removeprefix("kl_"): value for key, value in report.items() if key.startswith("kl_")}


def side_by_side(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """[label, A's estimate, B's estimate] rows."""
    return [
        [label, value_a, value_b]
        for (label, value_a), (_, value_b) in zip(estimate_rows(a), estimate_rows(b), strict=True)
    ]


def ab_markdown(result: dict[str, Any]) -> str:
    """A short markdown report of the comparison."""
    a, b = result["a"], result["b"]
    rows = [["model", a["model"], b["model"]], *side_by_side(a, b)]
    rows.append(["mean completion tokens", *(format_number(side["num_tokens"]["mean"]) for side in (a, b))])
    table = "\n".join("| " + " | ".join(row) + " |" for row in [["", "A", "B"], ["---"] * 3, *rows])
    return (
        f"# A/B: {a['model']} vs {b['model']}\n\n"
        f"Win rate of A: **{format_estimate(result, 'win_rate_a')}** over {result['num_prompts']} prompts, "
        f"{result['num_samples']}×{result['num_samples']} pairs per prompt (ties count 1/2; "
        f"{result['confidence']:.0%} percentile bootstrap over prompts).\n\n{table}\n"
    )


def ab(config: ABConfig) -> dict[str, Any]:
    """Compare two models on the same prompts and reward; writes ab.json, ab.md and ab.png into output_dir."""
    sides = {name: evaluate_model(config.side(name)) for name in ("a", "b")}
    rewards = {name: by_prompt(dataset, "reward") for name, (dataset, _) in sides.items()}
    if rewards["a"].shape[0] != rewards["b"].shape[0]:
        raise StageInputError(
            f"A and B were sampled on different prompt counts: {rewards['a'].shape[0]} vs {rewards['b'].shape[0]}"
        )
    a, b = sides["a"][1], sides["b"][1]
    result: dict[str, Any] = {
        "model_a": config.model_a,
        "model_b": config.model_b,
        "num_prompts": a["num_prompts"],
        "num_samples": config.num_samples,
        "confidence": config.confidence,
        "interval": "percentile bootstrap over prompts",
        **estimate(
            "win_rate_a", win_rates(rewards["a"], rewards["b"]), config.confidence, config.num_bootstrap, config.seed
        ),
        "mean_reward_a": a["mean_reward"],
        "mean_reward_a_ci": a["mean_reward_ci"],
        "mean_reward_b": b["mean_reward"],
        "mean_reward_b_ci": b["mean_reward_ci"],
    }
    if config.ref_model is not None:
        result |= {"kl_a": kl_fields(a), "kl_b": kl_fields(b)}
    result |= {"a": a, "b": b}
    output = Path(config.output_dir)
    if process_state().is_main_process:
        (output / "ab.json").write_text(json.dumps(result, indent=2) + "\n")
        (output / "ab.md").write_text(ab_markdown(result))
        save_plot(output / "ab.png", lambda axes: draw_rewards(axes, rewards["a"].ravel(), rewards["b"].ravel()))
        print(f"win rate of A {format_estimate(result, 'win_rate_a')}")
        print(format_table(["", "A", "B"], side_by_side(a, b)))
        print(f"report: {output / 'ab.md'}")
    return result


def draw_rewards(axes, rewards_a: np.ndarray, rewards_b: np.ndarray) -> None:
    """Both reward distributions on shared bins, bars side by side."""
    bins = np.histogram_bin_edges(np.concatenate([rewards_a, rewards_b]), bins="auto")
    axes.hist([rewards_a, rewards_b], bins=bins, label=["A", "B"], color=["#3b7dd8", "#d8743b"])
    axes.set_xlabel("reward")
    axes.set_ylabel("samples")
    axes.set_title("reward distributions")
    axes.legend()
