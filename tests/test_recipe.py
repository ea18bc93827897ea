"""Flags and YAML recipes (`rlfree.recipe.parse_command`): misspelled and abbreviated flags, recipe values overridden
from the command line, and every shipped recipe section parsing into its command's settings."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from rlfree.commands import COMMANDS, command_types
from rlfree.errors import StageInputError
from rlfree.recipe import parse_command
from rlfree.rewards.scoring import load_reward_function
from rlfree.stages.generate import GenerateConfig
from rlfree.stages.score import ScoreConfig
from rlfree.stages.weight import WeightConfig
from rlfree.training import ModelConfig, RLFreeConfig
from tests.helpers import RECIPES, scored_dataset

TOY_RECIPE = RECIPES / "toy.yaml"


# --- flags and recipe values -----------------------------------------------------------------------------------------


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_flags_parse_into_the_dataclass():
    argv = [
        "--input_dir",
        "in",
        "--output_dir",
        "out",
        "--weighting",
        "rlhf+rlif",
        "--beta",
        "0.25",
        "--beta_if",
        "0.5",
        "--rlif_length",
        "7",
    ]
    (config,) = parse_command("weight", (WeightConfig,), argv)
    assert config == WeightConfig(
        input_dir="in", output_dir="out", weighting="rlhf+rlif", beta=0.25, beta_if=0.5, rlif_length=7
    )


def test_list_and_bool_flags_parse():
    argv = "--input_dir in --output_dir out --reward a.py:f rlfree.toy:g --reward_weights 1 0.5 --drop_invalid_rewards"
    (config,) = parse_command("score", (ScoreConfig,), argv.split())
    assert config.reward == ["a.py:f", "rlfree.toy:g"]
    assert config.reward_weights == [1.0, 0.5]
    assert config.drop_invalid_rewards is True


RECIPE = """\
input_dir: flat_in
output_dir: flat_out
beta: 0.1
weight:
  beta: 0.7
  weighting: rlhf
score:
  reward: [rlfree.toy:arithmetic_reward]
"""


def test_config_file_supplies_flat_keys_and_the_command_section_wins(tmp_path):
    recipe = write_yaml(tmp_path / "recipe.yaml", RECIPE)
    (config,) = parse_command("weight", (WeightConfig,), ["--config", recipe])
    assert config == WeightConfig(input_dir="flat_in", output_dir="flat_out", weighting="rlhf", beta=0.7)


def test_command_line_flags_override_the_config_file(tmp_path):
    recipe = write_yaml(tmp_path / "recipe.yaml", RECIPE)
    (config,) = parse_command("weight", (WeightConfig,), ["--beta", "2.5", "--config", recipe, "--output_dir", "cli"])
    assert config == WeightConfig(input_dir="flat_in", output_dir="cli", weighting="rlhf", beta=2.5)


def test_config_file_uses_only_its_own_commands_section(tmp_path):
    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        "output_dir: flat_out\nweight:\n  beta: 0.7\nscore:\n  reward: [rlfree.toy:arithmetic_reward]\n",
    )
    (config,) = parse_command("score", (ScoreConfig,), ["--config", recipe, "--input_dir", "generated"])
    assert config.reward == ["rlfree.toy:arithmetic_reward"]
    assert (config.input_dir, config.output_dir) == ("generated", "flat_out")


def test_flat_key_of_another_command_does_not_break_this_one(tmp_path):
    recipe = write_yaml(tmp_path / "recipe.yaml", "model_name_or_path: tiny\n" + RECIPE)
    (config,) = parse_command("weight", (WeightConfig,), ["--config", recipe])
    assert config.beta == 0.7


def test_yaml_exponent_without_a_dot_is_still_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; the flag's type must turn it into a float all the same.
    recipe = write_yaml(tmp_path / "recipe.yaml", "input_dir: i\noutput_dir: o\nbeta: 1e-3\n")
    (config,) = parse_command("weight", (WeightConfig,), ["--config", recipe])
    assert config.beta == 0.001


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("input_dir: i\noutput_dir: o\nbeta: 1.0\nbetta: 2.0\n", "betta"),
        ("input_dir: i\noutput_dir: o\nweight:\n  beta: 1.0\n  num_samples: 4\n", "num_samples"),
    ],
    ids=["flat", "section"],
)
def test_unknown_config_key_is_named(tmp_path, text, key):
    recipe = write_yaml(tmp_path / "recipe.yaml", text)
    with pytest.raises(StageInputError, match=rf"unknown key\(s\) for `rlfree weight`: \['{key}'\]"):
        parse_command("weight", (WeightConfig,), ["--config", recipe])


def test_scalar_yaml_value_for_a_list_flag_becomes_a_list(tmp_path):
    recipe = write_yaml(
        tmp_path / "recipe.yaml", "input_dir: i\noutput_dir: o\nreward: rlfree.toy:arithmetic_reward\n"
    )
    (config,) = parse_command("score", (ScoreConfig,), ["--config", recipe])
    assert config.reward == ["rlfree.toy:arithmetic_reward"]


def test_train_accepts_training_arguments_flags_on_the_command_line(tmp_path):
    argv = [
        "--model_name_or_path", "tiny", "--dataset_dir", "weighted", "--output_dir", str(tmp_path / "model"),
        "--warmup_steps", "3", "--lr_scheduler_type", "constant", "--report_to", "none", "--lora_r", "4",
    ]  # fmt: skip
    model_config, args = parse_command("train", (ModelConfig, RLFreeConfig), argv)
    assert model_config.model_name_or_path == "tiny"
    assert model_config.lora_r == 4
    assert args.dataset_dir == "weighted"
    assert args.warmup_steps == 3
    assert args.lr_scheduler_type == "constant"


def test_train_accepts_training_arguments_from_the_config_file(tmp_path):
    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        f"""\
