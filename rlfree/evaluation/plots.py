"""The plots of every report: one PNG per figure, matplotlib imported only when something is drawn."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def save_plot(path: Path, draw: Callable[[Any], None]) -> str:
    """Draw on one fresh set of axes and write it as a PNG (matplotlib is imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    draw(axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)


def draw_histogram(axes, values: np.ndarray, xlabel: str, title: str, log_y: bool = False) -> None:
    axes.hist(values, bins=50, color="#3b7dd8")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("samples")
    axes.set_title(title)


def draw_ess(axes, ess: np.ndarray, count: np.ndarray) -> None:
    order = np.argsort(ess, kind="stable")
    positions = np.arange(len(ess))
    axes.plot(positions, ess[order], ".", color="#3b7dd8", label="ESS = 1 / sum w^2")
    axes.plot(positions, count[order], "-", color="#999999", label="N (samples of the prompt)")
    axes.set_ylim(bottom=0)
    axes.set_xlabel("prompts, sorted by ESS")
    axes.set_ylabel("effective sample size")
    axes.set_title("ESS per prompt")
    axes.legend()


def draw_beta_curve(axes, curve: dict[str, list[float]], beta: float | None) -> None:
    kl_color, ess_color = "#3b7dd8", "#d8743b"
    axes.plot(curve["beta"], curve["kl_ref_estimate"], color=kl_color)
    axes.set_xscale("log")
    axes.set_xlabel("beta")
    axes.set_ylabel("plug-in KL(pi* || pi_ref), nats (mean over prompts)", color=kl_color)
    twin = axes.twinx()
    twin.plot(curve["beta"], curve["ess_fraction"], color=ess_color)
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("ESS / N (mean over prompts)", color=ess_color)
    if beta is not None:
        at = curve["beta"].index(beta)
        axes.axvline(beta, color="#999999", linestyle=":")
        axes.plot(beta, curve["kl_ref_estimate"][at], "o", color=kl_color)
        twin.plot(beta, curve["ess_fraction"][at], "o", color=ess_color)
    axes.set_title(
        "beta: KL to pi_ref vs effective sample size" + (f" (dotted: beta = {beta:.4g})" if beta is not None else "")
    )


def draw_rewards(axes, rewards_a: np.ndarray, rewards_b: np.ndarray) -> None:
    """Both reward distributions on shared bins, bars side by side."""
    bins = np.histogram_bin_edges(np.concatenate([rewards_a, rewards_b]), bins="auto")
    axes.hist([rewards_a, rewards_b], bins=bins, label=["A", "B"], color=["#3b7dd8", "#d8743b"])
    axes.set_xlabel("reward")
    axes.set_ylabel("samples")
    axes.set_title("reward distributions")
    axes.legend()
