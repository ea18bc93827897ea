"""Model families behind one seam: what a stage asks of a causal LM, a diffusion pipeline, or the next kind of model.

A family knows how to recognize its models, generate from them, which columns its samples carry, how to build its
trainer and save what it trained (with the model card), which reward models score its completions, what a sample
costs and what it refuses. Every stage resolves the family once from its input, through this registry, and records
its name in the stage's sidecar (`family`); no stage names a family.

A new family is a folder holding a `Family` subclass and one line in `FAMILIES`.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .data import read_sidecars
from .errors import StageInputError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import Trainer

    from .options import GenerationSettings
    from .training import ModelConfig, RLFreeConfig

# Name -> "module:Class", in recognition order: the first family that recognizes a model takes it, and the last one
# takes every model the others do not (a causal LM is any model folder or Hub id that is not something else).
FAMILIES: dict[str, str] = {
    "diffusion": "rlfree.diffusion.family:DiffusionFamily",
    "lm": "rlfree.lm.family:LanguageModelFamily",
}


class Family:
    """One kind of model. Subclasses set the class attributes and implement the methods; a family that cannot do
    something refuses it in the matching `check_*` with an error that names the flag and the fix."""

    name: ClassVar[str]
    # Whether its samples carry exact log-probabilities (`ref_logprob`, `proposal_logprob`): what KL estimates, the
    # rlif weighting, the proposal correction and picking among guided candidates need.
    has_likelihood: ClassVar[bool]
    # Network passes over each token (or denoising step) of one candidate, drawing it and reading what the weights need.
    passes_per_sample: ClassVar[int]
    # The columns its trainer reads from the output of `rlfree weight`.
    train_columns: ClassVar[tuple[str, ...]]
    # Whether some of its models take no --prompts (an unconditional diffusion pipeline); its `generate` then checks.
    prompts_optional: ClassVar[bool] = False

    def check_prompts(self, prompts: str | None) -> None:
        if prompts is None and not self.prompts_optional:
            raise StageInputError("--prompts is required (only a diffusion pipeline without conditions takes none)")

    def recognizes(self, name_or_path: str) -> bool:
        """Whether `name_or_path` (a local folder or a Hub id) is one of this family's models."""
        raise NotImplementedError

    def check_generate(self, config: GenerationSettings) -> None:
        """Refuse, before anything is made, generation settings this family cannot honour."""
        raise NotImplementedError

    def generate(self, config: GenerationSettings, settings: dict) -> Dataset:
        """The generation stage for this family: shards written at once, resumed after an interrupt, recording
        `settings` (the stage's, `family` among them) with what the family adds (the stage has checked
        `--output_dir`)."""
        raise NotImplementedError

    def sample_lengths(self, dataset: Dataset, num_inference_steps: int) -> torch.Tensor:
        """What each row cost to draw, in the unit of `passes_per_sample`: tokens, or denoising steps."""
        raise NotImplementedError

    def completion_statistics(self, columns: dict[str, np.ndarray]) -> dict:
        """What an evaluation reports about its completions beyond reward and cost (lengths, finish reasons)."""
        raise NotImplementedError

    def reward_model(self, name_or_path: str, trust_remote_code: bool, device: torch.device) -> Callable:
        """A `--reward_model` as a reward function with TRL's signature, for this family's completions."""
        raise NotImplementedError

    def guided_log_weights(self, candidates: Dataset, scale: float) -> torch.Tensor:
        """Log pick weights of guided candidates (`generate --guidance_scale` beside `--ref_model`) towards the
        sequence-level mix pi_ref^(1-W)·pi_theta^W."""
        raise NotImplementedError

    def check_train(self, model_config: ModelConfig) -> None:
        """Refuse, before anything is made, a model this family cannot train."""
        raise NotImplementedError

    def build_trainer(self, model_config: ModelConfig, args: RLFreeConfig, dataset: Dataset) -> Trainer:
        """The `transformers.Trainer` that runs this family's weighted loss on `dataset`."""
        raise NotImplementedError

    def needs_full_weights(self, model_config: ModelConfig) -> bool:
        """Whether saving the result gathers the full weights in one place (a LoRA merge), which ZeRO-3/FSDP forbid."""
        raise NotImplementedError

    def save_trained(self, trainer: Trainer, model_config: ModelConfig) -> None:
        """Write the trained model to the root of `--output_dir`, as its library's `from_pretrained` loads it, with
        its model card."""
        raise NotImplementedError


@functools.cache
def family_named(name: str) -> Family:
    """The registered family called `name` (as a sidecar records it)."""
    if name not in FAMILIES:
        raise StageInputError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    module, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), class_name)()


def family_of_model(name_or_path: str) -> Family:
    """The family of a model (a local folder or a Hub id): the first in `FAMILIES` that recognizes it."""
    for name in FAMILIES:
        family = family_named(name)
        if family.recognizes(name_or_path):
            return family
    raise StageInputError(f"{name_or_path}: no model family recognizes it (known: {', '.join(FAMILIES)})")


def family_of_data(directory: str | os.PathLike) -> Family:
    """The family whose samples a stage folder holds: the one its generation record names, else (a folder of an older
    version) the family of the model it records; a dataset made outside rlfree, with no record, is taken for the last
    family's, the catch-all."""
    generation: dict[str, Any] = read_sidecars(directory).get("generation", {})
    if "family" in generation:
        return family_named(generation["family"])
    if generation.get("model_name_or_path"):
        return family_of_model(generation["model_name_or_path"])
    return family_named(list(FAMILIES)[-1])
