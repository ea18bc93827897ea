"""The command line against what users really type: misspelled and abbreviated flags, recipe values overridden from
the command line, `rlfree inspect DIR`, a fast `--help`, and messages printed once per `accelerate launch` job."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset

import rlfree.data
from rlfree.cli import main
from rlfree.errors import StageInputError
from rlfree.lm.trainer import RLFreeConfig
from rlfree.recipe import parse_command
from rlfree.stages.generate import GenerateConfig
from rlfree.stages.train import ModelConfig
from rlfree.stages.weight import WeightConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_RECIPE = REPO_ROOT / "recipes" / "toy.yaml"


def scored_dataset() -> Dataset:
    """Two prompts of four samples with distinct rewards, proposal = pi_ref: a plug-in KL of 0.3 nats is reachable."""
    rewards = [1.0, 0.5, 0.0, -0.5, 0.0, 1.0, 0.25, 0.75]
    return Dataset.from_dict(
        {
            "prompt": ["1 + 2 ="] * 4 + ["2 + 2 ="] * 4,
            "completion": [" 3", " 4", " 5", " 6", " 3", " 4", " 5", " 6"],
            "prompt_index": [0] * 4 + [1] * 4,
            "ref_logprob": [-1.0, -2.0, -1.5, -3.0] * 2,
            "proposal_logprob": [-1.0, -2.0, -1.5, -3.0] * 2,
            "num_tokens": [2] * 8,
            "reward": rewards,
        }
    )


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`rlfree ARGV` in-process: its exit code (0 when it returns) and what it printed."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- unknown and abbreviated flags -----------------------------------------------------------------------------------


def test_misspelled_flag_is_named_with_a_close_match_not_reported_as_a_missing_one(capsys):
    code, _, err = run_main(["weight", "--input_dir", "A", "--output_dir", "B", "--beat", "0.5"], capsys)
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


# --- a fast `rlfree --help` ------------------------------------------------------------------------------------------


def test_help_imports_no_torch_transformers_or_datasets():
    code = (
        "import rlfree.cli, sys; rlfree.cli.main(['--help']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules, 'datasets' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: rlfree <command>" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False False False"


def test_public_names_still_import_from_the_package():
    import rlfree
    from rlfree import WeightConfig as PublicWeightConfig
    from rlfree import inspect_stage, weight
    from rlfree.evaluation.inspect import inspect
    from rlfree.stages.weight import weight as weight_stage

    assert (PublicWeightConfig, weight, inspect_stage) == (WeightConfig, weight_stage, inspect)
    assert set(rlfree.__all__) <= set(dir(rlfree))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rlfree.nope  # noqa: B018


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


def test_documented_target_kl_command_replaces_the_recipes_beta(toy_checkout, capsys):
    argv = documented_weight_command()
    assert "--target_kl" in argv
    output = toy_checkout / argv[argv.index("--output_dir") + 1]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    settings = json.loads((output / "weighting.json").read_text())
    assert settings["target_kl"] == 0.3
    assert settings["solved"] == "beta"
    assert settings["beta"] > 0 and settings["beta"] != 0.5  # solved from the data, not the recipe's 0.5
    assert out.count(f"wrote weights to {output.relative_to(toy_checkout)}") == 1


def test_recipe_beta_still_applies_without_a_target_on_the_command_line(toy_checkout, capsys):
    code, _, err = run_main(["weight", "--config", "recipes/toy.yaml", "--output_dir", "toy_run/plain"], capsys)
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


# --- `rlfree inspect DIR` --------------------------------------------------------------------------------------------


def test_inspect_help_shows_the_positional_form(capsys):
    code, out, _ = run_main(["inspect", "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: rlfree inspect DIR [flags]")


# --- one message per `accelerate launch` job -------------------------------------------------------------------------


def test_stage_message_is_printed_by_the_main_process_only(tmp_path, monkeypatch, capsys):
    scored_dataset().save_to_disk(str(tmp_path / "scored"))
    argv = ["weight", "--input_dir", str(tmp_path / "scored"), "--beta", "0.5", "--output_dir"]
    code, out, err = run_main(argv + [str(tmp_path / "main")], capsys)
    assert code == 0, err
    assert out.count("wrote weights to") == 1
    # Another process of the job: the stage itself still runs (here, alone), but the CLI stays quiet.
    monkeypatch.setattr(rlfree.data, "process_state", lambda: SimpleNamespace(is_main_process=False))
    code, out, err = run_main(argv + [str(tmp_path / "other")], capsys)
    assert code == 0, err
    assert (tmp_path / "other").is_dir()
    assert "wrote weights to" not in out


# --- install advice that works ---------------------------------------------------------------------------------------


def test_install_advice_is_for_a_checkout_since_rlfree_is_on_no_package_index(monkeypatch, capsys):
    assert "pip install 'rlfree[" not in (REPO_ROOT / "README.md").read_text()
    monkeypatch.setitem(sys.modules, "trl", None)  # TRL missing: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "rlfree.baselines", raising=False)
    monkeypatch.delitem(sys.modules, "rlfree.baselines.rloo", raising=False)  # imported by an earlier test
    code, out, err = run_main(["baseline", "--help"], capsys)
    assert code == 2
    assert "`rlfree baseline` needs TRL" in err
    assert "pip install -e '.[baselines]'" in err
    assert "pip install -e '.[baselines]'" in run_main(["--help"], capsys)[1]
