"""Weighted maximum likelihood for causal LMs: a small `transformers.Trainer` subclass (its config, `RLFreeConfig`, is
shared with the other families in `rlfree.training`).

    loss(theta) = - sum_q sum_i w_i * sum_t log pi_theta(o_i,t | q, o_i,<t)

The log-likelihood is the *sum* over a completion's tokens (a per-token mean would reweight samples by 1/length
and change the target). Every micro-batch is divided by the same constant, the number of sequences in one
optimizer step across all ranks, so gradient accumulation and data parallelism give exactly the one-big-batch
update. Weights are rescaled once by (rows / prompts) so that uniform weights 1/N reproduce SFT's per-sequence
mean loss and the usual learning rates apply.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Trainer

from ..data import read_sidecars
from ..device import default_device, resolve_dtype
from ..sources import model_folder
from ..training import CardFamily, ModelConfig, RLFreeConfig, model_card, weight_scale, weighted_step_loss
from .batching import flatten_prompt_completion, pad_prompt_completion
from .logprobs import model_completion_logprobs

TRAIN_COLUMNS = ("prompt_ids", "completion_ids", "weight")
# Samplers of TrainingArguments.train_sampling_strategy that read each row's length from `length_column_name`.
LENGTH_SAMPLING_STRATEGIES = ("group_by_length", "batch_rebalance")


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
        sidecars = read_sidecars(self.args.dataset_dir)
        card_family = language_model_card(sidecars.get("generation", {}))
        card = model_card(self.model.config._name_or_path, sidecars, self.args.dataset_dir, self.args, card_family)
        Path(self.args.output_dir, "README.md").write_text(card)

    def save_trained(self, model_config: ModelConfig) -> None:
        """The trained model at the root of --output_dir, as `from_pretrained` loads it (the LoRA adapter alone, or
        with --merge_lora the merged model), with its tokenizer and card."""
        if model_config.use_peft and model_config.merge_lora:
            merged = self.accelerator.unwrap_model(self.model).merge_and_unload()
            if self.is_world_process_zero():
                merged.save_pretrained(self.args.output_dir)
                self.processing_class.save_pretrained(self.args.output_dir)
        else:
            self.save_model(self.args.output_dir)
        self.create_model_card()


def language_model_card(generation: dict) -> CardFamily:
    """A causal LM's part of its model card: its sampler settings (from the generation record) and how to load it."""
    return CardFamily(
        "transformers",
        " ".join(f"{name}={generation.get(name)}" for name in ("temperature", "top_k", "top_p", "max_new_tokens")),
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
        'tokenizer = AutoTokenizer.from_pretrained("{name}")\n',
    )


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


def build_model(model_config: ModelConfig):
    """Load the model to train and, with --use_peft, wrap it in a LoRA adapter."""
    model = AutoModelForCausalLM.from_pretrained(
        model_folder(model_config.model_name_or_path),
        dtype=resolve_dtype(model_config.dtype, default_device()),
        trust_remote_code=model_config.trust_remote_code,
    )
    # What the model card names as the base: the GGUF file the user gave, not the folder it was converted into.
    model.config.name_or_path = model_config.model_name_or_path
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
