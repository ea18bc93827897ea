"""`rlfree inspect DIR`: what a stage's output folder holds, before spending compute on the next stage.

Works on the output of any stage (generate, score or weight) and reports what its columns allow: lengths and finish
reasons always; reward statistics once scored; per-prompt ESS, KL estimates and largest weights once weighted; and,
when rewards and both log-probabilities are there, how KL(pi* || pi_ref) and the ESS move with beta, to choose it.
The report is printed, saved as `inspect.json` and drawn as PNG plots.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Value

from ..data import check_writable, load_stage, read_sidecars
from ..errors import StageInputError
from ..family import family_of_data
from ..stages.weight import WeightConfig, finite_column, proposal_correction
from ..weights import beta_sweep, diagnostics
from .plots import draw_beta_curve, draw_ess, draw_histogram, save_plot
from .tables import format_number, format_rows, format_table

MIN_MEDIAN_MAX = ("min", "median", "max")
STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": np.mean,
    "std": np.std,
    "min": np.min,
    "median": np.median,
    "p95": lambda values: np.percentile(values, 95),
    "max": np.max,
}
# Per-prompt values the weight stage stores on every row of its prompt (the solved coefficient under --beta_scope
# prompt). All but kl_ref_estimate (which needs the proposal correction) can be recomputed from `weight` alone.
WEIGHT_DIAGNOSTICS = ("ess", "kl_estimate", "kl_ref_estimate", "max_weight", "beta", "rlif_exponent")
FROM_WEIGHT_ALONE = ("ess", "kl_estimate", "max_weight")
BETA_CURVE_COLUMNS = ("reward", "ref_logprob", "proposal_logprob")
BETA_CURVE_ROWS_PRINTED = 5


@dataclass
class InspectConfig:
    """Settings of `rlfree inspect`."""

    input_dir: str = field(
        metadata={
            "help": "Output folder of `rlfree generate`, `rlfree score` or `rlfree weight`; may also be given as the "
            "first argument: `rlfree inspect DIR`."
        }
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the plots and inspect.json go (default: an `inspect` folder inside --input_dir)."},
    )
    num_betas: int = field(
        default=25,
        metadata={"help": "Points of the beta curve, log-spaced from 0.01 to 100 times the within-prompt reward std."},
    )
    max_prompts_shown: int = field(default=20, metadata={"help": "Prompts listed in the per-prompt table."})

    def __post_init__(self):
        if self.num_betas < 2:
            raise StageInputError(f"--num_betas must be >= 2, got {self.num_betas}")
        if self.max_prompts_shown < 0:
            raise StageInputError(f"--max_prompts_shown must be >= 0, got {self.max_prompts_shown}")

    @property
    def report_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir is not None else Path(self.input_dir) / "inspect"


@dataclass
class PromptGroups:
    """Rows grouped by `prompt_index` (any order, gaps allowed), for per-prompt reductions."""

    prompt_index: np.ndarray  # each prompt's index, ascending
    row_group: np.ndarray  # each row's position in `prompt_index`
    first_row: np.ndarray  # a row of each prompt, to read per-prompt columns
    count: np.ndarray  # samples per prompt

    @classmethod
    def of(cls, prompt_index: np.ndarray) -> PromptGroups:
        prompts, first_row, row_group, count = np.unique(
            prompt_index, return_index=True, return_inverse=True, return_counts=True
        )
        return cls(prompts, row_group, first_row, count)

    def mean(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.row_group, weights=values, minlength=len(self.count)) / self.count

    def all_equal(self, values: np.ndarray) -> np.ndarray:
        """Whether each prompt's values are all the same (exactly, as the weights see them)."""
        low, high = np.full(len(self.count), np.inf), np.full(len(self.count), -np.inf)
        np.minimum.at(low, self.row_group, values)
        np.maximum.at(high, self.row_group, values)
        return low == high


def describe(values: np.ndarray, statistics: tuple[str, ...]) -> dict[str, float]:
    return {name: float(STATISTICS[name](values)) for name in statistics}


