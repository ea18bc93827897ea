"""Every shipped recipe section parses into its command's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfree.cli import parse_command
from rlfree.generation import GenerateConfig
from rlfree.rewards import ScoreConfig
from rlfree.training import ModelConfig, RLFreeConfig
from rlfree.weighting import WeightConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize(
    ("command", "types", "field", "expected"),
    [
        ("generate", (GenerateConfig,), "num_samples", 256),
        ("score", (ScoreConfig,), "reward", ["rlfree.toy:arithmetic_reward"]),
        ("weight", (WeightConfig,), "beta", 0.5),
        ("train", (ModelConfig, RLFreeConfig), "learning_rate", 0.002),
    ],
)
def test_toy_recipe_sections_parse(command, types, field, expected):
    parsed = parse_command(command, types, ["--config", str(RECIPES / "toy.yaml")])
    assert any(getattr(config, field, None) == expected for config in parsed)
