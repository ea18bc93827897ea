"""Weighted maximum likelihood for causal LMs: a config dataclass beside a small `transformers.Trainer` subclass.

    loss(theta) = - sum_q sum_i w_i * sum_t log pi_theta(o_i,t | q, o_i,<t)

The log-likelihood is the *sum* over a completion's tokens (a per-token mean would reweight samples by 1/length
and change the target). Every micro-batch is divided by the same constant, the number of sequences in one
optimizer step across all ranks, so gradient accumulation and data parallelism give exactly the one-big-batch
update. Weights are rescaled once by (rows / prompts) so that uniform weights 1/N reproduce SFT's per-sequence
mean loss and the usual learning rates apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..data import read_sidecars
from ..errors import StageInputError, check_finite, check_ranges
from ..training import weight_scale, weighted_step_loss
from .modeling import (
    DEFAULT_LOGITS_CHUNK_SIZE,
    flatten_prompt_completion,
    model_completion_logprobs,
    pad_prompt_completion,
)

TRAIN_COLUMNS = ("prompt_ids", "completion_ids", "weight")
# Samplers of TrainingArguments.train_sampling_strategy that read each row's length from `length_column_name`.
LENGTH_SAMPLING_STRATEGIES = ("group_by_length", "batch_rebalance")


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
        scale = weight_scale(train_dataset, TRAIN_COLUMNS, "train on the output of `rlfree weight`")
        collator = WeightedCollator(processing_class.pad_token_id, scale, args.max_length, args.padding_free)
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
        loss = weighted_step_loss(weight, -sequence_logprob, self.args)
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


def model_card(
    name_or_path: str, sidecars: dict, dataset_dir: str, args: TrainingArguments, fine_tuning: str | None = None
) -> str:
    """A Hub model card that records the recipe: base model (`name_or_path` as loaded), weighting, beta, N, reward,
    data and, when given, how the weights were tuned (`fine_tuning`: full, or the LoRA settings)."""
    generation = sidecars.get("generation", {})
    scoring = sidecars.get("scoring", {})
    weighting = sidecars.get("weighting", {})
    rewards = scoring.get("reward", []) + scoring.get("reward_model", [])
    hub_id, base_model = base_model_reference(name_or_path)
    ess = [weighting.get("ess_min"), weighting.get("ess_median")]
    diffusion = generation.get("family") == "diffusion"
    sampler = (
        f"num_inference_steps={generation.get('num_inference_steps')}"
        if diffusion
        else f"temperature={generation.get('temperature')} top_k={generation.get('top_k')} "
        f"top_p={generation.get('top_p')} max_new_tokens={generation.get('max_new_tokens')}"
    )
    rows = [
        ("base model", base_model),
        ("weighting", weighting.get("weighting", "?")),
        *weighting_rows(weighting),
        ("samples per prompt (N)", generation.get("num_samples")),
        ("prompts", weighting.get("num_prompts", generation.get("num_prompts"))),
        ("prompt set", generation.get("prompts")),
        ("sampler", sampler),
        ("reward", ", ".join(rewards) or "none (rlif)"),
        ("ESS min / median", " / ".join("?" if value is None else three_significant_digits(value) for value in ess)),
        ("training data", dataset_dir),
        ("learning rate / epochs", f"{args.learning_rate} / {args.num_train_epochs}"),
        *([("fine-tuning", fine_tuning)] if fine_tuning else []),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    front_matter = {"base_model": hub_id} if hub_id else {}
    front_matter |= {"library_name": "diffusers" if diffusion else "transformers", "tags": ["rlfree", "weighted-mle"]}
    name = Path(args.output_dir).name
    usage = (
        f'from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained("{name}")\n'
        if diffusion
        else "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
    )
    return (
        "---\n" + "\n".join(f"{key}: {json.dumps(value)}" for key, value in front_matter.items()) + "\n---\n\n"
        f"# {Path(args.output_dir).name}\n\n"
        f"Fine-tuned from `{base_model}` with rlfree: weighted maximum likelihood "
        "towards the KL-regularized optimum pi_ref(o|q) * exp(r(q,o) / beta), without reinforcement learning.\n\n"
        "| setting | value |\n| --- | --- |\n" + table + "\n\n"
        f"## Use\n\n```python\n{usage}```\n"
    )
