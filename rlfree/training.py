"""What every family's trainer shares: the weights' scale and the per-optimizer-step normalization of the loss.

    loss = sum_i w_i * loss_i / (rows per optimizer step on one rank)

Every micro-batch is divided by the same constant, so gradient accumulation and data parallelism (whose gradient mean
supplies 1/world_size) give exactly the one-big-batch update. Weights are rescaled once by rows / sum of weights, so
uniform weights reproduce the unweighted per-row mean and the usual learning rates apply.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import TrainingArguments

from .errors import StageInputError


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