def read_columns(dataset: Dataset) -> dict[str, np.ndarray]:
    """The columns the report uses, through Arrow: float64 stays float64 (the numpy formatter gives float32)."""

    def numeric(name: str) -> bool:
        feature = dataset.features[name]
        return isinstance(feature, Value) and feature.dtype.startswith(("float", "int"))

    wanted = {"prompt_index", "num_tokens", "weight", *BETA_CURVE_COLUMNS, *WEIGHT_DIAGNOSTICS}
    names = [name for name in dataset.column_names if (name in wanted or name.startswith("reward_")) and numeric(name)]
    names += ["finish_reason"] if "finish_reason" in dataset.column_names else []
    table = dataset.select_columns(names).with_format("arrow")[:]
    return {name: table.column(name).to_numpy() for name in names}


def weight_diagnostics(columns: dict[str, np.ndarray], groups: PromptGroups) -> dict[str, np.ndarray]:
    """Per-prompt diagnostics as the weight stage recorded them (with the N it sampled), else computed from `weight`."""
    computed = diagnostics(torch.tensor(columns["weight"]), torch.tensor(groups.row_group))
    return {
        name: columns[name][groups.first_row] if name in columns else computed[name].numpy()
        for name in WEIGHT_DIAGNOSTICS
        if name in columns or name in FROM_WEIGHT_ALONE
    }


def weighting_settings(sidecar: dict[str, Any]) -> dict[str, Any]:
    """The weight stage's flags that were set away from their defaults (paths left out)."""
    defaults = {
        item.name: item.default for item in fields(WeightConfig) if item.name not in ("input_dir", "output_dir")
    }
    return {"weighting": sidecar.get("weighting")} | {
        name: sidecar[name] for name, default in defaults.items() if name in sidecar and sidecar[name] != default
    }


def reward_scale(reward: np.ndarray, groups: PromptGroups) -> float:
    """Pooled within-prompt reward std: beta's natural unit, since only differences within a prompt move weights."""
    return float(np.sqrt(np.mean((reward - groups.mean(reward)[groups.row_group]) ** 2)))


def beta_grid(scale: float, num_betas: int, used_beta: float | None) -> list[float]:
    """From 0.01 to 100 times the reward scale (nearly greedy to nearly pi_ref), plus the beta actually used."""
    grid = np.geomspace(0.01, 100.0, num_betas) * (scale if scale > 0 else 1.0)
    return np.union1d(grid, [used_beta] if used_beta is not None else []).tolist()


def used_beta(report: dict[str, Any]) -> float | None:
    """The global beta of weighting.json, marked on the beta curve."""
    beta = report.get("weighting", {}).get("beta")
    return float(beta) if isinstance(beta, (int, float)) and beta > 0 else None


def per_prompt_values(columns: dict[str, np.ndarray], groups: PromptGroups) -> dict[str, np.ndarray]:
    """One value per prompt, in `groups.prompt_index` order: what the table lists and the ESS plot draws."""
    values = {"prompt_index": groups.prompt_index, "count": groups.count}
    if "reward" in columns:
        values["mean_reward"] = groups.mean(columns["reward"])
    if "weight" in columns:
        values |= weight_diagnostics(columns, groups)
    return values


