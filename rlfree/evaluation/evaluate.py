"""`rlfree evaluate` and `rlfree ab`: how good a trained model is, and how far it moved from pi_ref.

Both sample the model(s) on a prompt set through the generate and score stages (so the samples are ordinary stage
folders that `rlfree inspect` reads), then report per-prompt-averaged statistics with percentile-bootstrap confidence
intervals that resample prompts: the prompt is the unit of replication, samples of one prompt are not independent
draws of the quantity of interest.

KL(pi_theta || pi_ref) is estimated from the model's own samples, o ~ pi_theta, with log r = log pi_ref − log pi_theta:
k1 = −log r (unbiased, can be negative on a sample) and k3 = (r − 1) − log r (unbiased and never negative).
This needs sampling from pi_theta itself, so with --ref_model the temperature must be 1 and top-k/top-p are off.

A contestant may also be a sampler: the output folder of `rlfree sample` (soft best-of-N, guided or energy-guided).
Its picks are scored with the comparison's reward, its cost per sample comes from its sidecar, and its KL is not
reported (a pick's probability under the sampler is not known, only under its proposal).

A contestant may be a diffusion pipeline (or a sampler over one): its images are scored the same way, a sample costs
its denoising steps, and there is no KL (a diffusion model gives no likelihood); an unconditional pipeline takes no
--prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Value

from ..data import changed_settings, process_state, read_sidecars
from ..errors import StageInputError
from ..family import Family, family_named, family_of_model
from ..options import (
    LoadOptions,
    Options,
    PromptOptions,
    RewardOptions,
    SamplerOptions,
    options_of,
    prompts_field,
    required_output_dir_field,
)
from ..samplers import sampler_named
from ..stages.generate import generate, generate_config
from ..stages.score import score, score_config
from .inspection import PromptGroups, read_columns
from .plots import draw_rewards, save_plot
from .tables import format_number, format_rows, format_table


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
        families = [family_of_contestant(model) for model in self.contestants()]
        if self.ref_model is not None and not all(family.has_likelihood for family in families):
            raise StageInputError(
                f"--ref_model {self.ref_model}: the KL to a reference needs likelihoods, which a diffusion pipeline "
                "does not give; drop --ref_model (the report has the mean reward and the cost)"
            )
        if self.ref_model is not None and not self.is_plain:
            raise StageInputError(
                f"--temperature {self.temperature}, --top_k {self.top_k}, --top_p {self.top_p} with --ref_model: the "
                "KL estimate needs samples from the model itself (temperature 1, no top-k/top-p); drop --ref_model "
                "to evaluate a tempered or truncated sampler"
            )
        for family in families:
            family.check_prompts(self.prompts)

    def contestants(self) -> list[str]:
        """The models (or `rlfree sample` output folders) compared."""
        raise NotImplementedError


@dataclass
class EvaluateConfig(ComparisonOptions):
    """Settings of `rlfree evaluate`."""

    model_name_or_path: str = field(
        metadata={
            "help": "Model evaluated (pi_theta): a local folder or a Hub id; or the --output_dir of `rlfree sample` "
            "to evaluate its picks."
        }
    )
    prompts: str | None = prompts_field(optional=True)
    output_dir: str = required_output_dir_field("Where samples/, scored/ and evaluation.json are written.")

    def __post_init__(self):
        if self.output_dir is None:
            raise StageInputError("--output_dir is required")
        super().__post_init__()

    def contestants(self) -> list[str]:
        return [self.model_name_or_path]


@dataclass
class ABConfig(ComparisonOptions):
    """Settings of `rlfree ab`: the same prompts, sampler and reward for two models (seed: A's; B uses seed + 1)."""

    model_a: str = field(metadata={"help": "Model A: a local folder, a Hub id, or a `rlfree sample` output folder."})
    model_b: str = field(metadata={"help": "Model B: a local folder, a Hub id, or a `rlfree sample` output folder."})
    prompts: str | None = prompts_field(optional=True)
    output_dir: str = required_output_dir_field("Where a/, b/, ab.json, ab.md and ab.png are written.")
    num_examples: int = field(
        default=3,
        metadata={"help": "Prompts whose first completion from A and from B are shown side by side (text models)."},
    )

    def __post_init__(self):
        if self.output_dir is None:
            raise StageInputError("--output_dir is required")
        if self.num_examples < 0:
            raise StageInputError(f"--num_examples must be >= 0, got {self.num_examples}")
        family_a, family_b = family_of_contestant(self.model_a), family_of_contestant(self.model_b)
        if family_a is not family_b:
            raise StageInputError(
                f"--model_a {self.model_a} and --model_b {self.model_b}: one is a {family_a.name} model and the other a "
                f"{family_b.name} model; compare two of a kind"
            )
        super().__post_init__()

    def contestants(self) -> list[str]:
        return [self.model_a, self.model_b]

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
    per_prompt = np.asarray(per_prompt, dtype=np.float64)
    return interval(name, float(per_prompt.mean()), bootstrap_means(per_prompt, num_bootstrap, seed), confidence)


def interval(name: str, value: float, resampled: np.ndarray, confidence: float) -> dict[str, Any]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return {name: value, f"{name}_ci": [float(low), float(high)], f"{name}_stderr": float(resampled.std())}


def replication_units(groups: PromptGroups, values: np.ndarray) -> tuple[np.ndarray, str]:
    """What the bootstrap resamples: per-prompt means, or with a single prompt (an unconditional diffusion pipeline)
    the samples themselves, which are then independent draws."""
    if len(groups.count) > 1:
        return groups.mean(values), "percentile bootstrap over prompts"
    return np.asarray(values, dtype=np.float64), "percentile bootstrap over samples (one prompt)"


def win_rate_estimate(
    rewards_a: np.ndarray, rewards_b: np.ndarray, confidence: float, num_bootstrap: int, seed: int
) -> tuple[dict[str, Any], str]:
    """A's win rate over all (a_i, b_j) pairs of each prompt, with its interval: prompts resampled, or with a single
    prompt each side's samples resampled on its own."""
    if len(rewards_a) > 1:
        return estimate("win_rate_a", win_rates(rewards_a, rewards_b), confidence, num_bootstrap, seed), (
            "percentile bootstrap over prompts"
        )
    rng = np.random.default_rng(seed)
    a, b = rewards_a[0], rewards_b[0]
    resampled = np.array(
        [win_rates(rng.choice(a, len(a))[None], rng.choice(b, len(b))[None])[0] for _ in range(num_bootstrap)]
    )
    value = float(win_rates(rewards_a, rewards_b)[0])
    return interval("win_rate_a", value, resampled, confidence), "percentile bootstrap over samples (one prompt)"


def by_prompt(dataset: Dataset, name: str) -> np.ndarray:
    """A column as a [prompt, sample] matrix, rows in prompt order and samples in sample (or pick) order."""
    sample = "pick_index" if "pick_index" in dataset.column_names else "sample_index"
    table = dataset.select_columns(["prompt_index", sample, name]).with_format("arrow")[:]
    prompt_index, sample_index, values = (table.column(column).to_numpy() for column in table.column_names)
    order = np.lexsort((sample_index, prompt_index))
    return values[order].reshape(len(np.unique(prompt_index)), -1)


def prompt_texts(dataset: Dataset) -> dict[int, str]:
    """Each prompt's text by prompt_index: the two sides of a comparison must have seen the same ones."""
    return dict(zip(dataset["prompt_index"], dataset["prompt"], strict=True))


def shown_text(text: str, limit: int = 160) -> str:
    """A completion on one line, shortened: newlines shown as ⏎."""
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def examples(dataset_a: Dataset, dataset_b: Dataset, count: int) -> list[dict[str, Any]]:
    """The first `count` prompts with each side's first completion and its reward (text completions only).

    A chat prompt is shown by its last message (the rendered template repeats the system prompt).
    """
    if count == 0 or not all(isinstance(d.features.get("completion"), Value) for d in (dataset_a, dataset_b)):
        return []
    first = {}
    for name, dataset in (("a", dataset_a), ("b", dataset_b)):
        sample = "pick_index" if "pick_index" in dataset.column_names else "sample_index"
        for row in dataset.select([i for i, value in enumerate(dataset[sample]) if value == 0]):
            first.setdefault(row["prompt_index"], {})[name] = row
    shown = []
    for index in sorted(first)[:count]:
        a, b = first[index]["a"], first[index]["b"]
        prompt = a["messages"][-1]["content"] if a.get("messages") else a["prompt"]
        shown.append(
            {"prompt_index": index, "prompt": prompt, "a": a["completion"], "reward_a": a["reward"],
             "b": b["completion"], "reward_b": b["reward"]}
        )  # fmt: skip
    return shown


def format_examples(shown: list[dict[str, Any]]) -> str:
    lines = []
    for example in shown:
        lines.append(f"  prompt {example['prompt_index']}: {shown_text(example['prompt'])}")
        for side in ("a", "b"):
            reward = format_number(example[f"reward_{side}"])
            lines.append(f"    {side.upper()} (reward {reward}): {shown_text(example[side])}")
    return "\n".join(lines)


def win_rates(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
    """Per prompt, the share of all (a_i, b_j) pairs that A wins, a tie counting one half. Inputs: [prompt, sample]."""
    a, b = rewards_a[:, :, None], rewards_b[:, None, :]
    return ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2))


