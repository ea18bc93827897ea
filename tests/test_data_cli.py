"""Reading prompts, the atomic stage writer, and the command line (flags, YAML recipes, the real `python -m rlfree`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from rlfree.cli import main
from rlfree.data import StageInputError, load_prompts, save_stage
from rlfree.lm.trainer import RLFreeConfig
from rlfree.recipe import parse_command
from rlfree.stages.score import ScoreConfig
from rlfree.stages.train import ModelConfig
from rlfree.stages.weight import WeightConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# Non-numeric answers, so CSV type inference keeps them as strings.
PROMPT_ROWS = [
    {"prompt": "1 + 2 =", "answer": "three"},
    {"prompt": "4 + 4 =", "answer": "eight"},
    {"prompt": "0 + 9 =", "answer": "nine"},
]


# The real `python -m rlfree weight` run pays several seconds of imports, so it starts in the background when this
# module starts and the test at the bottom of the file collects its result. (The failing call is checked in-process
# through `main`, the same entry point, to keep the suite fast on a busy machine.)


class CliRun:
    def __init__(self, root: Path, process: subprocess.Popen):
        self.root, self.process, self._result = root, process, None

    def result(self) -> tuple[int, str, str]:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=120)
            self._result = (self.process.returncode, stdout, stderr)
        return self._result


def tiny_scored_dataset() -> Dataset:
    """Three samples of one prompt, rewards 1, 0, 0, proposal = pi_ref: with beta = 0.5, log w = 2, 0, 0."""
    return Dataset.from_dict(
        {
            "prompt": ["1 + 2 ="] * 3,
            "completion": [" 3", " 4", " 5"],
            "prompt_index": [0, 0, 0],
            "ref_logprob": [-1.0, -2.0, -3.0],
            "proposal_logprob": [-1.0, -2.0, -3.0],
            "num_tokens": [2, 2, 2],
            "reward": [1.0, 0.0, 0.0],
        }
    )


@pytest.fixture(scope="module", autouse=True)
def cli_run(request, tmp_path_factory):
    if not any("cli_run" in item.fixturenames for item in request.session.items if item.module is request.module):
        yield None  # no selected test needs the subprocess
        return
    root = tmp_path_factory.mktemp("cli")
    tiny_scored_dataset().save_to_disk(str(root / "scored"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "rlfree", "weight", "--input_dir", str(root / "scored")]
    command += ["--weighting", "rlhf", "--beta", "0.5", "--output_dir", str(root / "weighted")]
    process = subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield CliRun(root, process)
    if process.poll() is None:
        process.kill()
        process.communicate()


# --- load_prompts ----------------------------------------------------------------------------------------------------


def write_prompts(directory: Path, kind: str, rows: list[dict]) -> Path:
    if kind == "jsonl":
        path = directory / "prompts.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path = directory / "prompts.json"
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        path = directory / "prompts.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        path = directory / "prompts.csv"
        path.write_text("prompt,answer\n" + "".join(f"{row['prompt']},{row['answer']}\n" for row in rows))
    elif kind == "save_to_disk":
        path = directory / "prompts_folder"
        Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_load_prompts_reads_every_supported_format_to_the_same_rows(tmp_path, kind):
    dataset = load_prompts(str(write_prompts(tmp_path, kind, PROMPT_ROWS)))
    assert dataset.to_list() == PROMPT_ROWS


def test_load_prompts_accepts_a_messages_column(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "What is 1 + 2?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "4 + 4?"}]},
    ]
    dataset = load_prompts(str(write_prompts(tmp_path, "jsonl", rows)))
    assert dataset.column_names == ["messages"]
    assert dataset.to_list() == rows


def test_load_prompts_reads_a_conversational_prompt_column_as_messages(tmp_path):
    # TRL's conversational datasets (trl-lib/ultrafeedback-prompt, say) keep the chat under `prompt`.
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"}]
    dataset = load_prompts(str(write_prompts(tmp_path, "jsonl", rows)))
    assert sorted(dataset.column_names) == ["answer", "messages"]
    assert dataset[0]["messages"] == rows[0]["prompt"]


def test_load_prompts_without_prompt_or_messages_names_the_columns(tmp_path):
    path = write_prompts(tmp_path, "jsonl", [{"question": "1 + 2 =", "answer": "three"}])
    with pytest.raises(
        StageInputError, match=r"needs a 'prompt' column .* or a 'messages' column .*\['question', 'answer'\]"
    ):
        load_prompts(str(path))


def test_load_prompts_rejects_an_empty_saved_dataset(tmp_path):
    path = tmp_path / "empty_folder"
    Dataset.from_list(PROMPT_ROWS).filter(lambda row: False).save_to_disk(str(path))
    with pytest.raises(StageInputError, match=r"the prompt set is empty"):
        load_prompts(str(path))


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("header_only.csv", "prompt,answer\n")])
def test_load_prompts_rejects_an_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(StageInputError, match=r"empty"):
        load_prompts(str(path))


def test_load_prompts_rejects_an_unsupported_suffix(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("1 + 2 =\n")
    with pytest.raises(
        StageInputError, match=r"unsupported file type '\.txt'; use \.jsonl, \.json, \.parquet or \.csv"
    ):
        load_prompts(str(path))


# --- save_stage ------------------------------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".incomplete-" in p.name or ".old-" in p.name)


class ExplodingDataset:
    """Writes part of a dataset, then fails, like a full disk or a killed process halfway through save_to_disk."""

    def save_to_disk(self, path: str) -> None:
        Path(path, "data-00000-of-00002.arrow").write_bytes(b"partial")
        raise OSError("disk full")


def test_save_stage_writes_dataset_and_sidecars_atomically(tmp_path):
    earlier = tmp_path / "generated"
    earlier.mkdir()
    (earlier / "generation.json").write_text(json.dumps({"num_samples": 4}))
    (earlier / "unrelated.json").write_text("{}")
    output = tmp_path / "stages" / "scored"

    save_stage(Dataset.from_list(PROMPT_ROWS), output, "scoring", {"reward": ["r.py:f"]}, input_dir=earlier)

    assert load_from_disk(str(output)).to_list() == PROMPT_ROWS
    assert json.loads((output / "scoring.json").read_text()) == {"reward": ["r.py:f"], "working_dir": os.getcwd()}
    assert json.loads((output / "generation.json").read_text()) == {"num_samples": 4}
    assert not (output / "unrelated.json").exists()
    assert leftovers(output.parent) == []
    assert sorted(p.name for p in output.parent.iterdir()) == ["scored"]


def test_save_stage_failing_midway_leaves_no_output_and_no_staging_folder(tmp_path):
    output = tmp_path / "scored"
    with pytest.raises(OSError, match="disk full"):
        save_stage(ExplodingDataset(), output, "scoring", {})
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_stage_failing_midway_keeps_the_previous_output(tmp_path):
    output = tmp_path / "scored"
    save_stage(Dataset.from_list(PROMPT_ROWS), output, "scoring", {"run": 1})
    with pytest.raises(OSError, match="disk full"):
        save_stage(ExplodingDataset(), output, "scoring", {"run": 2})
    assert load_from_disk(str(output)).to_list() == PROMPT_ROWS
    assert json.loads((output / "scoring.json").read_text()) == {"run": 1, "working_dir": os.getcwd()}
    assert leftovers(tmp_path) == []


def test_save_stage_overwrites_an_existing_output(tmp_path):
    output = tmp_path / "weighted"
    save_stage(Dataset.from_list(PROMPT_ROWS), output, "scoring", {"run": 1})
    save_stage(Dataset.from_list(PROMPT_ROWS[:1]), output, "weighting", {"run": 2})
    assert load_from_disk(str(output)).to_list() == PROMPT_ROWS[:1]
    assert json.loads((output / "weighting.json").read_text()) == {"run": 2, "working_dir": os.getcwd()}
    assert not (output / "scoring.json").exists()  # the whole folder was replaced, not merged
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weighted"]


# --- parse_command ---------------------------------------------------------------------------------------------------


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


# --- main() and the real command -------------------------------------------------------------------------------------


def test_main_reports_a_stage_input_error_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["weight", "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"), "--beta", "1"])
    assert exit_info.value.code == 2
    assert "rlfree weight: error: --input_dir" in capsys.readouterr().err


def test_main_rejects_an_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_main_rejects_an_unknown_flag_with_exit_code_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["weight", "--input_dir", "i", "--output_dir", "o", "--beta", "1", "--betta", "2"])
    assert exit_info.value.code == 2


def test_python_m_rlfree_weight_exits_0_and_writes_the_weighted_dataset(cli_run):
    returncode, stdout, stderr = cli_run.result()
    assert returncode == 0, stderr
    output = cli_run.root / "weighted"
    weights = load_from_disk(str(output)).to_dict()["weight"]
    e2 = math.exp(2)  # r / beta = 2, 0, 0
    assert weights == pytest.approx([e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)], rel=1e-12)
    assert json.loads((output / "weighting.json").read_text())["beta"] == 0.5
    assert "ESS" in stdout
    assert f"wrote weights to {output}" in stdout


def test_weight_with_negative_beta_exits_2_naming_the_flag(tmp_path, capsys):
    tiny_scored_dataset().save_to_disk(str(tmp_path / "scored"))
    argv = ["weight", "--input_dir", str(tmp_path / "scored"), "--output_dir", str(tmp_path / "never")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--weighting", "rlhf", "--beta", "-1"])
    assert exit_info.value.code == 2
    assert "rlfree weight: error: --weighting rlhf needs --beta > 0 (or --target_kl / --target_ess), got -1.0" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "command", ["generate", "score", "weight", "train", "run", "inspect", "sample", "evaluate", "ab", "demo"]
)
def test_every_command_has_help(command, capsys):
    from rlfree.commands import COMMANDS

    assert command in COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: rlfree {command}" in capsys.readouterr().out


def test_settings_are_compared_by_the_place_they_name(tmp_path, monkeypatch):
    """A path recorded relative to the folder its run started in is the same setting as that place typed any other
    way; the same spelling from another folder is not. Hub ids compare as written; a prompt file by its contents."""
    from rlfree.data import changed_settings
    from rlfree.sources import content_fingerprint

    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        (folder / "data").mkdir(parents=True)
    (first / "p.jsonl").write_text('{"prompt": "1 + 2 ="}\n')
    recorded = {
        "input_dir": "data", "output_dir": "out/", "model_name_or_path": "org/model", "prompts": "p.jsonl",
        "prompts_fingerprint": content_fingerprint(str(first / "p.jsonl")), "reward": ["r.py:f", "pkg.mod:f"],
        "working_dir": str(first),
    }  # fmt: skip
    monkeypatch.chdir(second)
    same = {
        "input_dir": str(first / "data"), "output_dir": f"{first}/./out", "model_name_or_path": "org/model",
        "prompts": str(first / "p.jsonl"), "reward": [f"{first}/r.py:f", "pkg.mod:f"],
    }  # fmt: skip
    assert changed_settings(recorded, same) == {}
    (second / "copy.jsonl").write_text((first / "p.jsonl").read_text())
    assert changed_settings(recorded, {"prompts": "copy.jsonl"}) == {}
    (second / "copy.jsonl").write_text('{"prompt": "2 + 2 ="}\n')
    other = {
        "input_dir": "data", "model_name_or_path": "org/other", "prompts": "copy.jsonl", "reward": ["r.py:g", "pkg.mod:f"],
    }  # fmt: skip
    assert set(changed_settings(recorded, other)) == set(other)
