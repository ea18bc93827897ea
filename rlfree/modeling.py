"""Pieces every stage shares: loading a model, batching prompt+completion ids, and sequence log-probabilities.

Generation (for `ref_logprob`) and training (for the loss) both read log pi(o|q) through `completion_logprobs`,
so the number the weights were computed from and the number the trainer maximizes are the same computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(dtype: str, device: torch.device) -> str | torch.dtype:
    """`auto` keeps the checkpoint's dtype on GPU but means float32 on CPU, where bf16 is slow and imprecise."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
    return getattr(torch, dtype)


def load_causal_lm(
    name_or_path: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """A causal LM from a local folder or the Hub, in eval mode on `device` (CUDA when present)."""
    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """All ids that end a completion: the generation config's (it may list several) or the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model has no eos_token_id in its generation config and the tokenizer has none either")
    return [eos] if isinstance(eos, int) else list(eos)


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
    rows, masks = [], []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        if max_length is not None:
            completion = completion[: max(0, max_length - len(prompt))]
        rows.append(list(prompt) + list(completion))
        masks.append([0] * len(prompt) + [1] * len(completion))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, : len(row)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def completion_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor, processors=None
) -> torch.Tensor:
    """Sequence log-probability of each row's completion: the *sum* over its tokens, in float32.

    `logits` are the model's outputs for `input_ids`; the token at position t is scored by the logits at t-1.
    `processors` (transformers logits warpers: temperature, top-k, top-p) turn the model's distribution into a
    sampler's; without them this is the model's full softmax at temperature 1.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    if processors:
        flat = logits.reshape(-1, logits.size(-1))
        for processor in processors:
            flat = processor(None, flat)
        logits = flat.view_as(logits)
    token_logprobs = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    # A token the sampler could not have drawn has log p = -inf; keep it (the weighting stage rejects it) but never
    # let -inf * 0 on padding turn into NaN.
    token_logprobs = torch.where(mask.bool(), token_logprobs, torch.zeros_like(token_logprobs))
    return token_logprobs.sum(-1)