def kl_samples(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sample k1 and k3 estimates of KL(pi_theta || pi_ref) from samples of pi_theta."""
    log_ratio = columns["ref_logprob"] - columns["proposal_logprob"]  # log pi_ref − log pi_theta
    return {"kl_k1": -log_ratio, "kl_k3": np.expm1(log_ratio) - log_ratio}


# --- samplers as contestants ------------------------------------------------------------------------------------------


def sampler_picks(path: str) -> Path | None:
    """The `picked/` folder of a `rlfree sample` output (named by its --output_dir or by picked/ itself), else None."""
    for folder in (Path(path) / "picked", Path(path)):
        if (folder / "sampling.json").is_file():
            return folder
    return None


def family_of_contestant(model: str) -> Family:
    """The family of a contestant: of the model itself, or of the model a sampler's picks come from."""
    picks = sampler_picks(model)
    if picks is None:
        return family_of_model(model)
    sampling = read_sidecars(picks)["sampling"]
    return (
        family_named(sampling["family"]) if "family" in sampling else family_of_model(sampling["model_name_or_path"])
    )


def describe_sampler(settings: dict[str, Any]) -> str:
    """The sampler and the settings that set its cost and target, e.g. `soft_best_of_n N=16 beta=0.5 of MODEL`."""
    sampler = settings["sampler"]
    return f"{sampler} {sampler_named(sampler).describe(settings)} of {settings['model_name_or_path']}"


def check_sampler_prompts(picks: Path, settings: dict[str, Any], config: EvaluateConfig) -> None:
    """A sampler's picks are compared on the prompts they were drawn for, or not at all."""
    prompts, split = settings["prompts"], settings["prompts_split"]
    if changed_settings(settings, {"prompts": config.prompts, "prompts_split": config.prompts_split}):
        raise StageInputError(
            f"{picks} holds picks for --prompts {prompts} (split {split}), not {config.prompts} "
            f"(split {config.prompts_split}): pass the prompts the sampler ran on, or sample these prompts"
        )


def model_cost(tokens: float, passes: float) -> dict[str, float]:
    """What one sample of a model costs, in the units of a sampler's `cost` sidecar: its tokens (a diffusion sample's
    denoising steps) and the model passes over them."""
    return {"sequences": 1.0, "tokens": tokens, "model_tokens": passes, "reward_calls": 0.0}


def summarize(dataset: Dataset, config: EvaluateConfig) -> dict[str, Any]:
    """Mean reward and (with a reference, for a model) KL with confidence intervals, cost per sample, completion
    lengths and finish reasons."""
    columns = read_columns(dataset)
    groups = PromptGroups.of(columns["prompt_index"])
    picks = sampler_picks(config.model_name_or_path)
    sampling = read_sidecars(picks)["sampling"] if picks is not None else None
    per_sample = {"mean_reward": columns["reward"]}
    if config.ref_model is not None and sampling is None:
        per_sample |= kl_samples(columns)
    report: dict[str, Any] = {
        "model": config.model_name_or_path,
        "ref_model": config.ref_model,
        "num_prompts": len(groups.count),
        "num_samples": config.num_samples if sampling is None else sampling["num_picks"],
        "temperature": config.temperature if sampling is None else sampling["temperature"],
        "confidence": config.confidence,
    }
    for name, values in per_sample.items():
        units, report["interval"] = replication_units(groups, values)
        report |= estimate(name, units, config.confidence, config.num_bootstrap, config.seed)
    family = family_of_contestant(config.model_name_or_path)
    if sampling is not None:
        report |= {"sampler": describe_sampler(sampling), "cost_per_sample": sampling["cost"]["per_pick"]}
    else:
        length = float(family.sample_lengths(dataset, config.num_inference_steps).double().mean())
        report["cost_per_sample"] = model_cost(length, length)
    return report | family.completion_statistics(columns)


# --- running ---------------------------------------------------------------------------------------------------------


def sample_and_score(config: EvaluateConfig) -> Dataset:
    """Generate from the model with the sampler flags into samples/ (a sampler's picks are already drawn), then score
    into scored/."""
    output = Path(config.output_dir)
    samples = sampler_picks(config.model_name_or_path)
    if samples is not None:
        check_sampler_prompts(samples, read_sidecars(samples)["sampling"], config)
    else:
        samples = output / "samples"
        generate(generate_config(config, str(samples), config.num_samples, ref_model=config.ref_model))
    return score(score_config(config, samples, output / "scored"))


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


def estimate_rows(*reports: dict[str, Any]) -> list[list[str]]:
    """[label, "value [low, high]" per report] for the estimates any report holds ("n/a" where one does not: a
    sampler has no KL estimate)."""
    return [
        [label, *(format_estimate(report, name) if name in report else "n/a" for report in reports)]
        for name, label in ESTIMATE_LABELS.items()
        if any(name in report for report in reports)
    ]


def format_cost(report: dict[str, Any]) -> str:
    cost = report["cost_per_sample"]
    return " / ".join(format_number(cost[name]) for name in ("sequences", "model_tokens", "reward_calls"))


COST_LABEL = "cost per sample: sequences / model-token passes / reward calls"


def contestant(report: dict[str, Any]) -> str:
    return report.get("sampler", report["model"])


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation, print a short table and return the report written to evaluation.json."""
    _, report = evaluate_model(config)
    rows = [
        ("model", contestant(report)),
        ("prompts x samples", f"{report['num_prompts']} x {report['num_samples']}"),
        *estimate_rows(report),
        (COST_LABEL, format_cost(report)),
    ]
    if "num_tokens" in report:
        tokens = report["num_tokens"]
        rows += [
            ("completion tokens mean / median / max", " / ".join(format_number(v) for v in tokens.values())),
            ("finish reasons", ", ".join(f"{r} {share:.1%}" for r, share in report["finish_reasons"].items())),
        ]
    if process_state().is_main_process:
        print(f"{config.confidence:.0%} intervals: {report['interval']}\n{format_rows(rows)}")
        print(f"report: {Path(config.output_dir) / 'evaluation.json'}")
    return report


def kl_fields(report: dict[str, Any]) -> dict[str, Any]:
    """k1 and k3 (with intervals) of one side, without the `kl_` prefix."""
    return {key.removeprefix("kl_"): value for key, value in report.items() if key.startswith("kl_")}


def side_by_side(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """[label, A's estimate, B's estimate] rows."""
    return [*estimate_rows(a, b), [COST_LABEL, format_cost(a), format_cost(b)]]


def ab_markdown(result: dict[str, Any]) -> str:
    """A short markdown report of the comparison."""
    a, b = result["a"], result["b"]
    rows = [["model", contestant(a), contestant(b)], *side_by_side(a, b)]
    if "num_tokens" in a and "num_tokens" in b:
        rows.append(["mean completion tokens", *(format_number(side["num_tokens"]["mean"]) for side in (a, b))])
    table = "\n".join("| " + " | ".join(row) + " |" for row in [["", "A", "B"], ["---"] * 3, *rows])
    shown = result.get("examples") or []
    samples = "".join(
        f"\n**{example['prompt']}**\n\n- A (reward {format_number(example['reward_a'])}): `{example['a']}`\n"
        f"- B (reward {format_number(example['reward_b'])}): `{example['b']}`\n"
        for example in shown
    )
    return (
        f"# A/B: {a['model']} vs {b['model']}\n\n"
        f"Win rate of A: **{format_estimate(result, 'win_rate_a')}** over {result['num_prompts']} prompts, "
        f"{a['num_samples']}×{b['num_samples']} pairs per prompt (ties count 1/2; "
        f"{result['confidence']:.0%} {result['interval']}).\n\n{table}\n"
        + (f"\n## First completions\n{samples}" if shown else "")
    )


def ab(config: ABConfig) -> dict[str, Any]:
    """Compare two models on the same prompts and reward; writes ab.json, ab.md and ab.png into output_dir."""
    sides = {name: evaluate_model(config.side(name)) for name in ("a", "b")}
    rewards = {name: by_prompt(dataset, "reward") for name, (dataset, _) in sides.items()}
    prompts = {name: prompt_texts(dataset) for name, (dataset, _) in sides.items()}
    if prompts["a"] != prompts["b"]:
        differing = sorted(set(prompts["a"].items()) ^ set(prompts["b"].items()))[0]
        raise StageInputError(
            f"A and B were sampled on different prompts ({len(prompts['a'])} vs {len(prompts['b'])}; first "
            f"difference at prompt_index {differing[0]}): compare them on the same --prompts"
        )
    a, b = sides["a"][1], sides["b"][1]
    win_rate, resampling = win_rate_estimate(
        rewards["a"], rewards["b"], config.confidence, config.num_bootstrap, config.seed
    )
    result: dict[str, Any] = {
        "model_a": config.model_a,
        "model_b": config.model_b,
        "num_prompts": a["num_prompts"],
        "num_samples": config.num_samples,
        "confidence": config.confidence,
        "interval": resampling,
        **win_rate,
        "mean_reward_a": a["mean_reward"],
        "mean_reward_a_ci": a["mean_reward_ci"],
        "mean_reward_b": b["mean_reward"],
        "mean_reward_b_ci": b["mean_reward_ci"],
    }
    if config.ref_model is not None:
        result |= {"kl_a": kl_fields(a), "kl_b": kl_fields(b)}
    result |= {"a": a, "b": b, "examples": examples(sides["a"][0], sides["b"][0], config.num_examples)}
    output = Path(config.output_dir)
    if process_state().is_main_process:
        (output / "ab.json").write_text(json.dumps(result, indent=2) + "\n")
        (output / "ab.md").write_text(ab_markdown(result))
        save_plot(output / "ab.png", lambda axes: draw_rewards(axes, rewards["a"].ravel(), rewards["b"].ravel()))
        if result["examples"]:
            print(f"first completion of A and of B on {len(result['examples'])} prompts:")
            print(format_examples(result["examples"]))
        print(f"win rate of A {format_estimate(result, 'win_rate_a')}")
        print(format_table(["", "A", "B"], side_by_side(a, b)))
        print(f"report: {output / 'ab.md'}")
    return result
