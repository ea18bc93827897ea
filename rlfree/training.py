"""What every family's training shares: the training config, the model to train, the weights' scale, the
per-optimizer-step normalization of the loss, and the model card.

    loss = sum_i w_i * loss_i / (rows per optimizer step on one rank)

Every micro-batch is divided by the same constant, so gradient accumulation and data parallelism (whose gradient mean
supplies 1/world_size) give exactly the one-big-batch update. Weights are rescaled once by rows / sum of weights, so
uniform weights reproduce the unweighted per-row mean and the usual learning rates apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments

from .errors import StageInputError, check_finite, check_ranges
from .options import LoadOptions

# Completion positions per chunk of an LM's lm_head + log-softmax (`rlfree.lm.logprobs`).
DEFAULT_LOGITS_CHUNK_SIZE = 1024


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
        # Checked here, before any folder is made: the optimizer and the data loader would only fail at the first step.
        check_ranges(
            self,
            {
                "learning_rate": (self.learning_rate >= 0, ">= 0"),
                "per_device_train_batch_size": (self.per_device_train_batch_size >= 1, ">= 1"),
                "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, ">= 1"),
                "num_train_epochs": (self.num_train_epochs > 0 or self.max_steps > 0, "> 0 (or set --max_steps)"),
                "weight_decay": (self.weight_decay >= 0, ">= 0"),
                "max_length": (self.max_length is None or self.max_length >= 1, ">= 1"),
                "logits_chunk_size": (self.logits_chunk_size is None or self.logits_chunk_size >= 0, ">= 0 (0 = off)"),
            },
        )
        if torch.accelerator.current_accelerator() is None:
            # Without this, `accelerate launch` on a CPU-only machine starts gloo ranks that each train on the whole
            # dataset instead of sharing it.
            self.use_cpu = True
        try:
            super().__post_init__()
        except ValueError as error:  # TrainingArguments' own checks name the flag and the fix; one line, no traceback
            raise StageInputError(str(error).strip()) from None


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


def weight_scale(train_dataset: Dataset, columns: tuple[str, ...], hint: str) -> float:
    """rows / sum of weights, after checking the columns a trainer reads and that the weights do not sum to zero."""
    missing = [column for column in columns if column not in train_dataset.column_names]
    if missing:
        raise StageInputError(f"training data lacks column(s) {missing}; {hint}")
    total_weight = float(sum(train_dataset["weight"]))
    if not total_weight > 0:
        raise StageInputError("the weights in the training data sum to zero")
    return len(train_dataset) / total_weight


def weighted_step_loss(weight: torch.Tensor, per_row_loss: torch.Tensor, args: TrainingArguments) -> torch.Tensor:
    """sum_i w_i * loss_i over the micro-batch, divided by the rows of one optimizer step on one rank."""
    rows_per_rank_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return (weight * per_row_loss).sum() / rows_per_rank_step


def base_model_reference(name_or_path: str) -> tuple[str | None, str]:
    """(Hub id or None, what the card shows) for the model as it was given to `from_pretrained`.

    A local folder (or GGUF file) is not a Hub id: the card shows its absolute path and leaves `base_model` out of the
    front matter (the Hub would link it to whatever model has that name), unless the folder is a snapshot in the
    Hugging Face cache, `.../models--ORG--NAME/snapshots/<hash>`, which is the Hub model ORG/NAME.
    """
    if not name_or_path:
        return None, "unknown"
    path = Path(name_or_path).expanduser()
    if not path.exists():
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


@dataclass(frozen=True)
class CardFamily:
    """What a family puts in a model card: its library, how its samples were drawn, and how to load the result."""

    library_name: str
    sampler: str  # the sampling settings, e.g. "temperature=1.0 top_k=0 top_p=1.0 max_new_tokens=64"
    usage: str  # Python that loads the trained model from a folder named `name`, with `{name}` left to fill


def model_card(
    name_or_path: str,
    sidecars: dict,
    dataset_dir: str,
    args: TrainingArguments,
    family: CardFamily,
    fine_tuning: str | None = None,
) -> str:
    """A Hub model card that records the recipe: base model (`name_or_path` as loaded), weighting, beta, N, reward,
    data and, when given, how the weights were tuned (`fine_tuning`: full, or the LoRA settings)."""
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
        ("sampler", family.sampler),
        ("reward", ", ".join(rewards) or "none (rlif)"),
        ("ESS min / median", " / ".join("?" if value is None else three_significant_digits(value) for value in ess)),
        ("training data", dataset_dir),
        ("learning rate / epochs", f"{args.learning_rate} / {args.num_train_epochs}"),
        *([("fine-tuning", fine_tuning)] if fine_tuning else []),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    front_matter = {"base_model": hub_id} if hub_id else {}
    front_matter |= {"library_name": family.library_name, "tags": ["rlfree", "weighted-mle"]}
    name = Path(args.output_dir).name
    return (
        "---\n" + "\n".join(f"{key}: {json.dumps(value)}" for key, value in front_matter.items()) + "\n---\n\n"
        f"# {name}\n\n"
        f"Fine-tuned from `{base_model}` with rlfree: weighted maximum likelihood "
        "towards the KL-regularized optimum pi_ref(o|q) * exp(r(q,o) / beta), without reinforcement learning.\n\n"
        "| setting | value |\n| --- | --- |\n" + table + "\n\n"
        f"## Use\n\n```python\n{family.usage.format(name=name)}```\n"
    )
