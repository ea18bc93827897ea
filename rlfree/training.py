"""Stage 4: weighted maximum likelihood, as a small `transformers.Trainer` subclass.

    loss(theta) = - sum_q sum_i w_i * sum_t log pi_theta(o_i,t | q, o_i,<t)

The log-likelihood is the *sum* over a completion's tokens (a per-token mean would reweight samples by 1/length
and change the target). Every micro-batch is divided by the same constant, the number of sequences in one
optimizer step across all ranks, so gradient accumulation and data parallelism give exactly the one-big-batch
update. Weights are rescaled once by (rows / prompts) so that uniform weights 1/N reproduce SFT's per-sequence
mean loss and the usual learning rates apply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .data import changed_settings, check_output_dir, describe_changes, load_stage, read_sidecars
from .errors import DTYPES, StageInputError, check_choice, check_finite
from .modeling import (
    DEFAULT_LOGITS_CHUNK_SIZE,
    default_device,
    flatten_prompt_completion,
    load_tokenizer,
    model_completion_logprobs,
    pad_prompt_completion,
    resolve_dtype,
)
from .sources import load_model_config

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = ("prompt_ids", "completion_ids", "weight")
# Samplers of TrainingArguments.train_sampling_strategy that read each row's length from `length_column_name`.
LENGTH_SAMPLING_STRATEGIES = ("group_by_length", "batch_rebalance")
# Written into --output_dir when a run starts and removed when training.json marks it finished.
IN_PROGRESS = ".rlfree-training-in-progress.json"


@dataclass
class ModelConfig:
    """Which model to train, and how (full fine-tuning or LoRA)."""

    model_name_or_path: str = field(metadata={"help": "Model to train (usually pi_ref): local folder or Hub id."})
    dtype: str = field(default="auto", metadata={"help": "Load dtype: auto, bfloat16, float16 or float32."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules that get LoRA adapters."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Save the LoRA-merged full model instead of the adapter alone."}
    )

    def __post_init__(self):
        check_finite(self)
        check_choice("--dtype", self.dtype, DTYPES)


@dataclass
class RLFreeConfig(TrainingArguments):
    """`TrainingArguments` plus the data to train on; defaults suited to weighted MLE."""

    dataset_dir: str | None = field(default=None, metadata={"help": "Output folder of `rlfree weight`."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Cut prompt+completion to this many tokens (completions are cut, never prompts)."},
    )
    logits_chunk_size: int | None = field(
        default=DEFAULT_LOGITS_CHUNK_SIZE,
        metadata={
            "help": "Completion positions per chunk of the lm_head + log-softmax, each chunk recomputed in backward, "
            "so fp32 logits over the vocabulary never exist for the whole batch; 0 or None = full logits."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Pack each micro-batch into one row without padding, position ids restarting at 0 for each "
            "sequence (as DataCollatorWithFlattening): no compute on padding. Needs attention that reads packed "
            "position ids (sdpa, eager, flash_attention_2); checked on the first step."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to resume from, or `last` for the newest one in --output_dir."},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the weight columns."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy during training."})

    def __post_init__(self):
        check_finite(self)
        if self.dataset_dir is None:
            raise StageInputError("--dataset_dir is required: the output folder of `rlfree weight`")
        if torch.accelerator.current_accelerator() is None:
            # Without this, `accelerate launch` on a CPU-only machine starts gloo ranks that each train on the whole
            # dataset instead of sharing it.
            self.use_cpu = True
        super().__post_init__()


class WeightedCollator:
    """Prompt+completion ids, right-padded or packed into one row, and each sample's (rescaled) weight."""

    def __init__(
        self, pad_token_id: int, weight_scale: float, max_length: int | None = None, padding_free: bool = False
    ):
        self.pad_token_id = pad_token_id
        self.weight_scale = weight_scale
        self.max_length = max_length
        self.padding_free = padding_free

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        prompt_ids = [f["prompt_ids"] for f in features]
        completion_ids = [f["completion_ids"] for f in features]
        if self.padding_free:
            batch = flatten_prompt_completion(prompt_ids, completion_ids, self.max_length)
        else:
            batch = pad_prompt_completion(prompt_ids, completion_ids, self.pad_token_id, self.max_length)
        batch["weight"] = torch.tensor([f["weight"] for f in features], dtype=torch.float32) * self.weight_scale
        return batch


