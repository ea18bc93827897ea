"""What the transformer layouts (SD3, Flux) share: the denoiser's name, two text encoders, the empty prompt as null
condition, LoRA on the blocks' attention and feed-forward layers, and the flow-matching resolution shift."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Condition, Layout

# The Linear layers of a block that attend or feed forward (diffusers' names: to_q/k/v, to_out, add_*_proj, to_add_out
# under `attn`; `ff` and `ff_context` MLPs; a Flux single block's fused `proj_mlp` and `proj_out`). The adaLN
# modulations (`norm*.linear`) and the embedders stay frozen, as in diffusers' LoRA training scripts.
BLOCK_PARTS = ("attn", "ff", "ff_context", "proj_mlp", "proj_out")


class TransformerLayout(Layout):
    denoiser: ClassVar[str] = "transformer"
    required: ClassVar[frozenset[str]] = frozenset(
        {"transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    )

    def null_condition(self, pipeline, count: int, null_class: int | None, device) -> Condition:
        return self.condition(pipeline, [""] * count, None, device)  # the pipelines' negative: the empty prompt

    def lora_targets(self, network: torch.nn.Module) -> list[str]:
        return [
            name
            for name, module in network.named_modules()
            if isinstance(module, torch.nn.Linear)
            and "transformer_blocks." in name
            and any(part in BLOCK_PARTS for part in name.split(".")[2:])
        ]


def resolution_shift(scheduler, tokens: int, max_shift: float) -> float:
    """mu of a dynamically shifted flow-matching schedule for `tokens` image tokens, as the pipelines'
    `calculate_shift` (linear in the token count between the scheduler's base and max sequence lengths)."""
    config = scheduler.config
    base_tokens, max_tokens = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return tokens * slope + base_shift - slope * base_tokens
