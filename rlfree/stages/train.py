"""Stage 4: train on the output of `rlfree weight` (weighted maximum likelihood) and write an SFT-style checkpoint."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM
from transformers.trainer_utils import get_last_checkpoint

from ..data import changed_settings, check_output_dir, describe_changes, load_stage
from ..diffusion import is_pipeline
from ..diffusion.lora import ADAPTER_DIR, add_lora
from ..diffusion.pipeline import load_pipeline
from ..diffusion.trainer import TRAIN_COLUMNS as DIFFUSION_TRAIN_COLUMNS
from ..diffusion.trainer import DiffusionTrainer
from ..errors import StageInputError
from ..lm.modeling import default_device, load_tokenizer, resolve_dtype
from ..lm.trainer import TRAIN_COLUMNS, RLFreeConfig, RLFreeTrainer
from ..options import LoadOptions
from ..sources import load_model_config

logger = logging.getLogger(__name__)

# Written into --output_dir when a run starts and removed when training.json marks it finished.
IN_PROGRESS = ".rlfree-training-in-progress.json"


@dataclass
class ModelConfig(LoadOptions):
    """Which model to train (usually pi_ref), and how (full fine-tuning or LoRA)."""

    model_name_or_path: str = field(metadata={"help": "Model to train (usually pi_ref): local folder or Hub id."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules that get LoRA adapters. On a diffusion pipeline's UNet, all-linear also takes the 3×3 "
            "convolutions of its ResNet blocks."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "Save the LoRA-merged full model instead of the adapter alone. A diffusion pipeline is always saved "
            "merged, with the adapter beside it in unet_lora/."
        },
    )


def build_model(model_config: ModelConfig):
    """Load the model to train and, with --use_peft, wrap it in a LoRA adapter."""
    model = AutoModelForCausalLM.from_pretrained(
        model_config.model_name_or_path,
        dtype=resolve_dtype(model_config.dtype, default_device()),
        trust_remote_code=model_config.trust_remote_code,
    )
    if model_config.use_peft:
        from peft import LoraConfig, get_peft_model

        target = model_config.lora_target_modules
        model = get_peft_model(
            model,
            LoraConfig(
                r=model_config.lora_r,
                lora_alpha=model_config.lora_alpha,
                lora_dropout=model_config.lora_dropout,
                target_modules=target[0] if target == ["all-linear"] else target,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def train(model_config: ModelConfig, args: RLFreeConfig) -> RLFreeTrainer:
    """Train on the output of `rlfree weight` and write an SFT-style checkpoint to the root of `output_dir`."""
    output = Path(args.output_dir).expanduser()
    settings = training_settings(model_config, args)
    # A folder an interrupted run left (its in-progress marker, or its checkpoints) is this stage's own: the run
    # starts again there, or resumes from a checkpoint with --resume_from_checkpoint.
    interrupted = (output / IN_PROGRESS).is_file() or any(output.glob("checkpoint-*"))
    inputs = {"--dataset_dir": args.dataset_dir, "--model_name_or_path": model_config.model_name_or_path}
    check_output_dir(args.output_dir, "training", settings, inputs, allow_unfinished=interrupted)
    if args.resume_from_checkpoint is None and any(output.glob("checkpoint-*")):
        # Starting over would write new checkpoints beside the old ones, and a later `last` could pick an old one.
        raise StageInputError(
            f"--output_dir {output} holds checkpoints of an earlier run: resume from them with --resume_from_checkpoint "
            "last, or delete them to start over"
        )
    if args.resume_from_checkpoint is not None and (output / IN_PROGRESS).is_file():
        different = changed_settings(json.loads((output / IN_PROGRESS).read_text()), settings)
        if different:
            raise StageInputError(
                f"--resume_from_checkpoint: the checkpoints in {output} come from a run with other settings "
                f"({describe_changes(different)}); resume with those settings, or train into a new --output_dir"
            )
    diffusion = is_pipeline(model_config.model_name_or_path)
    if not diffusion:
        load_model_config("--model_name_or_path", model_config.model_name_or_path, model_config.trust_remote_code)
    dataset = load_stage(
        args.dataset_dir,
        DIFFUSION_TRAIN_COLUMNS if diffusion else TRAIN_COLUMNS,
        hint="Train on the output of `rlfree weight`.",
        flag="--dataset_dir",
    )
    if diffusion:
        pipeline = load_pipeline(model_config.model_name_or_path, model_config.dtype, default_device())
        unet, lora = pipeline.unet, ""
        if model_config.use_peft:
            options = [model_config.lora_r, model_config.lora_alpha, model_config.lora_dropout]
            unet = add_lora(pipeline.unet, *options, model_config.lora_target_modules)
            lora = f"LoRA r={options[0]} alpha={options[1]} (adapter in {ADAPTER_DIR}/, merged into unet/)"
        trainer = DiffusionTrainer(pipeline, args, dataset, model_config.model_name_or_path, unet, lora)
    else:
        tokenizer = load_tokenizer(model_config.model_name_or_path, model_config.trust_remote_code)
        trainer = RLFreeTrainer(build_model(model_config), args, dataset, tokenizer)
    sharded = trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if model_config.use_peft and (model_config.merge_lora or diffusion) and sharded:
        raise StageInputError(
            "--merge_lora (and LoRA on a diffusion pipeline, always saved merged) needs the full weights in one place, "
            "but ZeRO-3/FSDP shards them: save the adapter (drop --merge_lora) and merge it offline with peft, or train "
            "LoRA with ZeRO-2 or DDP"
        )
    finished_marker = output / "training.json"
    record = json.dumps(settings, indent=2, default=str) + "\n"
    if trainer.is_world_process_zero():
        finished_marker.unlink(missing_ok=True)  # an earlier run's marker must not vouch for this run's files
        output.mkdir(parents=True, exist_ok=True)
        (output / IN_PROGRESS).write_text(record)
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(args))
    if diffusion:
        trainer.save_pipeline(args.output_dir)
    elif model_config.use_peft and model_config.merge_lora:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
    else:
        trainer.save_model(args.output_dir)
    if not diffusion:  # a pipeline's card is written with it
        trainer.create_model_card()
    if trainer.is_world_process_zero():
        # Written last: a model folder holding training.json is complete (`rlfree run` skips it on a re-run).
        finished_marker.write_text(record)
        (output / IN_PROGRESS).unlink()
    # No rank returns before the main one has written the model: callers (and `rlfree run`'s next round) read it.
    trainer.accelerator.wait_for_everyone()
    return trainer


def checkpoint_to_resume(args: RLFreeConfig) -> str | None:
    """`--resume_from_checkpoint last` means the newest checkpoint in `--output_dir`, if there is one."""
    if args.resume_from_checkpoint != "last":
        return args.resume_from_checkpoint
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if last is None:
        logger.warning("--resume_from_checkpoint last: no checkpoint in %s yet, starting from step 0", args.output_dir)
    return last


def training_settings(model_config: ModelConfig, args: RLFreeConfig) -> dict:
    """What a finished training run records about itself: the model settings and the flags that shape the result."""
    names = (
        "dataset_dir",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "train_sampling_strategy",
        "seed",
    )
    return asdict(model_config) | {name: getattr(args, name) for name in names}


def train_command(model_config: ModelConfig, args: RLFreeConfig) -> str:
    train(model_config, args)
    return f"wrote the trained model to {args.output_dir}"
