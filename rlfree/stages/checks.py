"""Checking the output folders of several stages before the first of them writes anything.

A multi-stage command (the demos) that rewrites its inputs first (a reference model, a prompt file) and only then
finds a stage folder it must not replace would leave stage outputs that no longer match their inputs. Each stage's
own `check_output` runs here up front, on every stage's configs.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..training import ModelConfig
from . import generate, score, train, weight

CHECKS = {
    generate.GenerateConfig: generate.check_output,
    score.ScoreConfig: score.check_output,
    weight.WeightConfig: weight.check_output,
    ModelConfig: train.check_output,
}


def check_outputs(stages: Iterable[tuple]) -> None:
    """Run each stage's output check on its configs (a tuple: `(config,)`, or `(ModelConfig, RLFreeConfig)`)."""
    for configs in stages:
        CHECKS[type(configs[0])](*configs)
