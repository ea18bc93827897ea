"""Prompt+completion ids as model inputs: right-padded rows, or packed into one row without padding."""

from __future__ import annotations

import torch


def pad_prompt_completion(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_token_id: int,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `completion_mask` (1 on completion tokens only).

    Right padding keeps the default position ids correct, so one forward pass reads the same distribution the
    sampler saw. With `max_length`, completions are cut on the right, never the prompt.
    """
    rows, masks = _join_prompt_completion(prompt_ids, completion_ids, max_length)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, : len(row)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def flatten_prompt_completion(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """All prompt+completion sequences back to back in one row: `input_ids`, `position_ids`, `completion_mask`.

    No padding and no attention mask, as transformers' `DataCollatorWithFlattening` does: `position_ids` restart at 0
    at each sequence, and that restart is what makes transformers build a block-diagonal causal mask (sdpa, eager,
    flex) or call flash-attention's varlen kernels, and what `completion_logprobs` sums per sequence by. Completions
    are cut to `max_length` as in `pad_prompt_completion`.
    """
    rows, masks = _join_prompt_completion(prompt_ids, completion_ids, max_length)
    if not all(rows):
        raise ValueError("a sequence with neither prompt nor completion tokens cannot be packed")
    return {
        "input_ids": torch.tensor([[token for row in rows for token in row]], dtype=torch.long),
        "position_ids": torch.tensor([[position for row in rows for position in range(len(row))]], dtype=torch.long),
        "completion_mask": torch.tensor([[flag for mask in masks for flag in mask]], dtype=torch.long),
    }


def _join_prompt_completion(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], max_length: int | None
) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt+completion as one list of ids, and its completion mask; `max_length` cuts completions only."""
    rows, masks = [], []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        if max_length is not None:
            completion = completion[: max(0, max_length - len(prompt))]
        rows.append(list(prompt) + list(completion))
        masks.append([0] * len(prompt) + [1] * len(completion))
    return rows, masks
