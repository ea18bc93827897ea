"""Text tables of every report rlfree prints: stage summaries, evaluations, comparisons and inspections."""

from __future__ import annotations


def format_number(value: float) -> str:
    return f"{value:.4g}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  " + "  ".join(f"{cell:>{width}}" for cell, width in zip(line, widths, strict=True))
        for line in [header, *rows]
    )


def format_rows(rows: list[tuple[str, str]]) -> str:
    """Label / value lines with the values aligned."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def format_weighting_summary(summary: dict) -> str:
    """The weighting stage's summary (`rlfree.weights.summarize` and what it solved, dropped, truncated, pruned)."""
    rows = [("prompts", f"{summary['num_prompts']}"), ("samples", f"{summary['num_samples']}")]
    if summary.get("beta_scope") == "prompt":
        rows.append(
            (
                f"{summary['solved']} per prompt min / median / max",
                f"{summary['solved_min']:.4g} / {summary[summary['solved']]:.4g} / {summary['solved_max']:.4g}",
            )
        )
    elif "solved" in summary:
        rows.append((f"{summary['solved']} (solved)", f"{summary[summary['solved']]:.4g}"))
    rows += [
        ("ESS min / median", f"{summary['ess_min']:.2f} / {summary['ess_median']:.2f}"),
        (
            "KL estimate mean / max",
            f"{summary['kl_estimate_mean']:.3f} / {summary['kl_estimate_max']:.3f} nats",
        ),
        ("KL to pi_ref estimate mean", f"{summary['kl_ref_estimate_mean']:.3f} nats"),
        ("prompts with ESS < 2", f"{100 * summary['share_ess_below_2']:.1f}%"),
        ("largest weight", f"{summary['max_weight_max']:.3f}"),
    ]
    if "truncated_mass_mean" in summary:
        rows.append(
            (
                "mass truncated mean / max",
                f"{summary['truncated_mass_mean']:.4f} / {summary['truncated_mass_max']:.4f} per prompt",
            )
        )
    if "pruned_mass_mean" in summary:
        rows.append(
            (
                "pruned samples (mass mean / max)",
                f"{summary['pruned_samples']} ({summary['pruned_mass_mean']:.2e} / {summary['pruned_mass_max']:.2e})",
            )
        )
    if "dropped_uniform_prompts" in summary:
        rows.append(("prompts dropped (uniform weights)", str(summary["dropped_uniform_prompts"])))
    return format_rows(rows)