train:
  model_name_or_path: tiny
  dataset_dir: weighted
  output_dir: {tmp_path / "model"}
  warmup_steps: 3
  lr_scheduler_type: constant
  learning_rate: 0.002
  report_to: none
""",
    )
    model_config, args = parse_command(
        "train", (ModelConfig, RLFreeConfig), ["--config", recipe, "--warmup_steps", "5"]
    )
    assert model_config.model_name_or_path == "tiny"
    assert args.warmup_steps == 5
    assert args.lr_scheduler_type == "constant"
    assert args.learning_rate == 0.002


# --- unknown and abbreviated flags -----------------------------------------------------------------------------------


def test_misspelled_flag_is_named_with_a_close_match_not_reported_as_a_missing_one(run_cli):
    code, _, err = run_cli(["weight", "--input_dir", "A", "--output_dir", "B", "--beat", "0.5"])
    assert code == 2
    assert "rlfree weight: error: unknown flag --beat (did you mean --beta?)" in err
    assert "needs --beta" not in err


def test_every_unknown_flag_is_named_including_the_equals_form():
    with pytest.raises(StageInputError) as error:
        parse_command("weight", (WeightConfig,), ["--input_dir=i", "--output_dir", "o", "--betta=1", "--zzzz", "3"])
    message = str(error.value)
    assert "unknown flag --betta (did you mean --beta?)" in message
    assert "unknown flag --zzzz" in message
    assert "--input_dir" not in message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_sample", "3"], "unknown flag --num_sample (did you mean --num_samples?)"),
        (["--conf", "recipe.yaml"], "unknown flag --conf (did you mean --config?)"),
    ],
    ids=["flag", "config"],
)
def test_an_abbreviated_flag_is_refused(argv, message):
    base = ["--model_name_or_path", "m", "--prompts", "p.jsonl", "--max_new_tokens", "3", "--output_dir", "o"]
    with pytest.raises(StageInputError, match=f"^{re.escape(message)}$"):
        parse_command("generate", (GenerateConfig,), base + argv)


def test_train_still_takes_training_arguments_and_their_no_flags(tmp_path):
    argv = [
        "--model_name_or_path", "tiny", "--dataset_dir", "weighted", "--output_dir", str(tmp_path / "model"),
        "--learning_rate=0.01", "--no_log_on_each_node", "--report_to", "none", "--lora-r", "4",
    ]  # fmt: skip
    model_config, args = parse_command("train", (ModelConfig, RLFreeConfig), argv)
    assert (model_config.lora_r, args.learning_rate, args.log_on_each_node) == (4, 0.01, False)


# --- command-line values win over their alternatives from a recipe ---------------------------------------------------


def documented_weight_command() -> list[str]:
    """The one-stage `rlfree weight` command that the toy recipe's header documents, as argv."""
    header = [line.lstrip("# ") for line in TOY_RECIPE.read_text().splitlines() if line.startswith("#")]
    (line,) = [line for line in header if line.startswith("rlfree weight --config")]
    argv = shlex.split(line, comments=True)
    assert argv[0] == "rlfree"
    return argv[1:]


@pytest.fixture
def toy_checkout(tmp_path, monkeypatch):
    """A working folder laid out as the toy recipe expects: recipes/toy.yaml and a scored toy_run/scored."""
    (tmp_path / "recipes").mkdir()
    shutil.copy(TOY_RECIPE, tmp_path / "recipes" / "toy.yaml")
    scored_dataset().save_to_disk(str(tmp_path / "toy_run" / "scored"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_documented_target_kl_command_replaces_the_recipes_beta(toy_checkout, run_cli):
    argv = documented_weight_command()
    assert "--target_kl" in argv
    output = toy_checkout / argv[argv.index("--output_dir") + 1]
    code, out, err = run_cli(argv)
    assert code == 0, err
    settings = json.loads((output / "weighting.json").read_text())
    assert settings["target_kl"] == 0.3
    assert settings["solved"] == "beta"
    assert settings["beta"] > 0 and settings["beta"] != 0.5  # solved from the data, not the recipe's 0.5
    assert out.count(f"wrote weights to {output.relative_to(toy_checkout)}") == 1


def test_recipe_beta_still_applies_without_a_target_on_the_command_line(toy_checkout, run_cli):
    code, _, err = run_cli(["weight", "--config", "recipes/toy.yaml", "--output_dir", "toy_run/plain"])
    assert code == 0, err
    settings = json.loads((toy_checkout / "toy_run" / "plain" / "weighting.json").read_text())
    assert (settings["beta"], settings["target_kl"]) == (0.5, None)
    assert "solved" not in settings


def test_a_command_line_alternative_drops_only_its_own_group(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("input_dir: i\noutput_dir: o\nweight:\n  weighting: rlhf+rlif\n  beta: 0.5\n  beta_if: 0.4\n")
    (config,) = parse_command("weight", (WeightConfig,), ["--config", str(recipe), "--rlif_exponent", "0.2"])
    assert (config.beta, config.rlif_exponent, config.beta_if) == (0.5, 0.2, None)
    (config,) = parse_command("weight", (WeightConfig,), ["--config", str(recipe), "--target_ess", "0.5"])
    assert (config.beta, config.target_ess, config.beta_if) == (None, 0.5, 0.4)


# --- the shipped recipes ---------------------------------------------------------------------------------------------


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
