"""The reference as the tuned model with its PEFT adapter switched off: one copy of the base weights serves both.

Both families use it for guidance between a LoRA output and its base (RLG's own code does the same with
`disable_adapter()`), and the LM stages for a `--ref_model` that a LoRA proposal was trained on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class AdapterOff:
    """pi_ref served by the weights of a PEFT-adapted model with its adapter disabled (as RLG's code does with
    `disable_adapter()`): the tuned model and its base share one set of base weights in memory.

    Code that runs pi_ref goes through `as_reference`, which switches the adapter off for the duration."""

    def __init__(self, model):
        self.model = model


@contextlib.contextmanager
def as_reference(ref_model) -> Iterator[torch.nn.Module]:
    """The model to run as pi_ref: `ref_model` itself, or the adapted model with its adapter off until the block ends."""
    if not isinstance(ref_model, AdapterOff):
        yield ref_model
        return
    with ref_model.model.disable_adapter():
        yield ref_model.model
