"""Stage 4: train on the output of `rlfree weight` (weighted maximum likelihood) and write an SFT-style checkpoint."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import changed_settings, check_output_dir, describe_changes, load_stage, with_working_dir
from ..errors import StageInputError
from ..family import family_of_model
from ..training import ModelConfig, RLFreeConfig

# Written into --output_dir when a run starts and removed when training.json marks it finished.
IN_PROGRESS = ".rlfree-training-in-progress.json"
# Written into each checkpoint: the settings of the run that saved it, which a run resuming from it must have.
CHECKPOINT_SETTINGS = "rlfree_training.json"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint


def check_output(model_config: ModelConfig, args: RLFreeConfig) -> str | None:
    """Refuse an --output_dir that training would spoil, before anything is made; returns the checkpoint to resume
    from (`checkpoint_to_resume`), checked against the settings of the run that wrote it."""
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
    checkpoint = checkpoint_to_resume(args)
    if checkpoint is not None:
        check_resumed_settings(Path(checkpoint), settings)
    return checkpoint


def train(model_config: ModelConfig, args: RLFreeConfig) -> Trainer:
    """Train on the output of `rlfree weight` and write an SFT-style checkpoint to the root of `output_dir`."""
    output = Path(args.output_dir).expanduser()
    settings = training_settings(model_config, args)
    checkpoint = check_output(model_config, args)
    family = family_of_model(model_config.model_name_or_path)
    family.check_train(model_config)
    dataset = load_stage(
        args.dataset_dir, family.train_columns, hint="Train on the output of `rlfree weight`.", flag="--dataset_dir"
    )
    trainer = family.build_trainer(model_config, args, dataset)
    sharded = trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if family.needs_full_weights(model_config) and sharded:
        raise StageInputError(
            "--merge_lora (and LoRA on a diffusion pipeline, always saved merged) needs the full weights in one place, "
            "but ZeRO-3/FSDP shards them: save the adapter (drop --merge_lora) and merge it offline with peft, or train "
            "LoRA with ZeRO-2 or DDP"
        )
    finished_marker = output / "training.json"
    record = json.dumps(with_working_dir(settings | {"family": family.name}), indent=2, default=str) + "\n"
    trainer.add_callback(RecordSettings(record))
    if trainer.is_world_process_zero():
        finished_marker.unlink(missing_ok=True)  # an earlier run's marker must not vouch for this run's files
        output.mkdir(parents=True, exist_ok=True)
        (output / IN_PROGRESS).write_text(record)
    trainer.train(resume_from_checkpoint=checkpoint)
    family.save_trained(trainer, model_config)
    if trainer.is_world_process_zero():
        # Written last: a model folder holding training.json is complete (`rlfree run` skips it on a re-run).
        finished_marker.write_text(record)
        (output / IN_PROGRESS).unlink()
    # No rank returns before the main one has written the model: callers (and `rlfree run`'s next round) read it.
    trainer.accelerator.wait_for_everyone()
    return trainer


class RecordSettings(TrainerCallback):
    """Writes the run's settings into every checkpoint it saves, so that a run resuming from that checkpoint, from
    any folder, is checked against the settings that really produced it."""

    def __init__(self, record: str):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            (folder / CHECKPOINT_SETTINGS).write_text(self.record)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a run killed while writing it), or None when it can: the
    Trainer writes trainer_state.json last, so a checkpoint whose state reads back whole is complete."""
    state = checkpoint / TRAINER_STATE
    if not state.is_file():
        return f"it has no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"its {TRAINER_STATE} is empty or cut off"
    return None


def checkpoint_to_resume(args: RLFreeConfig) -> str | None:
    """The checkpoint to resume from: `--resume_from_checkpoint PATH`, checked to be complete, or for `last` the
    newest complete checkpoint in `--output_dir` (newer ones a kill left half-written are named and skipped)."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "last":
        path = Path(args.resume_from_checkpoint).expanduser()
        if not path.is_dir():
            raise StageInputError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
        reason = incomplete_reason(path)
        if reason is not None:
            raise StageInputError(
                f"--resume_from_checkpoint {path}: {reason}, so it was not written to the end (was the run killed "
                "while saving it?); resume from an earlier checkpoint, or use `last` to take the newest complete one"
            )
        return str(path)
    output = Path(args.output_dir).expanduser()
    steps = {}
    for folder in output.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if output.is_dir() else []:
        step = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if folder.is_dir() and step.isdigit():
            steps[int(step)] = folder
    for step in sorted(steps, reverse=True):
        reason = incomplete_reason(steps[step])
        if reason is None:
            return str(steps[step])
        warn(f"--resume_from_checkpoint last: skipping {steps[step]}: {reason} (a run killed while saving it)")
    warn(f"--resume_from_checkpoint last: no complete checkpoint in {output} yet, starting from step 0")
    return None


def check_resumed_settings(checkpoint: Path, settings: dict) -> None:
    """Refuse to resume a checkpoint with settings other than those of the run that wrote it: the Trainer would go on
    with the checkpoint's optimizer and schedule while the model card recorded the new ones. The settings are the
    checkpoint's own record, or (checkpoints of older versions) those of the run that left its folder."""
    candidates = [
        checkpoint / CHECKPOINT_SETTINGS,
        checkpoint.parent / IN_PROGRESS,
        checkpoint.parent / "training.json",
    ]
    record = next((path for path in candidates if path.is_file()), None)
    if record is None:
        warn(
            f"--resume_from_checkpoint {checkpoint}: no record of the run that wrote it; its settings are not checked"
        )
        return
    different = changed_settings(json.loads(record.read_text()), settings)
    if different:
        raise StageInputError(
            f"--resume_from_checkpoint: {checkpoint} comes from a run with other settings "
            f"({describe_changes(different)}); resuming would go on with its own optimizer and schedule. Resume with "
            "those settings, or start a new run from its weights (--model_name_or_path the checkpoint) into a new "
            "--output_dir"
        )


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
