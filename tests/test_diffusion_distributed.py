"""The diffusion trainer's step is the one-big-batch step whatever the layout, and a resumed run is the uninterrupted
one: each sample's time and noise come from (seed, row, optimizer step), and the loss is normalized per step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlfree.diffusion import toy
from rlfree.lm.trainer import RLFreeConfig
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.score import ScoreConfig, score
from rlfree.stages.train import ModelConfig, train
from rlfree.stages.weight import WeightConfig, weight

FLAGS = {"learning_rate": 0.05, "optim": "sgd", "lr_scheduler_type": "constant", "seed": 0, "report_to": "none"}


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    """A class-conditional toy pipeline and 64 weighted samples of it (2 classes x 32)."""
    root = tmp_path_factory.mktemp("diffusion_distributed")
    toy.build_pipeline(root / "base", num_class_embeds=2)
    (root / "classes.jsonl").write_text('{"prompt": "0"}\n{"prompt": "1"}\n')
    generate(GenerateConfig(str(root / "base"), str(root / "classes.jsonl"), str(root / "gen"), num_samples=32, num_inference_steps=2))  # fmt: skip
    score(ScoreConfig(reward=["rlfree.diffusion.toy:plus_component_reward"], input_dir=str(root / "gen"), output_dir=str(root / "scored")))  # fmt: skip
    weight(WeightConfig(str(root / "scored"), str(root / "weighted"), "rlhf", beta=0.5))
    return root


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def train_here(root, output, batch_size: int, accumulation: int, **flags) -> None:
    train(
        ModelConfig(model_name_or_path=str(root / "base")),
        RLFreeConfig(output_dir=str(output), dataset_dir=str(root / "weighted"), per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, disable_tqdm=True, **FLAGS | flags),
    )  # fmt: skip


def max_deviation(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(weighted, tmp_path):
    train_here(weighted, tmp_path / "whole", 8, 1, max_steps=4, save_strategy="no")
    train_here(weighted, tmp_path / "cut", 8, 1, max_steps=4, save_strategy="steps", save_steps=2)
    for name in ("model_index.json", "training.json", "unet/diffusion_pytorch_model.safetensors"):
        (tmp_path / "cut" / name).unlink()  # only what the resumed run writes is compared
    (tmp_path / "cut" / "checkpoint-4").rename(tmp_path / "later-checkpoint")  # as if killed after step 2
    train_here(weighted, tmp_path / "cut", 8, 1, max_steps=4, save_strategy="no", resume_from_checkpoint="last")
    whole, resumed = unet_weights(tmp_path / "whole"), unet_weights(tmp_path / "cut")
    assert max_deviation(whole, unet_weights(weighted / "base")) > 1e-3  # the steps moved the UNet
    assert max_deviation(whole, resumed) < 1e-6


@pytest.mark.slow
def test_two_processes_take_the_one_process_step(weighted, tmp_path):
    """1 process x 16 against 2 gloo processes x 4 x 2 accumulation steps (`accelerate launch --multi_gpu`)."""
    train_here(weighted, tmp_path / "one", 16, 1, max_steps=3, save_strategy="no")
    flags = FLAGS | {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                     "save_strategy": "no", "disable_tqdm": "true", "log_level": "info"}  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlfree", "train",
        "--model_name_or_path", str(weighted / "base"), "--dataset_dir", str(weighted / "weighted"),
        "--output_dir", str(tmp_path / "two"), *(item for key, value in flags.items() for item in (f"--{key}", str(value))),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in result.stdout + result.stderr
    one, two = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    assert max_deviation(one, unet_weights(weighted / "base")) > 1e-3
    assert max_deviation(one, two) < 1e-5, max_deviation(one, two)
