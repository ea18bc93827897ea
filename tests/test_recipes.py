"""Every shipped recipe section parses into its command's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlfree.commands import COMMANDS, command_types
from rlfree.lm.trainer import RLFreeConfig
from rlfree.recipe import parse_command
from rlfree.rewards.scoring import load_reward_function
from rlfree.stages.generate import GenerateConfig
from rlfree.stages.score import ScoreConfig
from rlfree.stages.train import ModelConfig
from rlfree.stages.weight import WeightConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
PIPELINE = ("generate", "weight", "train")  # the sections `rlfree run` needs


def recipe_commands(path: Path) -> list[str]:
    """The commands a recipe drives: its sections, plus `run` when it holds a whole pipeline."""
    recipe = yaml.safe_load(path.read_text()) or {}
    sections = [key for key in recipe if key in COMMANDS]
    if all(stage in recipe for stage in PIPELINE) and "run" not in sections:
        sections.append("run")
    return sections


CASES = [
    pytest.param(path, command, id=f"{path.stem}-{command}")
    for path in RECIPE_FILES
    for command in recipe_commands(path)
]


def test_recipes_are_found():
    names = {path.name for path in RECIPE_FILES}
    assert {"toy.yaml", "toy_rloo.yaml", "qwen_gsm8k.yaml", "hub_reward_model.yaml"} <= names
    assert all(recipe_commands(path) for path in RECIPE_FILES)


@pytest.mark.parametrize(("path", "command"), CASES)
def test_every_recipe_section_parses(path, command):
    """Each section's keys are real flags of its command, and the section alone fills every required flag."""
    if command == "baseline":
        pytest.importorskip("trl")
    parsed = parse_command(command, command_types(command), ["--config", str(path)])
    assert parsed
    recipe = yaml.safe_load(path.read_text())
    for key, value in (recipe.get(command) or {}).items():
        found = [getattr(config, key) for config in parsed if hasattr(config, key)]
        assert found, f"{path.name}: {command}.{key} did not reach the settings"
        if isinstance(value, bool | int | float | str) and not isinstance(found[0], list):
            assert found[0] == value or str(found[0]) == str(value) or found[0] == type(found[0])(value), (
                f"{path.name}: {command}.{key} = {found[0]!r}, expected {value!r}"
            )


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda path: path.stem)
def test_recipe_rewards_import(path):
    """Reward functions named in a recipe import (reward models are Hub ids: not downloaded here)."""
    recipe = yaml.safe_load(path.read_text()) or {}
    specs = list(recipe.get("reward") or [])
    for section in recipe.values():
        if isinstance(section, dict):
            specs += section.get("reward") or []
    for spec in specs:
        assert callable(load_reward_function(spec))


@pytest.mark.parametrize("name", ["qwen_gsm8k.yaml", "hub_reward_model.yaml"])
def test_gpu_recipes_say_how_to_run_them(name):
    header = (RECIPES / name).read_text().split("\ngenerate:")[0]
    assert "H100" in header
    assert "rlfree run --config recipes/" in header
    assert "time" in header


def test_gpu_recipe_batches_are_64_sequences_per_step():
    qwen = yaml.safe_load((RECIPES / "qwen_gsm8k.yaml").read_text())["train"]
    assert qwen["per_device_train_batch_size"] * qwen["gradient_accumulation_steps"] == 64  # 1 GPU
    hub = yaml.safe_load((RECIPES / "hub_reward_model.yaml").read_text())["train"]
    assert hub["per_device_train_batch_size"] * hub["gradient_accumulation_steps"] * 8 == 64  # 8 GPUs


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
