"""The accelerate configs and the SLURM script in launch/.

No GPU here: nothing is launched. Each YAML goes through accelerate's own loader and through the steps
`accelerate launch` takes before it starts processes (validation, then building the launcher's environment);
the DeepSpeed ones are then turned into the DeepSpeed config the Trainer would see, with its "auto" values filled
from TrainingArguments. The SLURM script runs against stand-ins for srun, scontrol and accelerate.
"""

from __future__ import annotations

import copy
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

from tests.helpers import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"

# file -> (distributed_type, what `accelerate launch` must put in the launched processes' environment)
EXPECTED = {
    "single_gpu.yaml": ("NO", {"CUDA_VISIBLE_DEVICES": "0"}),
    "ddp.yaml": ("MULTI_GPU", {}),
    "multi_node.yaml": ("MULTI_GPU", {}),
    "zero2.yaml": (
        "DEEPSPEED",
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    ),
    "zero3.yaml": (
        "DEEPSPEED",
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
            "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
        },
    ),
    "fsdp2.yaml": (
        "FSDP",
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        },
    ),
}


def test_every_launch_config_is_covered():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)
    assert not list(LAUNCH.glob("*.json")), "DeepSpeed settings are inline in the YAML files; no JSON expected"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    config = load_config_from_file(str(LAUNCH / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name][0]
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False
    if name == "single_gpu.yaml":
        assert config.num_processes == 1
    if name == "ddp.yaml":
        assert (config.num_machines, config.num_processes) == (1, 8)
    if name == "multi_node.yaml":
        assert (config.num_machines, config.machine_rank, config.num_processes) == (2, 0, 16)
        assert config.main_process_ip and config.main_process_port == 29500
    if name.startswith("zero"):
        ds = config.deepspeed_config
        assert ds["zero_stage"] == int(name[4])
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        # left to the Trainer's --gradient_accumulation_steps / --max_grad_norm ("auto")
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
        assert "deepspeed_config_file" not in ds
        if name == "zero3.yaml":
            assert ds["zero3_save_16bit_model"] is True and ds["zero3_init_flag"] is True
    if name == "fsdp2.yaml":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # final save loads with from_pretrained


def launch_environment(name: str, *extra: str) -> tuple:
    """What `accelerate launch --config_file launch/NAME ... -m rlfree train --bf16` would set up, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    argv = ["--config_file", str(LAUNCH / name), *extra, "-m", "rlfree", "train", "--bf16"]
    args = launch_command_parser().parse_args(argv)
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)[:3]
    if args.use_deepspeed:  # as accelerate's launch_command does before calling the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    return args, env


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_launch_accepts_config(name):
    extra = ["--num_processes", "2"] if name in ("ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp2.yaml") else []
    if name == "multi_node.yaml":
        extra = ["--machine_rank", "1", "--main_process_ip", "node0"]
    args, env = launch_environment(name, *extra)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in EXPECTED[name][1].items():
        if key == "CUDA_VISIBLE_DEVICES" and key not in env and torch.accelerator.current_accelerator() is None:
            # accelerate >= 1.16 sets the visible-devices variable of the accelerator it detects, and a CPU-only
            # machine has none: the config's gpu_ids is what a GPU machine turns into CUDA_VISIBLE_DEVICES.
            assert args.gpu_ids == value
            continue
        assert env[key] == value, key
    if name == "multi_node.yaml":  # 16 processes over 2 machines: 8 per node; the command line overrides the file
        assert (args.nproc_per_node, args.num_machines, args.machine_rank) == ("8", 2, 1)
        assert args.main_process_ip == "node0" and args.main_process_port == 29500
    elif extra:
        assert args.num_processes == 2  # --num_processes overrides the placeholder


@pytest.mark.parametrize("name", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_config_takes_trainer_flags(name, monkeypatch, tmp_path):
    """The DeepSpeed config built from the YAML leaves batch size, accumulation and clipping to the Trainer flags."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    _, env = launch_environment(name, "--num_processes", "2")
    for key, value in env.items():
        if key.startswith("ACCELERATE_") and key != "ACCELERATE_USE_DEEPSPEED":
            monkeypatch.setenv(key, value)
    try:
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
        ds_config = plugin.deepspeed_config
        assert ds_config["gradient_accumulation_steps"] == "auto" and ds_config["gradient_clipping"] == "auto"
        assert ds_config["zero_optimization"]["stage"] == int(name[4])
        if name == "zero3.yaml":
            assert ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

        def filled(bf16: bool) -> HfTrainerDeepSpeedConfig:
            args = TrainingArguments(
                output_dir=str(tmp_path),
                bf16=bf16,
                per_device_train_batch_size=2,
                gradient_accumulation_steps=4,
                max_grad_norm=0.5,
                use_cpu=True,
                report_to=[],
            )
            hf_config = HfTrainerDeepSpeedConfig(copy.deepcopy(ds_config))
            hf_config.trainer_config_process(args)
            return hf_config

        hf_config = filled(bf16=True)
        assert hf_config.mismatches == []
        assert hf_config.config["gradient_accumulation_steps"] == 4
        assert hf_config.config["gradient_clipping"] == 0.5
        assert hf_config.config["train_micro_batch_size_per_gpu"] == 2
        # mixed_precision: bf16 in the YAML means `rlfree train` must be given --bf16 (the Trainer refuses otherwise)
        assert filled(bf16=False).mismatches
    finally:
        unset_hf_deepspeed_config()


SLURM = LAUNCH / "slurm.sh"


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)
    text = SLURM.read_text()
    assert "accelerate launch" in text and "--machine_rank" in text
    assert "#SBATCH --nodes=2" in text and "scontrol show hostnames" in text


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_gives_each_node_its_rank(tmp_path):
    """Run slurm.sh with stand-ins: srun runs its command as tasks 0 and 1; accelerate records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    _stub(bin_dir / "scontrol", 'printf "gpu-node-a\\ngpu-node-b\\n"\n')
    _stub(
        bin_dir / "srun",
        'while [[ "$1" == --* ]]; do shift; done\nfor rank in 0 1; do SLURM_PROCID=$rank "$@" || exit 1; done\n',
    )
    _stub(bin_dir / "accelerate", f'echo "$*" >> "{log}"\n')
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(LAUNCH.parent),
        "SLURM_PROCID": "99",  # the submitting shell's value must not leak into the tasks
    }
    subprocess.run(["bash", str(SLURM), "--run_name", "two words"], check=True, env=env, timeout=30)
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert call.startswith("launch --config_file launch/multi_node.yaml")
        assert f"--machine_rank {rank} " in call
        assert "--num_machines 2 --num_processes 16" in call
        assert "--main_process_ip gpu-node-a --main_process_port 29500" in call
        assert "-m rlfree train --model_name_or_path" in call
        assert call.endswith("--run_name two words")