class RLFreeTrainer(Trainer):
    """Trainer whose loss is the weighted sequence negative log-likelihood, normalized per optimizer step."""

    # compute_loss already divides by the whole step's sequence count; Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: RLFreeConfig,
        train_dataset: Dataset,
        processing_class: PreTrainedTokenizerBase,
        **kwargs,
    ):
        missing = [column for column in TRAIN_COLUMNS if column not in train_dataset.column_names]
        if missing:
            raise StageInputError(f"training data lacks column(s) {missing}; train on the output of `rlfree weight`")
        total_weight = float(sum(train_dataset["weight"]))
        if not total_weight > 0:
            raise StageInputError("the weights in the training data sum to zero")
        collator = WeightedCollator(
            processing_class.pad_token_id, len(train_dataset) / total_weight, args.max_length, args.padding_free
        )
        columns = list(TRAIN_COLUMNS)
        if args.train_sampling_strategy in LENGTH_SAMPLING_STRATEGIES:
            train_dataset = with_lengths(train_dataset, args.length_column_name, args.max_length)
            columns.append(args.length_column_name)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset.select_columns(columns),
            data_collator=collator,
            processing_class=processing_class,
            **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop("weight")
        completion_mask = inputs.pop("completion_mask")
        (sequence_logprob,) = model_completion_logprobs(
            model,
            inputs["input_ids"],
            inputs.get("attention_mask"),  # absent from padding-free batches
            completion_mask,
            chunk_size=self.args.logits_chunk_size,
            position_ids=inputs.get("position_ids"),
        )
        # A constant divisor for every micro-batch of every rank; DDP's gradient mean supplies the 1/world_size.
        sequences_per_rank_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        loss = -(weight * sequence_logprob).sum() / sequences_per_rank_step
        return (loss, {"sequence_logprob": sequence_logprob}) if return_outputs else loss

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Write README.md describing how the model was made (overrides Trainer's generic card)."""
        if not self.is_world_process_zero():
            return
        card = model_card(
            self.model.config._name_or_path,
            read_sidecars(self.args.dataset_dir),
            self.args.dataset_dir,
            self.args,
        )
        Path(self.args.output_dir, "README.md").write_text(card)


def with_lengths(dataset: Dataset, column: str, max_length: int | None) -> Dataset:
    """`dataset` with each row's prompt+completion length (after the --max_length cut) in `column`, for the samplers
    that group or balance by length; a column of that name already there is taken as precomputed lengths."""
    if column in dataset.column_names:
        return dataset

    def lengths(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, list[int]]:
        totals = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        if max_length is not None:  # the collator cuts completions, never prompts
            totals = [min(total, max(len(p), max_length)) for total, p in zip(totals, prompts, strict=True)]
        return {column: totals}

    return dataset.map(
        lengths, input_columns=["prompt_ids", "completion_ids"], batched=True, desc=f"lengths into {column!r}"
    )


def base_model_reference(name_or_path: str) -> tuple[str | None, str]:
    """(Hub id or None, what the card shows) for the model as it was given to `from_pretrained`.

    A local folder is not a Hub id: the card shows its absolute path and leaves `base_model` out of the front matter
    (the Hub would link it to whatever model has that name), unless the folder is a snapshot in the Hugging Face
    cache, `.../models--ORG--NAME/snapshots/<hash>`, which is the Hub model ORG/NAME.
    """
    if not name_or_path:
        return None, "unknown"
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return name_or_path, name_or_path
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        hub_id = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        return hub_id, hub_id
    return None, str(path)


def weighting_rows(weighting: dict) -> list[tuple[str, object]]:
    """The coefficients of the weighting used: beta for rlhf, the exponent or beta_if for rlif, both for rlhf+rlif."""
    kind = weighting.get("weighting", "")
    rows = [("beta", weighting.get("beta"))] if "rlhf" in kind else []
    if "rlif" in kind:
        if weighting.get("beta_if") is not None:
            rows.append(("rlif beta_if", weighting["beta_if"]))
        else:
            rows.append(("rlif exponent", weighting.get("rlif_exponent")))
    return rows


def three_significant_digits(value: float) -> str:
    """ESS is an estimate from N samples: more digits would be noise."""
    return f"{float(f'{value:.3g}'):g}"


def model_card(name_or_path: str, sidecars: dict, dataset_dir: str, args: TrainingArguments) -> str:
    """A Hub model card that records the recipe: base model (`name_or_path` as loaded), weighting, beta, N, reward and
    data."""
    generation = sidecars.get("generation", {})
    scoring = sidecars.get("scoring", {})
    weighting = sidecars.get("weighting", {})
    rewards = scoring.get("reward", []) + scoring.get("reward_model", [])
    hub_id, base_model = base_model_reference(name_or_path)
    ess = [weighting.get("ess_min"), weighting.get("ess_median")]
    rows = [
        ("base model", base_model),
        ("weighting", weighting.get("weighting", "?")),
        *weighting_rows(weighting),
        ("samples per prompt (N)", generation.get("num_samples")),
        ("prompts", weighting.get("num_prompts", generation.get("num_prompts"))),
        ("prompt set", generation.get("prompts")),
        (
            "sampler",
            f"temperature={generation.get('temperature')} top_k={generation.get('top_k')} "
            f"top_p={generation.get('top_p')} max_new_tokens={generation.get('max_new_tokens')}",
        ),
        ("reward", ", ".join(rewards) or "none (rlif)"),
        ("ESS min / median", " / ".join("?" if value is None else three_significant_digits(value) for value in ess)),
        ("training data", dataset_dir),
        ("learning rate / epochs", f"{args.learning_rate} / {args.num_train_epochs}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    front_matter = {"base_model": hub_id} if hub_id else {}
    front_matter |= {"library_name": "transformers", "tags": ["rlfree", "weighted-mle"]}
    return (
        "---\n" + "\n".join(f"{key}: {json.dumps(value)}" for key, value in front_matter.items()) + "\n---\n\n"
        f"# {Path(args.output_dir).name}\n\n"
        f"Fine-tuned from `{base_model}` with rlfree: weighted maximum likelihood "
        "towards the KL-regularized optimum pi_ref(o|q) * exp(r(q,o) / beta), without reinforcement learning.\n\n"
        "| setting | value |\n| --- | --- |\n" + table + "\n\n"
        "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{Path(args.output_dir).name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{Path(args.output_dir).name}")\n```\n'
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
    load_model_config("--model_name_or_path", model_config.model_name_or_path, model_config.trust_remote_code)
    dataset = load_stage(
        args.dataset_dir, TRAIN_COLUMNS, hint="Train on the output of `rlfree weight`.", flag="--dataset_dir"
    )
    tokenizer = load_tokenizer(model_config.model_name_or_path, model_config.trust_remote_code)
    trainer = RLFreeTrainer(build_model(model_config), args, dataset, tokenizer)
    sharded = trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if model_config.use_peft and model_config.merge_lora and sharded:
        raise StageInputError(
            "--merge_lora needs the full weights in one place, but ZeRO-3/FSDP shards them: save the adapter (drop "
            "--merge_lora) and merge it offline with peft, or train LoRA with ZeRO-2 or DDP"
        )
    finished_marker = output / "training.json"
    record = json.dumps(settings, indent=2, default=str) + "\n"
    if trainer.is_world_process_zero():
        finished_marker.unlink(missing_ok=True)  # an earlier run's marker must not vouch for this run's files
        output.mkdir(parents=True, exist_ok=True)
        (output / IN_PROGRESS).write_text(record)
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(args))
    if model_config.use_peft and model_config.merge_lora:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
    else:
        trainer.save_model(args.output_dir)
    trainer.create_model_card()
    if trainer.is_world_process_zero():
        # Written last: a model folder holding training.json is complete (`rlfree run` skips it on a re-run).
        finished_marker.write_text(record)
        (output / IN_PROGRESS).unlink()
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
