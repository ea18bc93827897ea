"""What the transformer layouts (SD3, Flux) share: LoRA on the blocks' attention and feed-forward layers."""

from __future__ import annotations

import torch

# The Linear layers of a block that attend or feed forward (diffusers' names: to_q/k/v, to_out, add_*_proj, to_add_out
# under `attn`; `ff` and `ff_context` MLPs; a Flux single block's fused `proj_mlp` and `proj_out`). The adaLN
# modulations (`norm*.linear`) and the embedders stay frozen, as in diffusers' LoRA training scripts.
BLOCK_PARTS = ("attn", "ff", "ff_context", "proj_mlp", "proj_out")


def attention_and_feed_forward(network: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in network.named_modules()
        if isinstance(module, torch.nn.Linear)
        and "transformer_blocks." in name
        and any(part in BLOCK_PARTS for part in name.split(".")[2:])
    ]