def summarize(
    dataset: Dataset,
    columns: dict[str, np.ndarray],
    groups: PromptGroups,
    per_prompt: dict[str, np.ndarray],
    sidecars: dict[str, dict[str, Any]],
    config: InspectConfig,
) -> dict[str, Any]:
    """The report as a JSON-ready dict; sections appear only when the columns they need do."""
    report: dict[str, Any] = {
        "input_dir": str(config.input_dir),
        "stages": list(sidecars),
        "num_rows": len(dataset),
        "num_prompts": len(groups.count),
        "samples_per_prompt": describe(groups.count, MIN_MEDIAN_MAX),
    }
    if "num_tokens" in columns:
        report["num_tokens"] = describe(columns["num_tokens"], ("mean", "median", "p95", "max"))
    if "finish_reason" in columns:
        reasons, counts = np.unique(columns["finish_reason"].astype(str), return_counts=True)
        report["finish_reasons"] = {
            reason: {"count": count, "share": count / len(dataset)}
            for reason, count in sorted(zip(reasons.tolist(), counts.tolist(), strict=True), key=lambda item: -item[1])
        }
    if "reward" in columns:
        reward_columns = ["reward"] + [name for name in columns if name.startswith("reward_")]
        report["rewards"] = {name: describe(columns[name], ("mean", "std", "min", "max")) for name in reward_columns}
        report["share_prompts_equal_rewards"] = float(groups.all_equal(columns["reward"]).mean())
    generation = sidecars.get("generation", {})
    if "backend" in generation:
        report["backend"] = generation["backend"]
    if generation.get("engine_mismatch"):
        report["engine_mismatch"] = generation["engine_mismatch"]
    if "weighting" in sidecars:
        report["weighting"] = weighting_settings(sidecars["weighting"])
    if "weight" in columns:
        report["weights"] = {
            name: describe(per_prompt[name], MIN_MEDIAN_MAX) for name in WEIGHT_DIAGNOSTICS if name in per_prompt
        }
    report["prompts"] = [
        {name: values[position].item() for name, values in per_prompt.items()}
        for position in range(min(config.max_prompts_shown, len(groups.count)))
    ]
    if all(name in columns for name in BETA_CURVE_COLUMNS):
        scale = reward_scale(columns["reward"], groups)
        # As the weighting stage reads them: a None, NaN or infinite value is refused, naming its column.
        correction = proposal_correction(dataset, family_of_data(config.input_dir))
        group = torch.tensor(columns["prompt_index"], dtype=torch.long)
        betas = beta_grid(scale, config.num_betas, used_beta(report))
        curve = beta_sweep(correction, finite_column(dataset, "reward"), group, betas)
        report["beta_curve"] = {"reward_scale": scale} | {name: list(values) for name, values in curve.items()}
    return report


# --- plots -----------------------------------------------------------------------------------------------------------


def write_plots(
    columns: dict[str, np.ndarray], per_prompt: dict[str, np.ndarray], report: dict[str, Any], output_dir: Path
) -> list[str]:
    """The plots the data allows; returns the paths written."""
    plots: dict[str, Callable[[Any], None]] = {}
    if "reward" in columns:
        plots["rewards.png"] = lambda axes: draw_histogram(axes, columns["reward"], "reward", "reward distribution")
    if "weight" in columns:
        plots["weights.png"] = lambda axes: draw_histogram(
            axes, columns["weight"], "self-normalized weight w_i (sums to 1 per prompt)", "weights", log_y=True
        )
    if "ess" in per_prompt:
        plots["ess.png"] = lambda axes: draw_ess(axes, per_prompt["ess"], per_prompt["count"])
    if "beta_curve" in report:
        plots["beta_curve.png"] = lambda axes: draw_beta_curve(axes, report["beta_curve"], used_beta(report))
    return [save_plot(output_dir / name, draw) for name, draw in plots.items()]


# --- text ------------------------------------------------------------------------------------------------------------

LABELS = {
    "prompt_index": "prompt",
    "count": "samples",
    "mean_reward": "mean reward",
    "ess": "ESS",
    "kl_estimate": "KL(pi*||p)",
    "kl_ref_estimate": "KL(pi*||pi_ref)",
    "max_weight": "largest weight",
    "beta": "beta",
    "rlif_exponent": "gamma",
}


def statistics_row(label: str, statistics: dict[str, float]) -> tuple[str, str]:
    """("label min / median / max", "1 / 2 / 3")."""
    return f"{label} {' / '.join(statistics)}", " / ".join(map(format_number, statistics.values()))


