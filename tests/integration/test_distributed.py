"""Data parallelism, proven with two real processes: `accelerate launch --multi_gpu`, which on a CPU-only machine
starts two gloo ranks; each run asserts that it saw a world of two.

Training: 1 process x batch 32, 1 x 16 with 2 accumulation steps, 2 processes x 16, and 2 x 8 with 2 accumulation
steps all take optimizer steps over the same 32 sequences; with the loss divided by the same constant everywhere they
must end with the same weights. Plain SGD keeps the comparison sharp (Adam's first steps are nearly sign(g) and would
hide a wrong scale). Generation, scoring and whole recipes write the same datasets with two processes as with one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from rlfree.stages.generate import generate
from rlfree.stages.score import ScoreConfig, score
from rlfree.stages.train import train
from rlfree.training import ModelConfig, RLFreeConfig
from tests.helpers import DIFFUSION_FLAGS, assert_same_rows, max_deviation, train_here, unet_weights

REWARD = "rlfree.toy:arithmetic_reward"


def rows(path) -> list[dict]:
    return load_from_disk(str(path)).to_list()


def launch_two_processes(*args, cwd=None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m rlfree ARGS`: two real gloo ranks on a CPU-only machine."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlfree", *map(str, args),
    ]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# --- training: global loss normalization -----------------------------------------------------------------------------


STEPS = 3
TRAINING_FLAGS = {
    "max_steps": STEPS,
    "learning_rate": 0.5,
    "optim": "sgd",
    "lr_scheduler_type": "constant",
    "seed": 0,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
}


@pytest.fixture(scope="module")
def weighted_dir(reference_dir, prompts_file, sample_score_weight, tmp_path_factory):
    """128 weighted toy samples (4 prompts x 32), enough for 3 steps of 32 without a second epoch."""
    root = tmp_path_factory.mktemp("distributed")
    sample_score_weight(root, reference_dir, prompts_file, REWARD, 0.5, num_samples=32, max_new_tokens=3, seed=0)
    return root / "weighted"


def train_in_process(reference_dir, weighted_dir, output_dir, batch_size: int, accumulation: int) -> dict:
    args = RLFreeConfig(
        output_dir=str(output_dir),
        dataset_dir=str(weighted_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        disable_tqdm=True,
        **TRAINING_FLAGS,
    )
    trainer = train(ModelConfig(model_name_or_path=str(reference_dir)), args)
    assert trainer.accelerator.num_processes == 1
    return load_file(output_dir / "model.safetensors")


def train_two_processes(reference_dir, weighted_dir, output_dir, batch_size: int, accumulation: int) -> dict:
    flags = TRAINING_FLAGS | {
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "disable_tqdm": "true",
        "log_level": "info",  # so that the Trainer says the batch size it computed from the world it runs in
    }
    result = launch_two_processes(
        "train", "--model_name_or_path", reference_dir, "--dataset_dir", weighted_dir, "--output_dir", output_dir,
        *(item for key, value in flags.items() for item in (f"--{key}", value)),
    )  # fmt: skip
    # Per-device batch x accumulation x world size = 32 only when two processes really ran.
    assert f"Total train batch size (w. parallel, distributed & accumulation) = {2 * batch_size * accumulation}" in (
        result.stdout + result.stderr
    )
    return load_file(output_dir / "model.safetensors")


@pytest.mark.slow
def test_four_layouts_of_one_batch_of_32_end_with_the_same_weights(reference_dir, weighted_dir, tmp_path):
    runs = {
        "1 x 32": train_in_process(reference_dir, weighted_dir, tmp_path / "a", 32, 1),
        "1 x 16 x GA 2": train_in_process(reference_dir, weighted_dir, tmp_path / "b", 16, 2),
        "2 x 16": train_two_processes(reference_dir, weighted_dir, tmp_path / "c", 16, 1),
        "2 x 8 x GA 2": train_two_processes(reference_dir, weighted_dir, tmp_path / "d", 8, 2),
    }
    reference = load_file(reference_dir / "model.safetensors")
    baseline = runs["1 x 32"]
    moved = max((baseline[name] - reference[name]).abs().max().item() for name in baseline)
    deviations = {
        layout: max((weights[name] - baseline[name]).abs().max().item() for name in baseline)
        for layout, weights in runs.items()
    }
    print(f"largest parameter change {moved:.3g}; largest deviation from 1 x 32: {deviations}")
    assert moved > 1e-2  # the steps really moved the weights
    for layout, deviation in deviations.items():
        assert deviation < 1e-5, f"{layout} deviates by {deviation}"
    assert all(torch.isfinite(weights[name]).all() for weights in runs.values() for name in weights)


@pytest.mark.slow
def test_two_processes_take_the_one_process_step(class_weighted, tmp_path):
    """1 process x 16 against 2 gloo processes x 4 x 2 accumulation steps (`accelerate launch --multi_gpu`)."""
    train_here(class_weighted, tmp_path / "one", 16, 1, max_steps=3, save_strategy="no")
    flags = DIFFUSION_FLAGS | {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                               "save_strategy": "no", "disable_tqdm": "true", "log_level": "info"}  # fmt: skip
    result = launch_two_processes(
        "train", "--model_name_or_path", class_weighted / "base", "--dataset_dir", class_weighted / "weighted",
        "--output_dir", tmp_path / "two", *(item for key, value in flags.items() for item in (f"--{key}", value)),
    )  # fmt: skip
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in result.stdout + result.stderr
    one, two = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    assert max_deviation(one, unet_weights(class_weighted / "base")) > 1e-3
    assert max_deviation(one, two) < 1e-5, max_deviation(one, two)


# --- generation, scoring and whole recipes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_write_the_same_dataset_as_one(reference_dir, prompts_file, tmp_path, shard_config):
    one = generate(shard_config(tmp_path / "one")).to_list()
    result = launch_two_processes(
        "generate", "--model_name_or_path", reference_dir, "--prompts", prompts_file, "--num_samples", 6,
        "--max_new_tokens", 3, "--seed", 5, "--batch_size", 7, "--shard_size", 1, "--output_dir", "two", cwd=tmp_path,
    )  # fmt: skip
    assert "generation shards (rank 1/2)" in result.stderr  # the second rank really ran, and wrote its half
    assert json.loads((tmp_path / "two" / "generation.json").read_text())["num_processes"] == 2
    assert_same_rows(rows(tmp_path / "two"), one)

    launch_two_processes(
        "score",
        "--input_dir",
        "two",
        "--reward",
        REWARD,
        "--shard_size",
        5,
        "--output_dir",
        "two_scored",
        cwd=tmp_path,
    )
    single = score(
        ScoreConfig(input_dir=str(tmp_path / "two"), output_dir=str(tmp_path / "one_scored"), reward=[REWARD])
    )
    assert rows(tmp_path / "two_scored") == single.to_list()


@pytest.mark.slow
def test_a_whole_recipe_runs_data_parallel(tmp_path, toy_recipe):
    recipe = toy_recipe(tmp_path)
    result = launch_two_processes("run", "--config", recipe, cwd=tmp_path)
    assert result.stdout.count("[round 1/1") == 4  # one line per stage, from the main process only
    assert json.loads((tmp_path / "out/generated/generation.json").read_text())["num_processes"] == 2
    assert json.loads((tmp_path / "out/scored/scoring.json").read_text())["num_processes"] == 2
    assert (tmp_path / "out/model/training.json").is_file()
    again = launch_two_processes("run", "--config", recipe, cwd=tmp_path)
    assert again.stdout.count("is complete: skipped") == 4