def format_beta_curve(curve: dict[str, list[float]], beta: float | None) -> str:
    """A few rows of the curve, evenly spaced in log beta, and the row of the beta used (starred)."""
    grid = [position for position, value in enumerate(curve["beta"]) if value != beta]
    shown = {grid[k] for k in np.linspace(0, len(grid) - 1, BETA_CURVE_ROWS_PRINTED).round().astype(int)}
    if beta is not None:
        shown.add(curve["beta"].index(beta))
    rows = [
        [
            format_number(curve["beta"][at]) + ("*" if curve["beta"][at] == beta else ""),
            format_number(curve["kl_ref_estimate"][at]),
            format_number(curve["ess_fraction"][at]),
        ]
        for at in sorted(shown)
    ]
    lines = [
        f"beta curve (beta from 0.01 to 100 x the within-prompt reward std {format_number(curve['reward_scale'])}):",
        format_table(["beta", "KL(pi*||pi_ref)", "ESS / N"], rows),
    ]
    if beta is not None:
        lines.append("  * the beta of weighting.json")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The printed report: overview, then the per-prompt table and the beta curve when there are any."""
    rows = [
        ("stages", " -> ".join(report["stages"]) or "none recorded (no sidecar JSON)"),
        ("rows", str(report["num_rows"])),
        ("prompts", str(report["num_prompts"])),
        statistics_row("samples per prompt", report["samples_per_prompt"]),
    ]
    if "num_tokens" in report:
        rows.append(statistics_row("completion tokens", report["num_tokens"]))
    if "finish_reasons" in report:
        reasons = report["finish_reasons"].items()
        rows.append(("finish reasons", ", ".join(f"{name} {n['count']} ({n['share']:.1%})" for name, n in reasons)))
    if "backend" in report:
        rows.append(("sampling backend", report["backend"]))
    if "engine_mismatch" in report:
        gap = report["engine_mismatch"]
        rows.append(
            (
                "engine vs pi_ref, per token",
                f"|log p_engine - log pi_ref| mean {gap['engine_gap_mean']:.3g}, max {gap['engine_gap_max']:.3g} "
                f"({gap['engine_gap_tokens']} tokens; the weights correct for it)",
            )
        )
    rows += [statistics_row(name, statistics) for name, statistics in report.get("rewards", {}).items()]
    if "share_prompts_equal_rewards" in report:
        share = report["share_prompts_equal_rewards"]
        rows.append(("prompts with all rewards equal", f"{share:.1%} (no signal: uniform weights at any beta)"))
    if "weighting" in report:
        weighting, *settings = report["weighting"].items()
        rows.append(("weighting", ", ".join([str(weighting[1])] + [f"{name}={value}" for name, value in settings])))
    rows += [statistics_row(LABELS[name], stats) for name, stats in report.get("weights", {}).items()]
    sections = [f"{report['input_dir']}:", format_rows(rows)]
    if report["prompts"]:
        header = list(report["prompts"][0])
        table = [
            [str(value) if isinstance(value, int) else format_number(value) for value in prompt.values()]
            for prompt in report["prompts"]
        ]
        sections += [
            f"\nper prompt (first {len(table)} of {report['num_prompts']}):",
            format_table([LABELS[name] for name in header], table),
        ]
    if "beta_curve" in report:
        sections.append("\n" + format_beta_curve(report["beta_curve"], used_beta(report)))
    if report.get("plots"):
        sections.append(f"\nplots: {', '.join(Path(path).name for path in report['plots'])} in {report['output_dir']}")
    return "\n".join(sections)


def inspect(config: InspectConfig) -> dict[str, Any]:
    """Summarize a stage's output folder: print the report, write it as inspect.json with the plots, return it."""
    dataset = load_stage(
        config.input_dir,
        ("prompt_index",),
        hint="Inspect the output folder of `rlfree generate`, `score` or `weight`.",
    )
    output_dir = config.report_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise StageInputError(
            f"--output_dir {output_dir} is an existing file: give a folder for the plots and inspect.json"
        )
    check_writable(output_dir)
    columns = read_columns(dataset)
    groups = PromptGroups.of(columns["prompt_index"])
    per_prompt = per_prompt_values(columns, groups)
    report = summarize(dataset, columns, groups, per_prompt, read_sidecars(config.input_dir), config)
    output_dir.mkdir(parents=True, exist_ok=True)
    report["output_dir"] = str(output_dir)
    report["plots"] = write_plots(columns, per_prompt, report, output_dir)
    (output_dir / "inspect.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"report: {output_dir / 'inspect.json'}")
    return report
